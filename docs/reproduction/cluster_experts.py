"""Finding 4 of REPRODUCTION.md, an ablation: on the tasks it trained on, is an MBC cluster expert,
alone, as good as the task's own private expert? And the shared expert?

    python docs/reproduction/cluster_experts.py [--library assets/library]

Reads the library's stored transfer matrix (run `python -m lorlib_ui transfer LIBRARY --tasks seen`
first; nothing is scored here). For every seen task (one the library trained a private expert
on), takes the per-row answer log-likelihood of the task's private expert alone, of the cluster
expert whose training tasks include it alone, and of the shared expert alone, on the same test
rows; prints the means over tasks with 95% bootstrap intervals and the paired differences. Arrow
over cluster experts can only be as good as the cluster experts are on their own tasks.
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
    args = parser.parse_args()

    from lorlib_ui.analysis.stats import bootstrap_interval, paired_interval, task_mean
    from lorlib_ui.analysis.transfer import load_transfer
    from lorlib_ui.core.library import Library

    library = Library.open(args.library)
    matrix = load_transfer(library)
    if matrix is None:
        sys.exit("no transfer matrix stored: run `python -m lorlib_ui transfer LIBRARY --tasks seen`")
    own = {e.tasks[0]: e.name for e in library.experts if e.kind == "private" and len(e.tasks) == 1}
    cluster = {t: e.name for e in library.experts if e.kind == "cluster" for t in e.tasks}
    columns = {"private": own, "cluster": cluster, "shared": {t: "shared" for t in own}}
    tasks = [t for t in own if t in cluster and all((t, c[t]) in matrix.per_row for c in columns.values())]
    if not tasks:
        sys.exit("the stored matrix has no seen task with its private, cluster and shared cells")
    rows = {label: [matrix.per_row[t, by_task[t]]["loglik"] for t in tasks] for label, by_task in columns.items()}
    per_cluster = {e.name: len(e.tasks) for e in library.experts if e.kind == "cluster"}
    steps = {e.name: (e.training or {}).get("steps") for e in library.experts}
    print(f"{len(tasks)} seen tasks, {int(matrix.rows[0].max())} test rows each at most; answer log-likelihood")
    print("| expert alone | mean over tasks | 95% interval | optimizer steps on the task |")
    print("|---|---:|---:|---|")
    for label, values in rows.items():
        low, high = bootstrap_interval(values)
        if label == "cluster":
            spent = sorted({round(steps[cluster[t]] / per_cluster[cluster[t]], 1) for t in tasks})
            note = f"{spent[0]}–{spent[-1]} (the cluster's steps shared by its tasks)"
        elif label == "shared":
            note = f"{steps['shared'] / len(own):.1f} ({steps['shared']} over {len(own)} tasks)"
        else:
            note = str(steps[own[tasks[0]]])
        print(f"| {label} | {task_mean(values):.3f} | [{low:.3f}, {high:.3f}] | {note} |")
    for a, b in (("cluster", "private"), ("shared", "private"), ("cluster", "shared")):
        d, low, high = paired_interval(rows[a], rows[b])
        wins = sum(task_mean([x]) > task_mean([y]) for x, y in zip(rows[a], rows[b]))
        print(f"{a} − {b}: {d:+.3f} [{low:.3f}, {high:.3f}]; {a} higher on {wins} of {len(tasks)} tasks")

    held = [t for t in library.held_out.tasks if t in matrix.tasks]
    kinds = {e.name: e.kind for e in library.experts}
    gain = matrix.gain()
    print(
        "\n| held-out task | best private expert alone | best cluster expert alone | shared "
        "| mean gain: private / cluster |"
    )
    print("|---|---|---|---:|---:|")
    for task in held:
        row = {c: gain[matrix.tasks.index(task), j] for j, c in enumerate(matrix.columns) if c in kinds}
        best = {}
        for kind in ("private", "cluster"):
            values = {c: v for c, v in row.items() if kinds[c] == kind}
            top = max(values, key=values.get)
            best[kind] = (f"{row[top]:.2f} ({top})", sum(values.values()) / len(values))
        print(
            f"| {task} | {best['private'][0]} | {best['cluster'][0]} | {row.get('shared', float('nan')):.2f} "
            f"| {best['private'][1]:.2f} / {best['cluster'][1]:.2f} |"
        )


if __name__ == "__main__":
    main()
