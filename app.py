"""The lorlib explorer: `python app.py` serves it at http://127.0.0.1:7860 on the embedded default.

    python app.py [--library DIR] [--libraries DIR ...] [--read-only] [--host 127.0.0.1] [--port 7860]
                  [--auth-file FILE] [--max-upload-mb N] [--max-prompt-tokens N] [--download-ttl S]
                  [--base-model M] [--device cpu|cuda] [--dtype D] [--backend local|ray] [--ray-address HOST:PORT]

The UI (`lorlib_ui.app.layout`) talks only to a model worker; this file picks the worker (in this process,
or a Ray actor on a cluster) and launches the app. It binds to 127.0.0.1 unless --host says
otherwise, makes no share link, sends no analytics, opens only the libraries it is given, and keeps
uploads and downloads in a private temporary folder that expires them and is removed at exit
(SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path

from lorlib_ui.core.assets import asset
from lorlib_ui.core.errors import LorlibError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The lorlib explorer (Gradio).")
    parser.add_argument(
        "--library",
        default=str(asset("library", must_exist=False)),
        help="library folder to open first; the app opens it and the libraries under --libraries, nothing else",
    )
    parser.add_argument(
        "--libraries",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of libraries users may open (repeatable; links are resolved before the check)",
    )
    parser.add_argument(
        "--read-only", action="store_true", help="serve without writing: no imports, removals, builds or other jobs"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--allow-hub",
        action="store_true",
        help="let users of an app bound beyond this machine reach the Hugging Face Hub (hf:// libraries, "
        "adapters by hub id); an app bound to 127.0.0.1 may always",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--auth-file",
        default=None,
        help="ask for a login: a file of user:password lines (Gradio's auth; serve it behind TLS)",
    )
    parser.add_argument("--max-upload-mb", type=int, default=256, help="largest upload accepted (default 256 MB)")
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt one request prefills, cut from the left beyond it (default 1024, "
        "$LORLIB_MAX_PROMPT_TOKENS); raise it for single-user use",
    )
    parser.add_argument(
        "--download-ttl",
        type=int,
        default=600,
        help="seconds an upload or download is kept in the app's temporary folder (default 600)",
    )
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


LOOPBACK = ("127.0.0.1", "localhost", "::1")  # an app bound here is this machine's user's alone


def _offline_environment() -> str:
    """Before gradio is imported: no analytics, uploads in a private (0700) temporary folder,
    which is returned (removed at exit)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="lorlib-uploads-"))
    return os.environ["GRADIO_TEMP_DIR"]


def read_auth(path: str | None) -> list[tuple[str, str]] | None:
    """user:password lines of an --auth-file (blank lines and # comments skipped)."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LorlibError(f"--auth-file {path} is unreadable ({exc})") from None
    pairs = [tuple(line.split(":", 1)) for line in lines if line.strip() and not line.startswith("#")]
    if not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise LorlibError(f"--auth-file {path} must hold user:password lines")
    return pairs


def create(args: argparse.Namespace, uploads: str | None = None):
    """The app (not launched) over its worker, and the worker."""
    uploads = uploads or _offline_environment()
    from lorlib_ui.app.layout import build_app
    from lorlib_ui.training.data import load_tasks
    from lorlib_ui.worker.access import Access
    from lorlib_ui.worker.local import LocalWorker

    for name, value in (("--max-upload-mb", args.max_upload_mb), ("--download-ttl", args.download_ttl)):
        if value < 1:
            raise LorlibError(f"{name} must be positive, got {value}")
    data = load_tasks("default")
    tasks_by_family = {family: data.tasks_in(family) for family in data.families}
    hub = args.allow_hub or getattr(args, "host", "127.0.0.1") in LOOPBACK
    access = Access.serving([args.library], args.libraries, [uploads], args.read_only, hub=hub)
    serve = partial(
        LocalWorker,
        device=args.device,
        dtype=args.dtype,
        base_model=args.base_model,
        access=access,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    if args.backend == "ray":  # the same worker, in a Ray actor, its jobs training on the cluster
        from lorlib_ui.worker.ray import RayTrainer, RayWorker

        worker = RayWorker(partial(serve, trainer_factory=RayTrainer), args.ray_address)
    else:
        if args.ray_address:
            raise LorlibError("--ray-address names a Ray cluster: use it with --backend ray")
        worker = serve()
    worker.warm_up(args.library)
    return build_app(worker, args.library, tasks_by_family, read_only=args.read_only, ttl=args.download_ttl), worker


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # Gradio's serving loop closes the server on it; then main cleans up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uploads = _offline_environment()
    worker = None
    try:
        auth = read_auth(args.auth_file)
        app, worker = create(args, uploads)
        from lorlib_ui.app.layout import launch

        signal.signal(signal.SIGTERM, _stop)
        launch(app, args.host, args.port, auth=auth, max_file_size=args.max_upload_mb * 10**6)
    except LorlibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:  # a clean exit leaves no temporary file behind
        if worker is not None:
            worker.close()
        shutil.rmtree(uploads, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
