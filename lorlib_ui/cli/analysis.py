"""The commands that judge experts and routers: `evaluate` (routers compared on held-out tasks),
`adapt` (ways of learning a new task, scored), `transfer` (each expert alone on each task) and
`routing-stats` (where a router sends each task's tokens, and whether that agrees with transfer).
Options are parsed in `lorlib_ui.cli.main`.
"""

from __future__ import annotations

import json
import math
import sys
import time

from lorlib_ui.cli.progress import csv_list, log, positive, record_history, task_bar, with_expert_bars
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.config import TASK_SETS


def cmd_evaluate(args) -> None:
    from lorlib_ui.analysis.evaluation import evaluate_library, format_differences, format_table
    from lorlib_ui.training.config import TASK_SETS

    tasks = args.tasks if args.tasks in TASK_SETS else (csv_list(args.tasks) or [])
    routers = None if args.routers is None else (csv_list(args.routers) or [])
    positive(limit=args.limit)
    bar, bars = task_bar("evaluate", "task")  # made at the first progress event: a refusal prints one line only

    def progress(done, total, router, task):
        bar(done, total, f"{router} on {task}")

    try:
        record, notes = evaluate_library(
            args.library,
            tasks,
            routers,
            args.data,
            args.limit,
            args.device,
            args.dtype,
            progress,
            split=args.split,
            top_k=args.top_k,
            shots=args.shots,
            density=args.density,
        )
    finally:
        for bar in bars:
            bar.close()
    record_history(args.library, args.argv, record["seconds"])
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps(record))
        return
    rows = "" if record["split"] == "test" else f", on {record['split']} rows"
    print(f"zero-shot on {len(record['tasks'])} tasks ({', '.join(record['tasks'])}){rows}, {record['seconds']:.0f} s")
    print("means over tasks; [95% bootstrap interval over test rows]")
    for kind, summary in (record.get("summary_by") or {"": record["summary"]}).items():
        print(f"\n{kind} tasks:" if kind else "")
        print(format_table(summary))
    if record["differences"]:
        print("\npaired differences, over the same test rows:")
        print(format_differences(record["differences"]))


def cmd_adapt(args) -> None:
    from lorlib_ui.analysis.adaptation_runs import adapt_library, format_curve, format_runs
    from lorlib_ui.analysis.evaluation import format_differences, format_table

    try:
        shots = [int(x) for x in csv_list(args.shots) or []]
    except ValueError:
        raise LorlibError(f"--shots takes whole numbers separated by commas, got {args.shots!r}") from None
    positive(steps=args.steps, budget=args.budget, limit=args.limit)
    record, notes = with_expert_bars(
        lambda progress: adapt_library(
            args.library,
            args.task,
            data=args.data,
            shots=shots,
            methods=csv_list(args.methods),
            steps=args.steps,
            seed=args.seed,
            limit=args.limit,
            budget=args.budget,
            force=args.force,
            device=args.device,
            progress=progress,
            log=log,
        )
    )
    record_history(args.library, args.argv, record["seconds"])
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps(record))
        return
    rows = record["zero_shot"][0]["examples"]
    print(f"{record['task']}: {rows} test rows, {record['steps']} training steps, seed {record['seed']}")
    print("[95% bootstrap interval over test rows]")
    print(format_table(record["summary"]))
    print("\npaired differences, over the same test rows:")
    print(format_differences(record["differences"]))
    print("\ntraining:")
    print(format_runs(record))
    if curve := format_curve(record):
        print("\nlearning curve, exact match % (answer log-likelihood):")
        print(curve)


def _tasks(text: str) -> str | list[str]:
    return text if text in TASK_SETS else (csv_list(text) or [])


def cmd_transfer(args) -> None:
    from lorlib_ui.analysis.transfer import transfer_library
    from lorlib_ui.core.library import KINDS

    experts = (
        None if args.experts is None else (args.experts if args.experts in KINDS else csv_list(args.experts) or [])
    )
    progress, bars = task_bar("transfer", "expert")
    start = time.perf_counter()
    try:
        matrix, counts = transfer_library(
            args.library,
            _tasks(args.tasks),
            experts,
            args.data,
            args.limit,
            args.exact_match,
            args.device,
            args.dtype,
            progress,
        )
    finally:
        for bar in bars:
            bar.close()
    seconds = time.perf_counter() - start
    if counts["computed"]:
        record_history(args.library, args.argv, seconds)
    print(f"computed {counts['computed']} cells, reused {counts['reused']}, in {seconds:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(matrix.to_dict() | counts))
        return
    print(format_matrix(matrix))


def format_matrix(matrix) -> str:
    """Gain in answer log-likelihood over the base model, tasks down, experts across (transposed
    when there are more experts than tasks, which reads better in a terminal)."""
    gain = matrix.gain()
    experts = [c for c in matrix.columns if c != "base"]
    cols = [matrix.columns.index(c) for c in experts]
    width = max(len(t) for t in matrix.tasks)
    lines = ["gain in mean answer log-likelihood over the base model (expert alone, per task):"]
    lines.append(" " * 42 + "  ".join(f"{t[:width]:>{width}}" for t in matrix.tasks))
    for j, name in zip(cols, experts):
        cells = [f"{'-' if not math.isfinite(g) else f'{g:+.2f}':>{width}}" for g in gain[:, j]]
        lines.append(f"{name[:40]:<40}  " + "  ".join(cells))
    base = [f"{'-' if not math.isfinite(v) else f'{v:.2f}':>{width}}" for v in matrix.loglik[:, 0]]
    lines.append(f"{'(base model log-likelihood)':<40}  " + "  ".join(base))
    return "\n".join(lines)


def cmd_routing_stats(args) -> None:
    from lorlib_ui.analysis.routing_stats import routing_stats_library

    progress, bars = task_bar("routing", "task")
    try:
        results = routing_stats_library(
            args.library,
            args.router,
            _tasks(args.tasks),
            args.data,
            args.limit,
            args.top_k,
            args.temperature,
            args.mix,
            args.base_model,
            args.device,
            args.dtype,
            progress,
            density=args.density,
        )
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        print(json.dumps({kind: result.to_dict() for kind, result in results.items()}, allow_nan=False, default=str))
        return
    for kind, result in results.items():
        print(format_stats(result, kind))


def format_stats(result, kind: str) -> str:
    def pct(x) -> str:
        return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"

    def num(x, digits=2) -> str:
        return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"

    def ci(pair) -> str:
        return "" if pair is None else f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"

    s = result.summary()
    what = "all prompt tokens (chat template included)" if kind == "all" else "content tokens (template excluded)"
    lines = [
        f"{result.router} over {len(result.tasks)} tasks, {what}:",
        f"  top-1 is the task's own expert: {pct(s['own_accuracy'])}{ci(s['own_accuracy_ci'])} "
        f"(chance {pct(s['own_chance'])}, "
        f"{s['own_tasks']} tasks with an expert of their own)",
        f"  top-1 is an expert of the task's family: {pct(s['family_accuracy'])}{ci(s['family_accuracy_ci'])} "
        f"(chance {pct(s['family_chance'])}, "
        f"{s['family_tasks']} tasks)",
        f"  routing entropy: {num(s['entropy'])} nats (uniform over the usable experts: {num(s['uniform_entropy'])})",
        f"  Spearman(routing mass, transfer gain), mean over tasks: {num(s['spearman'])}",
        "  task | own | family (chance) | most routed | its gain | best gain | Spearman",
    ]
    for row in result.per_task():
        lines.append(
            f"  {row['task']} | {pct(row['own_accuracy'])} | {pct(row['family_accuracy'])} "
            f"({pct(row['family_chance'])}) | {row['most_routed']} | {num(row.get('most_routed_gain'))} | "
            f"{num(row.get('best_gain'))} | {num(row.get('spearman'))}"
        )
    if result.transfer.get("note"):
        lines.append(f"  ({result.transfer['note']})")
    return "\n".join(lines)
