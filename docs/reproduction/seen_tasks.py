"""Finding 5 of REPRODUCTION.md: does Arrow catch up with the shared expert on the tasks the library
was trained on, where each task's own expert is among those it routes over?

    python docs/reproduction/seen_tasks.py                  # print the table from the committed record
    python docs/reproduction/seen_tasks.py --library COPY   # run it again (a copy: its evaluation is replaced)

`evaluate COPY --tasks seen --split validation --limit 10 --routers base,arrow,shared`: the 26
seen tasks, 10 validation rows each (an ablation: nothing chosen on test rows). Saved as
`records/seen_tasks_validation.json`; printed with intervals over rows and over tasks.
"""

from __future__ import annotations

import argparse

import records
from records import cell, paired, rows

MEASURES = ("exact_match", "loglik", "mc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=None, help="a copy of the library: run and save the record")
    args = parser.parse_args()
    if args.library:
        record = records.evaluate(
            args.library, tasks="seen", split="validation", limit=10, routers=("base", "arrow", "shared")
        )
        records.save("seen_tasks_validation", record)
    record = records.load("seen_tasks_validation")
    print(f"{len(record['tasks'])} seen tasks, {record['limit']} {record['split']} rows each")
    print("| router | exact match (%) [rows] [tasks] | answer log-likelihood [rows] [tasks] | multiple choice (%) |")
    print("|---|---:|---:|---:|")
    for router in ("base", "arrow", "shared"):
        print(f"| {router} | " + " | ".join(cell(rows(record, router, m), m) for m in MEASURES) + " |")
    cells = [paired(rows(record, "arrow", m), rows(record, "shared", m), m) for m in MEASURES]
    print("| arrow − shared (paired), up/tied/down | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
