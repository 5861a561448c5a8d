"""Supervised adaptation's cost: seconds per training step of a Poly router over the library, with the
experts frozen (poly-router) and trained (poly-full), against a new LoRA from scratch, in one run.

    python benchmarks/bench_adapt.py [--experts 34,256] [--steps 8] [--task linguistic_mappings.plural_regular_json]

Every method trains on the same 32 examples of one task of the embedded BIG-bench data, batch 8,
from the embedded SmolLM2-135M-Instruct in float32, with the loop `adapt` uses
(`lorlib_ui.training.training.fit`). scratch is a rank-4 LoRA on q, k, v, o (PEFT, the `build`
trainer); the routers mix N random rank-4 experts on the same modules (stored in bfloat16, as
trained experts are). Each cell runs in a fresh process: the first step is a warm-up, the median
of the other steps is reported, with the process's peak resident memory and the numbers trained.
"""

from __future__ import annotations

import argparse
import json
import os
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

SHOTS, BATCH, RANK = 32, 8, 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _pairs(task: str) -> list[tuple[str, str]]:
    from lorlib_ui.training.data import load_tasks

    rows = load_tasks("default").rows(task, "train")[:SHOTS]
    return [(row["input"], row["output"]) for row in rows]


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _step_times(progress_times: list[float]) -> float:
    """Median seconds per step, the first step (warm-up) left out."""
    gaps = [b - a for a, b in zip(progress_times, progress_times[1:])]
    return statistics.median(gaps)


def run_cell(method: str, n: int, work: Path, base_dir: Path, task: str, steps: int) -> dict:
    import torch

    from lorlib_ui.core.base_model import load_base_model
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.training.adaptation_methods import train_poly, trainable_numbers
    from lorlib_ui.training.config import TrainConfig
    from lorlib_ui.training.training import train_expert

    torch.manual_seed(0)
    config = TrainConfig(rank=RANK, targets=TARGETS, steps=steps, batch_size=BATCH, learning_rate=1e-3)
    pairs = _pairs(task)
    times = []

    def progress(step, total, loss):
        times.append(time.perf_counter())

    start = time.perf_counter()
    if method == "scratch":
        model, tokenizer = load_base_model(str(base_dir), device="cpu", dtype="float32")
        times.append(time.perf_counter())
        result = train_expert(model, tokenizer, pairs, config, progress)
        trained = sum(a.numel() + b.numel() for a, b in result.adapter.factors.values())
    else:
        library = Library.open(work / f"library{n}")
        rm = RoutedModel.load(library, base_model=str(base_dir), device="cpu", dtype="float32")
        full = method == "poly-full"
        trained = trainable_numbers(rm, rm.experts, full)
        times.append(time.perf_counter())
        train_poly(rm, rm.experts, pairs, config, full, progress)
    return {
        "method": method,
        "experts": n,
        "s_per_step": _step_times(times[1:]),
        "first_step_s": times[1] - times[0],
        "trained_numbers": trained,
        "peak_mb": _peak_mb(),
        "seconds": time.perf_counter() - start,
    }


def _subprocess(args: list[str], method: str, n: int) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "experts": n, "error": last[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", default="34,256")
    parser.add_argument("--steps", type=int, default=8, help="training steps per cell (the first is a warm-up)")
    parser.add_argument("--task", default="linguistic_mappings.plural_regular_json")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--cell", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from lorlib_ui.core.base_model import fetch_embedded_model

    base_dir = fetch_embedded_model()
    if args.cell:
        method, n = args.cell[0], int(args.cell[1])
        print(json.dumps(run_cell(method, n, Path(args.work), base_dir, args.task, args.steps)))
        return

    from bench_arrow import make_experts, make_libraries

    counts = [int(x) for x in args.experts.split(",")]
    with tempfile.TemporaryDirectory(prefix="lorlib-bench-adapt-") as tmp:
        work = Path(tmp)
        make_libraries(work, make_experts(work, max(counts), base_dir), counts, base_dir, kind="private")
        common = ["--work", str(work), "--steps", str(args.steps), "--task", args.task]
        rows = [_subprocess(["--cell", "scratch", "0", *common], "scratch", 0)]
        for n in counts:
            for method in ("poly-router", "poly-full"):
                rows.append(_subprocess(["--cell", method, str(n), *common], method, n))
                print(f"done {method} at {n} experts", file=sys.stderr, flush=True)
    table = render(rows, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def render(rows: list[dict], args) -> str:
    scratch = rows[0]
    lines = [
        f"Run {date.today().isoformat()} on {platform.machine()} with {os.cpu_count()} cores, "
        f"torch {__import__('torch').__version__}; {SHOTS} examples of {args.task}, batch {BATCH}, "
        f"{args.steps} steps per cell (median of all but the first), model in float32, experts rank {RANK} "
        f"on {', '.join(TARGETS)} stored in bfloat16.",
        "",
        "| method | experts | s / step | x scratch | numbers trained | peak MB | extra peak MB vs scratch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['experts']} | could not run: {row['error']} | | | | |")
            continue
        experts = row["experts"] or "-"
        ratio = row["s_per_step"] / scratch["s_per_step"] if "error" not in scratch else float("nan")
        extra = row["peak_mb"] - scratch["peak_mb"] if "error" not in scratch else float("nan")
        lines.append(
            f"| {row['method']} | {experts} | {row['s_per_step']:.2f} | {ratio:.2f} | {row['trained_numbers']:,} | "
            f"{row['peak_mb']:.0f} | {extra:+.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
