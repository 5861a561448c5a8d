"""The lorlib explorer: `python app.py` serves it at http://127.0.0.1:7860 on the embedded default.

    python app.py [--library DIR] [--host 127.0.0.1] [--port 7860] [--base-model M] [--device cpu|cuda] [--dtype D]
                  [--backend local|ray] [--ray-address HOST:PORT]

The UI (`lorlib_ui.app.layout`) talks only to a model worker; this file picks the worker (in this process,
or a Ray actor on a cluster) and launches the app. It binds to 127.0.0.1 unless --host says
otherwise, makes no share link, sends no analytics, and keeps uploads in a private temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial

from lorlib_ui.core.assets import asset
from lorlib_ui.core.errors import LorlibError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The lorlib explorer (Gradio).")
    parser.add_argument(
        "--library", default=str(asset("library", must_exist=False)), help="library folder to open first"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--base-model", default=None, help="override the library's base model (must fit it)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    parser.add_argument(
        "--backend",
        choices=["local", "ray"],
        default=os.environ.get("LORLIB_BACKEND", "local"),
        help="where the model worker runs: this process (local) or a Ray actor (default: $LORLIB_BACKEND or local)",
    )
    parser.add_argument(
        "--ray-address",
        default=os.environ.get("LORLIB_RAY_ADDRESS"),
        help="Ray cluster host:port for --backend ray (default: $LORLIB_RAY_ADDRESS, else a private Ray here)",
    )
    return parser.parse_args(argv)


def _offline_environment() -> None:
    """Before gradio is imported: no analytics, uploads in a private (0700) temporary folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="lorlib-uploads-"))


def create(args: argparse.Namespace):
    """The app (not launched) over an in-process worker."""
    _offline_environment()
    from lorlib_ui.app.layout import build_app
    from lorlib_ui.build.data import load_tasks
    from lorlib_ui.worker.local import LocalWorker

    data = load_tasks("default")
    tasks_by_family = {family: data.tasks_in(family) for family in data.families}
    serve = partial(LocalWorker, device=args.device, dtype=args.dtype, base_model=args.base_model)
    if args.backend == "ray":  # the same worker, in a Ray actor, its jobs training on the cluster
        from lorlib_ui.worker.ray import RayTrainer, RayWorker

        worker = RayWorker(partial(serve, trainer_factory=RayTrainer), args.ray_address)
    else:
        if args.ray_address:
            raise LorlibError("--ray-address names a Ray cluster: use it with --backend ray")
        worker = serve()
    worker.warm_up(args.library)
    return build_app(worker, args.library, tasks_by_family)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        app = create(args)
    except LorlibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from lorlib_ui.app.layout import launch

    launch(app, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
