"""Building N experts one after another in this process, against Ray with 2 workers.

    python benchmarks/bench_ray_build.py [--experts 4] [--steps 30]

Both builds train the same private experts (the first N tasks of the embedded BIG-bench data, rank 4
on q_proj and v_proj, batch 8, seed 0) on the embedded SmolLM2-135M-Instruct, each into a fresh
library: first with the `LocalTrainer` (one process, torch using every core), then with the
`RayTrainer` on a private local Ray of 2 CPUs (2 tasks at a time, one core each). Ray's start-up is
timed apart from the build; each Ray task loads the base model itself, and that is in its time.
Reports wall times, the speed-up and the largest difference between the two builds' weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    import ray

    from lorlib_ui.core.library import Library
    from lorlib_ui.training.building import BuildOptions, LocalTrainer, build_library
    from lorlib_ui.training.config import TrainConfig
    from lorlib_ui.training.data import load_tasks
    from lorlib_ui.worker.ray import RayTrainer, connect

    tasks = load_tasks("default").tasks[: args.experts]
    config = dict(rank=4, targets=("q_proj", "v_proj"), steps=args.steps, batch_size=8, seed=0)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("sequential", lambda: LocalTrainer(bf16="off")), ("ray", lambda: RayTrainer(bf16="off"))):
            if name == "ray":
                start = time.perf_counter()
                connect(None)
                times["ray start"] = time.perf_counter() - start
            start = time.perf_counter()
            options = BuildOptions(tasks=tuple(tasks), shared=False)
            build_library(Path(tmp) / name, options, TrainConfig(**config), trainer=make())
            times[name] = time.perf_counter() - start
        a, b = Library.open(Path(tmp) / "sequential"), Library.open(Path(tmp) / "ray")
        diff = max(
            float((x.float() - y.float()).abs().max())
            for n in a.names
            for m, pair in a.load_adapter(n).factors.items()
            for x, y in zip(pair, b.load_adapter(n).factors[m])
        )
        workers = ray.cluster_resources().get("CPU", 0)
    print(
        f"Run {date.today()} on {platform.machine()} with {os.cpu_count()} cores: {args.experts} experts x "
        f"{args.steps} steps (rank 4, q_proj + v_proj, batch 8, float32) on the embedded SmolLM2-135M-Instruct; "
        f"Ray with {workers:.0f} CPUs, 1 per task.\n"
    )
    print("| build | seconds |\n|---|---:|")
    print(f"| sequential, this process | {times['sequential']:.1f} |")
    print(f"| Ray, 2 tasks at a time | {times['ray']:.1f} |")
    print(f"| (Ray start-up, apart) | {times['ray start']:.1f} |")
    print(
        f"\nSpeed-up: {times['sequential'] / times['ray']:.2f}x (with start-up: "
        f"{times['sequential'] / (times['ray'] + times['ray start']):.2f}x)."
    )
    print(f"Largest weight difference between the two builds: {diff:.2e}.")


if __name__ == "__main__":
    main()
