"""Explorer speed: time to the first streamed token and to the heatmap; the cluster view at 256 and 1024 experts.

    python benchmarks/bench_app.py [--repeats 5] [--cluster-experts 256,1024]

Starts the app in-process on the embedded model and the shipped library (assets/library), waits
for the worker's warm-up, then drives the /route endpoint with gradio_client as a browser would:
a 40-token prompt, Arrow over the private experts, 16 new tokens. "first token" is from submitting
the request to the first streamed text; "heatmap" is to the final update, which carries the routing
heatmap. Then, for each size in --cluster-experts, it writes a library of random experts
(benchmarks/bench_mbc.py) and times the /clusters endpoint on it: MBC embedding, silhouette sweep,
UMAP and the figures: the first call (the library, written directly, keeps no Gram matrix yet,
so all of it is computed, then kept), a second call at another k, and the drill-down into one
cluster where there are too many experts to show one by one. Then it imports one more expert as
the Library tab does (which computes and keeps that expert's row of the Gram matrix) and times
the first view of the grown library, which reads the kept matrix.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

PROMPT_TOKENS = 40


def _timed(call, *args, **kwargs) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt(tokenizer) -> str:
    words = [
        "Name",
        "the",
        "plural",
        "form",
        "of",
        "each",
        "of",
        "these",
        "nouns",
        "in",
        "order:",
        "goose,",
        "mouse,",
        "child,",
        "tooth,",
        "ox,",
        "cactus,",
        "fungus,",
        "person",
    ]
    text = ""
    for word in words * 4:
        candidate = f"{text} {word}".strip()
        if len(tokenizer(candidate)["input_ids"]) > PROMPT_TOKENS:
            break
        text = candidate
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cluster-experts", default="256,1024")
    args = parser.parse_args()

    from bench_mbc import make_library, write_random_adapter
    from gradio_client import Client
    from transformers import AutoTokenizer

    from lorlib_ui.app.layout import build_app, launch
    from lorlib_ui.core.base_model import resolve_base_model
    from lorlib_ui.worker.local import LocalWorker

    library = str(ROOT / "assets" / "library")
    worker = LocalWorker(device="cpu")
    start = time.perf_counter()
    worker.warm_up(library)
    app = build_app(worker, library, {})
    port = _free_port()
    launch(app, "127.0.0.1", port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    while worker.health()["warming_up"]:
        time.sleep(0.1)
    warm = time.perf_counter() - start
    prompt = _prompt(AutoTokenizer.from_pretrained(resolve_base_model(None)))
    first, final = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        job = client.submit(prompt, "arrow@private", 4, 1.0, 16, api_name="/route")
        seen = None
        for _update in job:
            seen = seen or time.perf_counter() - t0
        job.result()
        first.append(seen)
        final.append(time.perf_counter() - t0)

    views = []
    for n in [int(x) for x in args.cluster_experts.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "lib")
            make_library(Path(path), n, 16)  # written directly: the library keeps no Gram matrix yet
            client.predict(path, api_name="/open_library")
            cold = _timed(client.predict, 16, "cluster", "all clusters", api_name="/clusters")
            hot = _timed(client.predict, 12, "family", "all clusters", api_name="/clusters")
            focus = client.predict(12, "family", "all clusters", api_name="/clusters")[1]
            drill = _timed(client.predict, 12, "cluster", focus["choices"][1][0], api_name="/clusters")
            folder = write_random_adapter(Path(tmp) / "one-more", seed=n)
            imported = _timed(worker.import_adapters, path, [str(folder)])  # as the Library tab's import
            client.predict(path, api_name="/open_library")
            kept = _timed(client.predict, 16, "cluster", "all clusters", api_name="/clusters")
            views.append((n, {"first": cold, "k": hot, "drill": drill, "import": imported, "kept": kept}))
    app.close()

    print(
        f"Run {date.today()} on {platform.machine()} with {os.cpu_count()} cores; embedded SmolLM2-135M-Instruct "
        f"(float32, CPU), shipped library (34 experts), {PROMPT_TOKENS}-token prompt, 16 new tokens, "
        f"{args.repeats} requests; warm-up (model loaded, first tokens routed) done after {warm:.1f} s.\n"
    )
    print("| measure | median s | max s |\n|---|---:|---:|")
    print(f"| Route: first streamed token | {statistics.median(first):.2f} | {max(first):.2f} |")
    print(f"| Route: heatmap (final update) | {statistics.median(final):.2f} | {max(final):.2f} |")
    for n, t in views:
        print(f"| Clusters, {n} experts, first view (no Gram matrix kept: all computed) | {t['first']:.2f} | |")
        print(f"| Clusters, {n} experts, another k | {t['k']:.2f} | |")
        print(f"| Clusters, {n} experts, one cluster's experts | {t['drill']:.2f} | |")
        print(f"| Import of one more expert (its Gram row kept) | {t['import']:.2f} | |")
        print(f"| Clusters, {n + 1} experts, first view (Gram matrix kept) | {t['kept']:.2f} | |")


if __name__ == "__main__":
    main()
