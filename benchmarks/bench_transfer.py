"""Transfer-matrix speed: every expert alone, and the base model, on every task's test rows.

    python benchmarks/bench_transfer.py [--library assets/library] [--tasks held-out|seen|all] [--limit 20]

Copies the library to a temporary folder without its stored transfer matrix, then times what
`python -m lorlib_ui transfer LIBRARY --tasks ... --limit N` computes: loading the routed model,
then one batched scoring pass per column (the base model and each expert alone) over all the
tasks' rows. Prints the total, seconds per column and per scored row, and a Markdown line for
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=str(ROOT / "assets" / "library"))
    parser.add_argument("--tasks", default="held-out")
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()

    import torch

    from lorlib_ui.analysis.transfer import TransferOptions, transfer_library
    from lorlib_ui.core.library import Library
    from lorlib_ui.training.reporter import Reporter

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "library"
        shutil.copytree(args.library, copy)
        (copy / "transfer.json").unlink(missing_ok=True)
        columns_done = []
        start = time.perf_counter()
        options = TransferOptions(tasks=args.tasks, limit=args.limit, device="cpu")
        reporter = Reporter(progress=lambda count: columns_done.append(count.what))
        matrix, counts = transfer_library(str(copy), options, reporter)
        seconds = time.perf_counter() - start
        rows = int(matrix.rows[:, 0].sum())
        experts = len(Library.open(copy).experts)
    columns = len(matrix.columns)
    print(f"{len(matrix.tasks)} tasks x {columns} columns (base + {experts} experts), {rows} rows per column")
    per_row = 1000 * seconds / (rows * columns)
    print(f"total {seconds:.0f} s; {seconds / columns:.1f} s per column; {per_row:.0f} ms per row")
    cpu = platform.processor() or platform.machine()
    print(
        f"| {date.today()} | {args.tasks} | {len(matrix.tasks)} | {columns} | {args.limit} | {rows * columns} "
        f"| {seconds / 60:.1f} | {seconds / columns:.1f} | {cpu}, {torch.get_num_threads()} threads |"
    )


if __name__ == "__main__":
    main()
