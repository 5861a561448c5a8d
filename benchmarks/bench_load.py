"""Load: 8 gradio_client sessions routing different prompts at once for 60 s, on the embedded model.

    python benchmarks/bench_load.py [--sessions 8] [--seconds 60] [--new-tokens 16]

Starts the app in-process on the embedded SmolLM2-135M-Instruct and the shipped library
(assets/library), as `python app.py` does, and waits for its warm-up. Each session gets its own
prompt (test rows of the held-out tasks) and first routes it alone, to record the reference answer
and per-layer routing heatmap. Then all sessions route their prompts in a loop, at once, until the
time is up; every response must match its own reference (text, and heatmap within 1e-5). Reports
requests, errors, mismatches and the latency from submit to the final update (the heatmap):
p50, p95, max.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def _heatmap(plot) -> np.ndarray:
    """The layer heatmap's weights, layers x experts: its panels (one per module type) stacked."""
    return np.concatenate([_array(t["z"]) for t in json.loads(plot["plot"])["data"] if t["type"] == "heatmap"])


def _array(z) -> np.ndarray:
    if isinstance(z, list):
        return np.asarray(z, dtype=np.float64)
    flat = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
    return flat.reshape([int(n) for n in str(z["shape"]).split(",")]).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    from gradio_client import Client

    from lorlib_ui.app.layout import build_app, launch
    from lorlib_ui.worker.local import LocalWorker

    library = str(ROOT / "assets" / "library")
    worker = LocalWorker(device="cpu")
    worker.warm_up(library)
    app = build_app(worker, library, {})
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, "127.0.0.1", port, block=False)
    url = f"http://127.0.0.1:{port}/"
    while worker.health()["warming_up"]:
        time.sleep(0.1)
    prompts = [example.prompt for example in worker.examples(library, per_task=2)][: args.sessions]

    def route(client, prompt):
        text, _, plot, *_ = client.predict(prompt, "arrow@private", 4, 1.0, args.new_tokens, api_name="/route")
        return text, _heatmap(plot)

    clients = [Client(url, verbose=False) for _ in prompts]
    reference = [route(client, prompt) for client, prompt in zip(clients, prompts)]
    latencies, errors, mismatches = [], [], []
    lock = threading.Lock()
    stop = time.perf_counter() + args.seconds

    def session(i: int) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                text, z = route(clients[i], prompts[i])
            except Exception as exc:  # counted, not raised: the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                if text != reference[i][0] or not np.allclose(z, reference[i][1], atol=1e-5):
                    mismatches.append(i)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(prompts))]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    app.close()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    print(
        f"Run {date.today()} on {platform.machine()} with {os.cpu_count()} cores; embedded SmolLM2-135M-Instruct "
        f"(float32, CPU), shipped library, Arrow over the private experts, top-4, {args.new_tokens} new tokens; "
        f"{len(prompts)} sessions for {args.seconds:.0f} s (last requests finished after {wall:.0f} s).\n"
    )
    print("| requests | errors | mismatched records | p50 s | p95 s | max s | requests/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {len(latencies) + len(errors)} | {len(errors)} | {len(mismatches)} | {q[49]:.2f} | {q[94]:.2f} | "
        f"{max(latencies):.2f} | {len(latencies) / wall:.2f} |"
    )
    if errors:
        print("\nfirst errors:", *errors[:3], sep="\n  ")


if __name__ == "__main__":
    main()
