"""The result records behind REPRODUCTION.md's tables, and how the scripts beside this file print
a table from them.

Every run behind a table is kept as a JSON record under `docs/reproduction/records/` (most are
`evaluate --json` outputs: per router and task, the score of every row). A script run with
`--library COPY` makes its runs on that copy of the library and saves their records; run without
it, it prints its tables from the committed records, so each number can be checked without
running a model.

Cells give the mean over tasks with two 95% bootstrap intervals (`lorlib_ui.analysis.stats`):
[rows] resamples the rows within each task (about these tasks), [tasks] resamples the tasks as
well (about tasks like these). Differences are paired and add the count of tasks where they are
up/tied/down.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RECORDS = Path(__file__).resolve().parent / "records"
SCALES = {"exact_match": (100, 1), "loglik": (1, 3), "mc": (100, 1)}


def save(name: str, record: dict) -> Path:
    """Write `records/NAME.json` whole (a temporary file renamed over it)."""
    RECORDS.mkdir(exist_ok=True)
    path = RECORDS / f"{name}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=None, separators=(",", ":")) + "\n")
    os.replace(partial, path)
    return path


def load(name: str) -> dict:
    path = RECORDS / f"{name}.json"
    if not path.exists():
        sys.exit(f"no record {path}: make it first (the script's docstring says how)")
    return json.loads(path.read_text())


def shipped(key: str = "evaluation", library: Path = ROOT / "assets" / "library") -> dict:
    """A record the shipped library's manifest holds (its test-row `evaluation`, say)."""
    return json.loads((library / "manifest.json").read_text())[key]


def rows(record: dict, router: str, measure: str) -> dict[str, list[float]]:
    """Per task, the per-row values of a measure for one router of an evaluation record."""
    return {s["task"]: s["rows"][measure] for s in record["scores"] if s["router"] == router and s["rows"][measure]}


def cell(per_task: dict[str, list[float]], measure: str) -> str:
    """`mean [rows] [tasks]` over tasks, in percent for 0/1 measures."""
    from lorlib_ui.analysis.stats import bootstrap_interval, proportion_interval, task_mean
    from lorlib_ui.analysis.summaries import format_value

    if not per_task:
        return "-"
    values = list(per_task.values())
    interval = bootstrap_interval if measure == "loglik" else proportion_interval
    cis = [list(interval(values, tasks=t)) for t in (False, True)]
    scale, digits = SCALES[measure]
    return format_value(task_mean(values), cis, scale, digits)


def paired(a: dict[str, list[float]], b: dict[str, list[float]], measure: str) -> str:
    """`difference [rows] [tasks] up/tied/down` of a − b over the tasks both have."""
    from lorlib_ui.analysis.stats import paired_interval, signs
    from lorlib_ui.analysis.summaries import format_value

    tasks = [t for t in a if t in b]
    if not tasks:
        return "-"
    left, right = [a[t] for t in tasks], [b[t] for t in tasks]
    difference, *rows_ci = paired_interval(left, right)
    _, *tasks_ci = paired_interval(left, right, tasks=True)
    s = signs(left, right)
    value = format_value(difference, (rows_ci, tasks_ci), *SCALES[measure], signed=True)
    return f"{value} {s['up']}/{s['tied']}/{s['down']}"


def evaluate(library: str, **options) -> dict:
    """Run `evaluate` on a library (a copy: its stored evaluation is replaced) and return its record."""
    from lorlib_ui.analysis.evaluation import EvaluateOptions, evaluate_library

    return evaluate_library(library, EvaluateOptions(**options))[0]
