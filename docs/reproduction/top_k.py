"""Findings 4 and 5 of REPRODUCTION.md, an ablation: how many experts should Arrow mix per token?

    python docs/reproduction/top_k.py --library COPY [--top-k 1,2,4,7,26] [--limit 20]
    python docs/reproduction/top_k.py --records shared.json k1.json k2.json ...   # tabulate saved runs

Evaluates Arrow over the private experts and over the MBC cluster experts at each top-k (the
cluster router only up to its number of experts), and the shared expert once, on validation rows
of the held-out tasks (an ablation chooses nothing on test rows), each with `evaluate_library`
(which stores its record in the library: use a copy). Prints exact match and answer
log-likelihood with 95% bootstrap intervals, and the paired differences arrow − shared and
arrow-cluster − arrow at every k. `--records` tabulates `evaluate --json` outputs saved earlier
instead (each run's `top_k` is in its record).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _rows(record: dict, router: str, measure: str) -> dict[str, list[float]]:
    return {s["task"]: s["rows"][measure] for s in record["scores"] if s["router"] == router}


def _cell(values: list[list[float]], scale: float, digits: int) -> str:
    from lorlib_ui.analysis.stats import bootstrap_interval, task_mean

    low, high = bootstrap_interval(values)
    return f"{scale * task_mean(values):.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def _paired(a: dict, b: dict, scale: float, digits: int) -> str:
    from lorlib_ui.analysis.stats import paired_interval

    tasks = [t for t in a if t in b]
    d, low, high = paired_interval([a[t] for t in tasks], [b[t] for t in tasks])
    return f"{scale * d:+.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def tabulate(shared: dict, by_k: dict[int, dict]) -> str:
    measures = (("exact_match", 100, 1), ("loglik", 1, 3))
    lines = [
        "| top-k | arrow: exact match | arrow: log-lik. | arrow-cluster: exact match | arrow-cluster: log-lik. "
        "| arrow − shared: EM | arrow − shared: LL | arrow-cluster − arrow: EM | arrow-cluster − arrow: LL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, record in sorted(by_k.items()):
        cells = []
        for router in ("arrow", "arrow-cluster"):
            for measure, scale, digits in measures:
                rows = list(_rows(record, router, measure).values())
                cells.append(_cell(rows, scale, digits) if rows else "-")  # k above the cluster count
        for a, b in ((("arrow", record), ("shared", shared)), (("arrow-cluster", record), ("arrow", record))):
            for measure, scale, digits in measures:
                left, right = _rows(a[1], a[0], measure), _rows(b[1], b[0], measure)
                cells.append(_paired(left, right, scale, digits) if left and right else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    for measure, scale, digits in measures:
        lines.append(f"\nshared, {measure}: {_cell(list(_rows(shared, 'shared', measure).values()), scale, digits)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=None, help="a copy of the library (its evaluation record is replaced)")
    parser.add_argument("--top-k", default="1,2,4,7,26", help="7 and 26: every cluster / private expert here")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--records", nargs="+", default=None, help="`evaluate --json` outputs to tabulate instead")
    args = parser.parse_args()
    if args.records:
        records = [json.loads(Path(f).read_text()) for f in args.records]
        shared = next(r for r in records if any(s["router"] == "shared" for s in r["scores"]))
        by_k = {r["top_k"]: r for r in records if any(s["router"] == "arrow" for s in r["scores"])}
    elif args.library:
        from lorlib_ui.analysis.evaluation import EvaluateOptions, evaluate_library
        from lorlib_ui.core.library import Library

        def run(routers: list[str], k: int | None) -> dict:
            options = EvaluateOptions(routers=tuple(routers), limit=args.limit, split="validation", top_k=k)
            return evaluate_library(args.library, options)[0]

        shared = run(["shared"], None)
        clusters = sum(e.kind == "cluster" for e in Library.open(args.library).experts)
        by_k = {}
        for k in map(int, args.top_k.split(",")):
            by_k[k] = run(["arrow", "arrow-cluster"] if k <= clusters else ["arrow"], k)
    else:
        parser.error("give --library COPY or --records FILES")
    print(tabulate(shared, by_k))


if __name__ == "__main__":
    main()
