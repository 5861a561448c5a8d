"""Finding 5 of REPRODUCTION.md, an ablation: is a task's own private expert, alone, as good on its
task as the shared multi-task expert?

    python docs/reproduction/own_expert.py [--library assets/library] [--limit 10] [--split validation]

For every task the library trained a private expert on (a "seen" task), scores that expert alone
and the shared expert alone on the task's rows (validation rows by default: an ablation chooses
nothing on test rows): exact match of the greedy answer and the answer's log-likelihood, each mean
over tasks with a paired 95% bootstrap interval for own − shared. If the private experts are
weaker than the shared one even on their own tasks, no routing among them can match it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=str(ROOT / "assets" / "library"))
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()

    from lorlib_ui.analysis.evaluation import answer_budget, score_rows, test_rows
    from lorlib_ui.analysis.stats import bootstrap_interval, paired_interval, task_mean
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    library = Library.open(args.library)
    own = {e.tasks[0]: e.name for e in library.experts if e.kind == "private" and len(e.tasks) == 1}
    data = load_tasks(library.data_source())
    rm = RoutedModel.load(library, device="cpu")
    rows = {task: test_rows(data, task, args.limit, args.split) for task in own}
    budgets = {task: answer_budget(rm.tokenizer, data, task) for task in own}
    shared = score_rows(rm, make_router("expert:shared", rm.experts), rows, budgets, choices=False)
    mine = {}
    for task, name in own.items():
        mine |= score_rows(rm, make_router(f"expert:{name}", rm.experts), {task: rows[task]}, budgets, choices=False)
    print(f"{len(own)} seen tasks, {args.limit} {args.split} rows each")
    print("| expert alone | exact match (%) | answer log-likelihood |")
    print("|---|---:|---:|")
    for label, scores in (("the task's own private expert", mine), ("the shared expert", shared)):
        em = [scores[t].exact_match for t in own]
        ll = [scores[t].loglik for t in own]
        (el, eh), (ll_low, ll_high) = bootstrap_interval(em), bootstrap_interval(ll)
        print(
            f"| {label} | {100 * task_mean(em):.1f} [{100 * el:.1f}, {100 * eh:.1f}] "
            f"| {task_mean(ll):.3f} [{ll_low:.3f}, {ll_high:.3f}] |"
        )
    d, low, high = paired_interval([mine[t].exact_match for t in own], [shared[t].exact_match for t in own])
    print(f"own − shared, exact match: {100 * d:+.1f} points [{100 * low:.1f}, {100 * high:.1f}]")
    d, low, high = paired_interval([mine[t].loglik for t in own], [shared[t].loglik for t in own])
    print(f"own − shared, log-likelihood: {d:+.3f} [{low:.3f}, {high:.3f}]")
    better = sum(task_mean([mine[t].loglik]) > task_mean([shared[t].loglik]) for t in own)
    print(f"tasks where the own expert has the higher log-likelihood: {better} of {len(own)}")


if __name__ == "__main__":
    main()
