"""From an evaluation's scores to its conclusions: each router's mean over tasks with 95%
intervals over rows and over tasks (`lorlib_ui.analysis.stats`), the paired differences the
paper's claims rest on with per-task sign counts, the spread of several libraries' evaluations,
and the Markdown tables the commands print.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from lorlib_ui.analysis import stats
from lorlib_ui.core.errors import LorlibError

if TYPE_CHECKING:
    from lorlib_ui.analysis.evaluation import TaskScore

MEASURES = ("exact_match", "loglik", "mc")
# The differences the paper's claims rest on (Sec. 6): Arrow against joint training, against the
# uniform merge, and Arrow over cluster experts against Arrow over private experts.
DIFFERENCES = (("arrow", "shared"), ("arrow", "uniform"), ("arrow-cluster", "arrow"))


def _per_task(scores: list[TaskScore], measure: str) -> list[list[float]] | None:
    """Each task's per-row values of a measure (tasks with rows of it), or None when a score was
    stored without its rows (by an older lorlib)."""
    if any(not s.rows for s in scores):
        return None
    return [s.rows[measure] for s in scores if s.rows.get(measure)]


BINARY = ("exact_match", "mc")  # 0/1 per row: at 0% or 100% everywhere, Wilson's interval


def _intervals(per_task: list[list[float]], measure: str) -> tuple[list[float], list[float]]:
    """A measure's 95% intervals over rows (tasks fixed) and over tasks (two-level), `stats`."""
    if measure in BINARY:
        return [list(stats.proportion_interval(per_task, tasks=t)) for t in (False, True)]
    return [list(stats.bootstrap_interval(per_task, tasks=t)) for t in (False, True)]


def summarize(scores: list[TaskScore], routers: list[str]) -> list[dict]:
    """One row per router: its measures averaged over tasks (multiple choice over tasks with
    options), each, when rows were kept, with its 95% bootstrap interval over test rows (`*_ci`,
    the tasks fixed) and over tasks (`*_task_ci`, tasks and their rows resampled)."""
    rows = []
    for name in routers:
        mine = [s for s in scores if s.router == name]
        if not mine:
            continue
        mc = [s.mc_accuracy for s in mine if s.mc_accuracy is not None]
        row = {
            "router": name,
            "tasks": len(mine),
            "exact_match": sum(s.exact_match for s in mine) / len(mine),
            "loglik": sum(s.loglik for s in mine) / len(mine),
            "mc_accuracy": sum(mc) / len(mc) if mc else None,
            "mc_tasks": len(mc),
        }
        for measure, key in zip(MEASURES, ("exact_match", "loglik", "mc_accuracy")):
            per_task = _per_task(mine, measure)
            row[f"{key}_ci"], row[f"{key}_task_ci"] = _intervals(per_task, measure) if per_task else (None, None)
        rows.append(row)
    return rows


def differences(scores: list[TaskScore], pairs=DIFFERENCES) -> list[dict]:
    """Paired differences a − b between routers, over the tasks both ran, with paired bootstrap
    intervals (the same test rows resampled for both) over rows (`ci`) and over tasks
    (`task_ci`), and the count of tasks where a is up, tied and down (`signs`)."""
    out = []
    for a, b in pairs:
        mine = {s.task: s for s in scores if s.router == a}
        theirs = {s.task: s for s in scores if s.router == b}
        tasks = [t for t in mine if t in theirs]
        if not tasks or any(not mine[t].rows or not theirs[t].rows for t in tasks):
            continue
        row = {"a": a, "b": b, "tasks": len(tasks)}
        for measure in MEASURES:
            left = [mine[t].rows[measure] for t in tasks if mine[t].rows.get(measure)]
            right = [theirs[t].rows[measure] for t in tasks if theirs[t].rows.get(measure)]
            if left and [len(x) for x in left] == [len(x) for x in right]:
                diff, low, high = stats.paired_interval(left, right)
                _, task_low, task_high = stats.paired_interval(left, right, tasks=True)
                row[measure] = {
                    "difference": diff,
                    "ci": [low, high],
                    "task_ci": [task_low, task_high],
                    "signs": stats.signs(left, right),
                }
        out.append(row)
    return out


INTERVALS_NOTE = (
    "95% intervals: [rows] resamples the test rows within each task (how sure we are about these "
    "tasks); [tasks] resamples the tasks too (about tasks like these). up/tied/down: tasks where "
    "the difference is above, at and below zero."
)


def format_value(
    value: float | None,
    cis: tuple[list[float] | None, ...] = (),
    scale: float = 1,
    digits: int = 3,
    signed: bool = False,
) -> str:
    """A value and its intervals, each in brackets: `28.9 [23.3, 35.0] [16.1, 42.1]`; a difference
    (`signed`) carries its sign: `+1.0 [-4.8, 6.2]`."""
    if value is None or not math.isfinite(value):
        return "-"
    text = f"{scale * value:{'+' if signed else ''}.{digits}f}"
    for ci in cis:
        if ci is not None:
            text += f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"
    return text


def format_table(summary: list[dict]) -> str:
    """The summary as a Markdown table (it reads as plain text too): each measure with its 95%
    intervals over rows, then over tasks (`INTERVALS_NOTE`)."""
    lines = [
        "| router | tasks | exact match (%) [rows] [tasks] | answer log-likelihood [rows] [tasks] "
        "| multiple choice (%) [rows] [tasks] |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary:
        em, ll, mc = (
            format_value(row[key], (row.get(f"{key}_ci"), row.get(f"{key}_task_ci")), scale, digits)
            for key, scale, digits in (("exact_match", 100, 1), ("loglik", 1, 3), ("mc_accuracy", 100, 1))
        )
        mc += f" ({row['mc_tasks']} tasks)" if row["mc_accuracy"] is not None else ""
        lines.append(f"| {row['router']} | {row['tasks']} | {em} | {ll} | {mc} |")
    return "\n".join(lines)


def format_signs(signs: dict | None) -> str:
    return f"{signs['up']}/{signs['tied']}/{signs['down']}" if signs else "-"


def format_differences(rows: list[dict]) -> str:
    """Paired differences as a Markdown table: each with its 95% intervals over rows and over
    tasks, and the tasks where it is up/tied/down."""
    lines = [
        "| difference | tasks | exact match (points) [rows] [tasks] up/tied/down "
        "| answer log-likelihood [rows] [tasks] up/tied/down | multiple choice (points) [rows] [tasks] up/tied/down |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            f"{format_value(row[m]['difference'], (row[m]['ci'], row[m].get('task_ci')), scale, digits)} "
            f"{format_signs(row[m].get('signs'))}"
            if m in row
            else "-"
            for m, scale, digits in (("exact_match", 100, 1), ("loglik", 1, 3), ("mc", 100, 1))
        ]
        lines.append(f"| {row['a']} − {row['b']} | {row['tasks']} | {' | '.join(cells)} |")
    return "\n".join(lines)


# what evaluations compared across libraries share: the rows scored and the routers' settings
COMPARED = ("tasks", "split", "limit", "top_k", "shots", "density", "temperature", "mix")
ROUTER_MEASURES = ("exact_match", "loglik", "mc_accuracy")


def _spread(values: list[float | None]) -> dict | None:
    """Values over libraries: each, their mean, standard deviation (ddof=1), min and max."""
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    array = np.asarray(values, dtype=float)
    return {
        "values": [float(v) for v in values],
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def across_libraries(records: list[dict], names: list[str]) -> dict:
    """Evaluations of several libraries of one design (say, one recipe built with training seeds
    0, 1, 2) side by side: for each router and each difference every library has, the per-library
    value of each measure, and its mean, standard deviation and range over libraries. The spread
    over libraries measures how much a conclusion depends on the build (training seed,
    clustering), which the intervals within one library, over its test rows and tasks, cannot
    show. `intervals` counts the libraries whose difference's interval over rows lies above zero,
    contains it, or lies below it."""
    if len(records) < 2 or len(records) != len(names):
        raise LorlibError(f"a comparison across libraries needs two or more evaluations, got {len(records)}")
    for key in COMPARED:
        seen = [sorted(r.get(key) or []) if key == "tasks" else r.get(key) for r in records]
        if any(value != seen[0] for value in seen):
            shown = "; ".join(f"{name}: {value}" for name, value in zip(names, seen))
            raise LorlibError(f"the evaluations differ in {key.replace('_', '-')} ({shown})")
    summaries = [{row["router"]: row for row in r["summary"]} for r in records]
    routers = [name for name in summaries[0] if all(name in s for s in summaries)]
    summary = [
        {"router": name} | {m: _spread([s[name][m] for s in summaries]) for m in ROUTER_MEASURES} for name in routers
    ]
    tables = [{(d["a"], d["b"]): d for d in r["differences"]} for r in records]
    pairs = [pair for pair in tables[0] if all(pair in t for t in tables)]
    diffs = []
    for a, b in pairs:
        row = {"a": a, "b": b}
        for m in MEASURES:
            cells = [t[a, b].get(m) for t in tables]
            row[m] = None if None in cells else _spread([c["difference"] for c in cells])
            if row[m] is not None:
                row[m]["intervals"] = {
                    "above": sum(c["ci"][0] > 0 for c in cells),
                    "contains": sum(c["ci"][0] <= 0 <= c["ci"][1] for c in cells),
                    "below": sum(c["ci"][1] < 0 for c in cells),
                }
        diffs.append(row)
    shared = {key: records[0][key] for key in COMPARED if key in records[0]}
    return {"libraries": list(names), **shared, "summary": summary, "differences": diffs}


def _spread_cells(spread: dict | None, scale: float, digits: int) -> tuple[str, str]:
    """`28.9 ± 2.1 (25.0 – 31.3)` and the per-library values, `25.0, 30.4, 31.3`."""
    if spread is None:
        return "-", "-"
    mean, sd, low, high = (f"{scale * spread[k]:.{digits}f}" for k in ("mean", "sd", "min", "max"))
    return f"{mean} ± {sd} ({low} – {high})", ", ".join(f"{scale * v:.{digits}f}" for v in spread["values"])


ACROSS_SCALES = (("exact match (%)", 100, 1), ("answer log-likelihood", 1, 3), ("multiple choice (%)", 100, 1))


def format_across(result: dict) -> str:
    """`across_libraries` as Markdown tables: each router's and each difference's mean ± standard
    deviation over libraries (min – max), and the per-library values in the libraries' order."""
    names = result["libraries"]
    lines = [f"over {len(names)} libraries ({', '.join(names)}): mean ± sd over libraries (min – max)"]
    lines += ["", "| router | measure | over libraries | per library |", "|---|---|---:|---|"]
    for row in result["summary"]:
        for key, (label, scale, digits) in zip(ROUTER_MEASURES, ACROSS_SCALES):
            lines.append(f"| {row['router']} | {label} | {' | '.join(_spread_cells(row[key], scale, digits))} |")
    if result["differences"]:
        head = "| difference | measure | over libraries | per library | interval over rows above/contains/below 0 |"
        lines += ["", head, "|---|---|---:|---|---:|"]
        for row in result["differences"]:
            for key, (label, scale, digits) in zip(MEASURES, ACROSS_SCALES):
                label = label.replace("(%)", "(points)")
                counts = row[key]["intervals"] if row[key] else None
                split = "-" if counts is None else f"{counts['above']}/{counts['contains']}/{counts['below']}"
                cells = " | ".join(_spread_cells(row[key], scale, digits))
                lines.append(f"| {row['a']} − {row['b']} | {label} | {cells} | {split} |")
    return "\n".join(lines)
