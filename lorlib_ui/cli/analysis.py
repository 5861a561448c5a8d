"""The commands that judge experts and routers: `evaluate` (routers compared on held-out tasks),
`adapt` (ways of learning a new task, scored), `transfer` (each expert alone on each task) and
`routing-stats` (where a router sends each task's tokens, and whether that agrees with transfer).
Their flags are made in `lorlib_ui.cli.main` from the options dataclasses of the entry points they
call (`EvaluateOptions`, `AdaptOptions`, `TransferOptions`, `RoutingStatsOptions`), which these
functions read back from the parsed flags.
"""

from __future__ import annotations

import json
import math
import sys
import time

from lorlib_ui.analysis.adaptation_runs import ZERO_SHOT, AdaptOptions, adapt_library
from lorlib_ui.analysis.evaluation import EvaluateOptions, plan_evaluation, run_evaluation
from lorlib_ui.analysis.routing_stats import RoutingStatsOptions, routing_stats_library
from lorlib_ui.analysis.summaries import (
    INTERVALS_NOTE,
    across_libraries,
    format_across,
    format_differences,
    format_table,
)
from lorlib_ui.analysis.transfer import TransferOptions, transfer_library
from lorlib_ui.cli.progress import Bars, record_history
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.options import from_namespace


def cmd_evaluate(args) -> None:
    """One library, or several of one design (the same base model and held-out tasks) evaluated in
    turn with the same options, then their spread (`across_libraries`); `--stored` reports the
    evaluations the libraries store instead."""
    paths, options = args.library, from_namespace(EvaluateOptions, args)
    if len(paths) > 1:
        _same_design(paths)
    if args.stored:
        if options != EvaluateOptions():
            raise LorlibError("--stored runs nothing: it takes no evaluation options")
        records = {path: _stored_evaluation(path) for path in paths}
    else:
        plans = [plan_evaluation(path, options) for path in paths]  # every library checked before any runs
        records = {}
        for path, plan in zip(paths, plans):
            with Bars("evaluate", "task") as reporter:
                records[path], notes = run_evaluation(plan, reporter)
            record_history(path, args.argv, records[path]["seconds"])
            for note in notes:
                print(note, file=sys.stderr)
    across = across_libraries(list(records.values()), paths) if len(paths) > 1 else None
    if args.json:
        print(json.dumps(records[paths[0]] if across is None else {"libraries": records, "across": across}))
        return
    for path, record in records.items():
        if across is not None or args.stored:
            stored = f" (stored, evaluated {record.get('finished')})" if args.stored else ""
            print(f"\n## {path}{stored}\n" if across is not None else f"{path}{stored}")
        print_evaluation(record)
    if across is not None:
        print("\n## across libraries\n")
        print(format_across(across))


def _same_design(paths: list[str]) -> None:
    """Refuse libraries named twice, or of different base models or held-out tasks."""
    from lorlib_ui.core.library import Library

    if len(set(paths)) < len(paths):
        raise LorlibError(f"a library is named twice: {' '.join(paths)}")
    libraries = [Library.open(path) for path in paths]
    for library in libraries[1:]:
        if library.base_fingerprint != libraries[0].base_fingerprint:
            raise LorlibError(f"libraries {paths[0]} and {library.path} are on different base models")
        if set(library.held_out.tasks) != set(libraries[0].held_out.tasks):
            raise LorlibError(f"libraries {paths[0]} and {library.path} hold out different tasks")


def _stored_evaluation(path: str) -> dict:
    from lorlib_ui.core.library import Library

    record = Library.open(path).extra.get("evaluation")
    if not record:
        raise LorlibError(f"library {path} stores no evaluation; run `lorlib evaluate {path}` first")
    return record


def print_evaluation(record: dict) -> None:
    """One library's evaluation: each router's measures, then the paired differences."""
    rows = "" if record["split"] == "test" else f", on {record['split']} rows"
    print(f"zero-shot on {len(record['tasks'])} tasks ({', '.join(record['tasks'])}){rows}, {record['seconds']:.0f} s")
    print(f"means over tasks. {INTERVALS_NOTE}")
    for kind, summary in (record.get("summary_by") or {"": record["summary"]}).items():
        print(f"\n{kind} tasks:" if kind else "")
        print(format_table(summary))
    if record["differences"]:
        print("\npaired differences, over the same test rows:")
        print(format_differences(record["differences"]))


def cmd_adapt(args) -> None:
    with Bars(resumable=True) as reporter:
        record, notes = adapt_library(args.library, from_namespace(AdaptOptions, args), reporter)
    record_history(args.library, args.argv, record["seconds"])
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps(record))
        return
    rows = record["zero_shot"][0]["examples"]
    print(f"{record['task']}: {rows} test rows, {record['steps']} training steps, seed {record['seed']}")
    print(INTERVALS_NOTE)
    print(format_table(record["summary"]))
    print("\npaired differences, over the same test rows:")
    print(format_differences(record["differences"]))
    print("\ntraining:")
    print(format_runs(record))
    if curve := format_curve(record):
        print("\nlearning curve, exact match % (answer log-likelihood):")
        print(curve)


def cmd_transfer(args) -> None:
    start = time.perf_counter()
    with Bars("transfer", "expert") as reporter:
        matrix, counts = transfer_library(args.library, from_namespace(TransferOptions, args), reporter)
    seconds = time.perf_counter() - start
    if counts["computed"]:
        record_history(args.library, args.argv, seconds)
    print(f"computed {counts['computed']} cells, reused {counts['reused']}, in {seconds:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(matrix.to_dict() | counts))
        return
    print(format_matrix(matrix))


def format_runs(record: dict) -> str:
    """Each method's training as a Markdown table: shots, steps, seconds, first and final loss."""
    lines = ["| method | shots | stored as | training s | first loss | final loss |", "|---|---:|---|---:|---:|---:|"]
    for run in record["runs"]:
        cells = [_number(run.get(k), d) for k, d in (("training_seconds", 0), ("first_loss", 3), ("final_loss", 3))]
        lines.append(f"| {run['method']} | {run['shots']} | {run['router']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def format_curve(record: dict) -> str:
    """Exact match (%) and answer log-likelihood of each method by number of shots (a learning
    curve), beside zero-shot Arrow and the base model; empty with one number of shots."""
    shots = sorted({run["shots"] for run in record["runs"]})
    if len(shots) < 2:
        return ""
    zero = {s["router"]: s for s in record["zero_shot"]}
    head = "| method | " + " | ".join(f"{n} shots" for n in shots) + " |"
    lines = [head, "|---|" + "---:|" * len(shots)]
    for name in ZERO_SHOT:
        cell = _cell(zero[name])
        lines.append(f"| {name} (zero-shot) | " + " | ".join(cell for _ in shots) + " |")
    for method in dict.fromkeys(run["method"] for run in record["runs"]):
        by_shots = {run["shots"]: run["score"] for run in record["runs"] if run["method"] == method}
        lines.append(f"| {method} | " + " | ".join(_cell(by_shots[n]) if n in by_shots else "-" for n in shots) + " |")
    return "\n".join(lines)


def _cell(score: dict) -> str:
    return f"{100 * score['exact_match']:.1f} ({score['loglik']:.3f})"


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
    with Bars("routing", "task") as reporter:
        results = routing_stats_library(args.library, from_namespace(RoutingStatsOptions, args), reporter)
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

    def above(counts) -> str:
        return (
            "" if not counts else f"; above/at/below chance on {counts['up']}/{counts['tied']}/{counts['down']} tasks"
        )

    s = result.summary()
    what = "all prompt tokens (chat template included)" if kind == "all" else "content tokens (template excluded)"
    lines = [
        f"{result.router} over {len(result.tasks)} tasks, {what}:",
        "  95% intervals: [prompts] resamples each task's prompts; [tasks] resamples the tasks too",
        f"  top-1 is the task's own expert: {pct(s['own_accuracy'])}{ci(s['own_accuracy_ci'])}"
        f"{ci(s['own_accuracy_task_ci'])} (chance {pct(s['own_chance'])}, "
        f"{s['own_tasks']} tasks with an expert of their own{above(s['own_above_chance'])})",
        f"  top-1 is an expert of the task's family: {pct(s['family_accuracy'])}{ci(s['family_accuracy_ci'])}"
        f"{ci(s['family_accuracy_task_ci'])} (chance {pct(s['family_chance'])}, "
        f"{s['family_tasks']} tasks{above(s['family_above_chance'])})",
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
