"""REPRODUCTION.md, out of family: do the routers help on tasks that nothing in the library is close to?

    python docs/reproduction/unused_tasks.py                    # print the tables from the committed record
    python docs/reproduction/unused_tasks.py --library COPY     # run it again (a copy: its evaluation is replaced)

The embedded data has 64 tasks; the library trained on 26 and holds 7 out (one per family of its
7). The other 31 tasks belong to 7 families with no expert at all. `evaluate --tasks unused`
scores the routers on their test rows (20 per task, `--limit 20`, to keep the run under an hour on
2 CPU cores): zero-shot transfer with nothing in the library from the task's family. Saved as
`records/unused_tasks_test.json`; printed beside the same comparisons on the 7 held-out tasks
(the shipped library's test-row record), with both intervals and the per-task sign counts.
"""

from __future__ import annotations

import argparse

import records
from records import cell, paired, rows

ROUTERS = ("base", "uniform", "arrow", "arrow-cluster", "shared")
PAIRS = (("arrow", "uniform"), ("arrow", "shared"), ("arrow-cluster", "arrow"), ("arrow", "base"))
MEASURES = ("exact_match", "loglik", "mc")


def tables(record: dict, title: str) -> str:
    tasks = record["tasks"]
    lines = [
        f"{title}: {len(tasks)} tasks, at most {record.get('limit') or 'all'} test rows each",
        "",
        "| router | exact match (%) | answer log-likelihood | multiple choice (%) |",
        "|---|---:|---:|---:|",
    ]
    for router in ROUTERS:
        lines.append(f"| {router} | " + " | ".join(cell(rows(record, router, m), m) for m in MEASURES) + " |")
    lines += ["", "| paired difference | exact match (points) | answer log-likelihood | multiple choice (points) |"]
    lines.append("|---|---:|---:|---:|")
    for a, b in PAIRS:
        cells = [paired(rows(record, a, m), rows(record, b, m), m) for m in MEASURES]
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=None, help="a copy of the library: run and save the record")
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()
    if args.library:
        record = records.evaluate(args.library, tasks="unused", limit=args.limit, routers=ROUTERS)
        records.save("unused_tasks_test", record)
    unused = records.load("unused_tasks_test")
    print(tables(unused, "tasks of families with no expert"))
    print()
    print(tables(records.shipped(), "the held-out tasks (one per family of the library)"))
    families = sorted({s["family"] for s in unused["scores"]})
    print(f"\nfamilies with no expert: {', '.join(families)}")


if __name__ == "__main__":
    main()
