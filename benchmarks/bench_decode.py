"""Decode step against the base model, alternating in one process: the least noisy decode ratio.

    python benchmarks/bench_decode.py [--experts 64,256,1024] [--rounds 8] [--steps 10]

`bench_arrow.py` times `model.generate` in a fresh process per cell, so its decode ratio mixes
two processes' luck on a shared machine (its range across rounds is often ±10%). Here one process
holds the embedded SmolLM2-135M-Instruct with a library of random rank-4 experts (q, k, v, o of
every layer, stored in bfloat16: bench_arrow's setting) and times single decoding steps (one
token after a 64-token prompt in the KV cache), in blocks of `--steps` steps, the base model and
Arrow routing (top-k 4) in turn, `--rounds` times. It reports the median step of each, the median
of the per-round ratios to base and their range. Both are measured in the same process because
the base step itself differs by up to a fifth between processes on a shared machine: ratios
between processes mislead.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = 64


def measure(library: Path, rounds: int, steps: int) -> dict:
    """Median step times (s) of the base model and of the routed one, alternating in this one
    process, and each round's ratio of the two."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from lorlib_ui.core.base_model import fetch_embedded_model
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router

    model = AutoModelForCausalLM.from_pretrained(fetch_embedded_model()).eval()
    rm = RoutedModel(model, None, Library.open(library))
    router = make_router("arrow", rm.experts, top_k=4)
    prompt = torch.randint(100, 40000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    token = torch.tensor([[1234]])

    def block(routed: bool) -> float:
        cache = DynamicCache()
        with rm.routing(router) if routed else contextlib.nullcontext():
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                model(input_ids=token, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - start)
                cache.crop(-1)  # every step sees the same 64-token cache
        return statistics.median(times)

    base, routed = [], []
    with torch.inference_mode():
        block(False), block(True)  # warm-up
        for _ in range(rounds):
            base.append(block(False))
            routed.append(block(True))
    return {
        "base": statistics.median(base),
        "routed": statistics.median(routed),
        "ratios": [b / r for b, r in zip(base, routed)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        import json

        print(json.dumps(measure(Path(args.measure), args.rounds, args.steps)))
        return

    import json

    import bench_arrow

    from lorlib_ui.core.base_model import fetch_embedded_model

    counts = [int(x) for x in args.experts.split(",")]
    base_dir = fetch_embedded_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorlib-decode-") as tmp:
        work = Path(tmp)
        bench_arrow.make_libraries(work, bench_arrow.make_experts(work, max(counts), base_dir), counts, base_dir)
        for n in counts:
            command = [sys.executable, __file__, "--measure", str(work / f"library{n}")]
            command += ["--rounds", str(args.rounds), "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append((n, json.loads(done.stdout.strip().splitlines()[-1])))
            print(f"{n} experts: done", file=sys.stderr, flush=True)

    print(
        f"Run {date.today()} on {platform.machine()}: one decoding step after a {PROMPT}-token prompt, "
        f"Arrow top-k 4, {args.rounds} rounds of {args.steps} steps of each (base, routed) in turn, "
        "one process per row.\n"
    )
    print("| experts | base step ms | routed step ms | x base (median) | range |")
    print("|---:|---:|---:|---:|---|")
    for n, run in rows:
        ratios = run["ratios"]
        print(
            f"| {n} | {run['base'] * 1e3:.1f} | {run['routed'] * 1e3:.1f} | {statistics.median(ratios):.2f} "
            f"| {min(ratios):.2f}–{max(ratios):.2f} |"
        )


if __name__ == "__main__":
    main()
