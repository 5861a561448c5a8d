"""Decode step against the base model, alternating in one process: the least noisy decode ratio.

    python benchmarks/bench_decode.py [--experts 64,256,1024] [--rounds 8] [--steps 10]

`bench_arrow.py` times `model.generate` in a fresh process per cell, so its decode ratio mixes
two processes' luck on a shared machine (its range across rounds is often ±10%). Here one process
holds the embedded SmolLM2-135M-Instruct with a library of random rank-4 experts (q, k, v, o of
every layer, stored in bfloat16: bench_arrow's setting) and times single decoding steps (one
token after a 64-token prompt in the KV cache), alternating blocks of `--steps` steps without and
with Arrow routing (top-k 4) `--rounds` times. It reports the median step of each, their ratio,
and the range of the per-round ratios; then the same with screening turned off
(`lorlib_ui.core.screening`), which shows what screening gives at each size.
"""

from __future__ import annotations

import argparse
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


def measure(library: Path, rounds: int, steps: int, screen: bool) -> dict:
    """Median step times (s) of the base model and the routed one, and each round's ratio."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from lorlib_ui.core import screening
    from lorlib_ui.core.base_model import fetch_embedded_model
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router

    if not screen:
        screening.SCREEN_FROM = float("inf")
    model = AutoModelForCausalLM.from_pretrained(fetch_embedded_model()).eval()
    rm = RoutedModel(model, None, Library.open(library))
    router = make_router("arrow", rm.experts, top_k=4)
    prompt = torch.randint(100, 40000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    token = torch.tensor([[1234]])

    def block() -> list[float]:
        cache = DynamicCache()
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(input_ids=token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache.crop(-1)  # every step sees the same 64-token cache
        return times

    base, routed, ratios = [], [], []
    with torch.inference_mode():
        block()  # warm-up
        with rm.routing(router):
            block()
        for _ in range(rounds):
            b = block()
            with rm.routing(router):
                r = block()
            base += b
            routed += r
            ratios.append(statistics.median(b) / statistics.median(r))
    return {"base": statistics.median(base), "routed": statistics.median(routed), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        import json

        print(json.dumps(measure(Path(args.measure[0]), args.rounds, args.steps, args.measure[1] != "off")))
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
        from lorlib_ui.core.screening import SCREEN_FROM

        for n in counts:
            for screen in ("on", "off") if n >= SCREEN_FROM else ("below SCREEN_FROM",):
                command = [sys.executable, __file__, "--measure", str(work / f"library{n}"), screen.split()[0]]
                command += ["--rounds", str(args.rounds), "--steps", str(args.steps)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                rows.append((n, screen, json.loads(done.stdout.strip().splitlines()[-1])))
                print(f"{n} experts, screening {screen}: done", file=sys.stderr, flush=True)

    print(
        f"Run {date.today()} on {platform.machine()}: one decoding step after a {PROMPT}-token prompt, "
        f"Arrow top-k 4, {args.rounds} alternating rounds of {args.steps} steps each way, one process per row.\n"
    )
    print("| experts | screening | base step ms | routed step ms | x base (median) | per-round range |")
    print("|---:|---|---:|---:|---:|---|")
    for n, screen, run in rows:
        low, high = min(run["ratios"]), max(run["ratios"])
        print(
            f"| {n} | {screen} | {run['base'] * 1e3:.1f} | {run['routed'] * 1e3:.1f} "
            f"| {run['base'] / run['routed']:.2f} | {low:.2f}–{high:.2f} |"
        )


if __name__ == "__main__":
    main()
