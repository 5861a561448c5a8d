"""Finding 5 of REPRODUCTION.md, an ablation: is a task's own private expert, alone, as good on its
task as the shared multi-task expert?

    python docs/reproduction/own_expert.py                    # print the table from the committed record
    python docs/reproduction/own_expert.py --library COPY [--limit 10] [--split validation]   # run it again

For every task the library trained a private expert on (a "seen" task), scores that expert alone
and the shared expert alone on the task's rows (validation rows by default: an ablation chooses
nothing on test rows): exact match of the greedy answer and the answer's log-likelihood. Saves
them as `records/own_expert_validation.json` (an evaluation-like record: routers "own" and
"shared", every row's score) and prints each mean over tasks and the paired own − shared, with
intervals over rows and over tasks (`records.py`). If the private experts are weaker than the
shared one even on their own tasks, no routing among them can match it.
"""

from __future__ import annotations

import argparse

import records
from records import cell, paired, rows

MEASURES = ("exact_match", "loglik")


def run(library_path: str, limit: int, split: str) -> dict:
    from lorlib_ui.analysis.evaluation import answer_budget, score_rows, test_rows
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    library = Library.open(library_path)
    own = {e.tasks[0]: e.name for e in library.experts if e.kind == "private" and len(e.tasks) == 1}
    data = load_tasks(library.data_source())
    rm = RoutedModel.load(library, device="cpu")
    task_rows = {task: test_rows(data, task, limit, split) for task in own}
    budgets = {task: answer_budget(rm.tokenizer, data, task) for task in own}
    shared = score_rows(rm, make_router("expert:shared", rm.experts), task_rows, budgets, choices=False)
    mine = {}
    for task, name in own.items():
        mine |= score_rows(
            rm, make_router(f"expert:{name}", rm.experts), {task: task_rows[task]}, budgets, choices=False
        )
    scores = [
        {
            "router": router,
            "task": task,
            "expert": own[task] if router == "own" else "shared",
            "rows": {"exact_match": list(s[task].exact_match), "loglik": list(s[task].loglik), "mc": []},
        }
        for router, s in (("own", mine), ("shared", shared))
        for task in own
    ]
    return {"tasks": list(own), "split": split, "limit": limit, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=None, help="a copy of the library: run and save the record")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()
    if args.library:
        records.save("own_expert_validation", run(args.library, args.limit, args.split))
    record = records.load("own_expert_validation")
    print(f"{len(record['tasks'])} seen tasks, {record['limit']} {record['split']} rows each")
    print("| expert alone | exact match (%) [rows] [tasks] | answer log-likelihood [rows] [tasks] |")
    print("|---|---:|---:|")
    for label, router in (("the task's own private expert", "own"), ("the shared expert", "shared")):
        print(f"| {label} | " + " | ".join(cell(rows(record, router, m), m) for m in MEASURES) + " |")
    cells = [paired(rows(record, "own", m), rows(record, "shared", m), m) for m in MEASURES]
    print("| own − shared (paired), up/tied/down | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
