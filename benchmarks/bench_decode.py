"""Decode steps and prefill against the base model, alternating in one process: the least noisy ratios.

    python benchmarks/bench_decode.py [--experts 64,256,1024] [--rounds 8] [--steps 10] [--kernel-off]

`bench_arrow.py` times `model.generate` and prefill in a fresh process per cell, so its ratios
mix two processes' luck on a shared machine (the base step itself differs by up to a fifth
between processes). Here one process holds the embedded SmolLM2-135M-Instruct with a library of
random rank-4 experts (q, k, v, o of every layer, stored in bfloat16: bench_arrow's setting) and,
`--rounds` times, times: `--steps` single decoding steps (one token after a 64-token prompt in
the KV cache) of the base model and of Arrow routing (top-k 4), taking turns step by step, then
one prefill forward pass over 8 × 128 tokens (bench_arrow's batch) of each. It reports the
median of each, the median of the per-round ratios to base and their range. `--kernel-off` adds
a third turn to each decoding step, routed with the decoding kernel turned off (the tensor
operations it replaces), to measure what the kernel gives in the same process."""

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


def measure(library: Path, rounds: int, steps: int, kernel_off: bool = False) -> dict:
    """Median step times (s) of the base model and of the routed one, alternating in this one
    process, and each round's ratio of the two."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from lorlib_ui.core import decode_kernel
    from lorlib_ui.core.base_model import fetch_embedded_model
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router

    model = AutoModelForCausalLM.from_pretrained(fetch_embedded_model()).eval()
    rm = RoutedModel(model, None, Library.open(library))
    router = make_router("arrow", rm.experts, top_k=4)
    prompt = torch.randint(100, 40000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    token = torch.tensor([[1234]])

    kernel = decode_kernel._kernel
    variants = {"base": (False, True), "routed": (True, True)}  # (routed, with the kernel)
    if kernel_off:
        variants["kernel off"] = (True, False)

    def step(cache, routed: bool, with_kernel: bool, tokens=token) -> float:
        decode_kernel._kernel = kernel if with_kernel else lambda: None  # what `decodes` asks
        with rm.routing(router) if routed else contextlib.nullcontext():
            start = time.perf_counter()
            model(input_ids=tokens, past_key_values=cache, use_cache=True)
            return time.perf_counter() - start

    def decode_round() -> dict[str, float]:
        """Each variant's median step, the variants taking turns step by step (so that the
        machine's drift, which is large on a shared host, falls on all of them alike)."""
        caches = {name: DynamicCache() for name in variants}
        for name, (routed, with_kernel) in variants.items():
            step(caches[name], routed, with_kernel, prompt)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(steps):
            for name, (routed, with_kernel) in variants.items():
                times[name].append(step(caches[name], routed, with_kernel))
                caches[name].crop(-1)  # every step sees the same 64-token cache
        return {name: statistics.median(values) for name, values in times.items()}

    batch = torch.randint(100, 40000, (8, 128), generator=torch.Generator().manual_seed(2))

    def prefill(routed: bool) -> float:
        with rm.routing(router) if routed else contextlib.nullcontext():
            start = time.perf_counter()
            model(input_ids=batch)
            return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in [*variants, "prefill base", "prefill routed"]}
    with torch.inference_mode():
        decode_round(), prefill(False), prefill(True)  # warm-up
        for _ in range(rounds):
            for name, median in decode_round().items():
                times[name].append(median)
            times["prefill base"].append(prefill(False))
            times["prefill routed"].append(prefill(True))
    return {
        **{key: statistics.median(values) for key, values in times.items()},
        "ratios": [b / r for b, r in zip(times["base"], times["routed"])],
        "prefill ratios": [b / r for b, r in zip(times["prefill base"], times["prefill routed"])],
        "kernel off ratios": [b / r for b, r in zip(times["base"], times.get("kernel off", []))],
        "kernel gains": [off / r for off, r in zip(times.get("kernel off", []), times["routed"])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kernel-off", action="store_true", help="also decode with the decoding kernel turned off")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        import json

        print(json.dumps(measure(Path(args.measure), args.rounds, args.steps, args.kernel_off)))
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
            command += ["--rounds", str(args.rounds), "--steps", str(args.steps)] + ["--kernel-off"] * args.kernel_off
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append((n, json.loads(done.stdout.strip().splitlines()[-1])))
            print(f"{n} experts: done", file=sys.stderr, flush=True)

    print(
        f"Run {date.today()} on {platform.machine()}: Arrow top-k 4, {args.rounds} rounds, one process per row; "
        f"each round times {args.steps} decoding steps after a {PROMPT}-token prompt, the variants taking turns "
        "step by step, then a prefill of 8 x 128 tokens, base and routed in turn.\n"
    )
    _table(
        ["base step ms", "routed step ms", "decode x base (median)", "range"]
        + ["base prefill s", "routed prefill s", "prefill x base (median)", "range"],
        [
            (
                n,
                [f"{run['base'] * 1e3:.1f}", f"{run['routed'] * 1e3:.1f}", *_ratio(run["ratios"])]
                + [f"{run['prefill base']:.2f}", f"{run['prefill routed']:.2f}", *_ratio(run["prefill ratios"])],
            )
            for n, run in rows
        ],
    )
    if args.kernel_off:
        print("\nThe same rounds' third turn, decoding with the decoding kernel turned off (tensor operations):\n")
        _table(
            ["routed step ms", "kernel off step ms", "kernel off x base (median)", "range"]
            + ["kernel's speed-up", "range"],
            [
                (
                    n,
                    [f"{run['routed'] * 1e3:.1f}", f"{run['kernel off'] * 1e3:.1f}", *_ratio(run["kernel off ratios"])]
                    + _ratio(run["kernel gains"]),
                )
                for n, run in rows
            ],
        )


def _table(columns: list[str], rows: list[tuple[int, list[str]]]) -> None:
    """A markdown table, one row per library size; ranges left-aligned, figures right-aligned."""
    print("| experts | " + " | ".join(columns) + " |")
    print("|---:|" + "".join("---|" if c == "range" else "---:|" for c in columns))
    for n, cells in rows:
        print(f"| {n} | " + " | ".join(cells) + " |")


def _ratio(ratios: list[float]) -> list[str]:
    return [f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}–{max(ratios):.2f}"]


if __name__ == "__main__":
    main()
