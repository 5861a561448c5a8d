"""How long an evaluation or an adaptation will take, said before it starts, and the second press
that starts a long one (the Evaluate and Adapt tabs).

The pace is the open library's own, from what it has on record: one test row scored under one
router (its last evaluation: seconds over rows x routers) and one training step (its experts':
seconds over steps). An estimate is that pace times the work asked for: it holds as far as the
worker runs at the pace the records were made at (the same machine, rows like those), and is only
ever said as "about", with where its pace comes from. A library with neither record gives no
number; a large run on it still asks before it starts.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

from lorlib_ui.worker.api import LibraryInfo, duration

CONFIRM_S = 180  # a run estimated longer than this starts on a second press
UNTIMED_ROWS = 1000  # with no pace on record: scored rows (x routers) beyond which a run asks first
LORAHUB_BUDGET = 40  # evaluations of LoraHub's search (its default), each about a training step
TASK_KINDS = ("private", "imported")  # experts of one task each: the tasks a library has seen


@dataclass(frozen=True)
class Pace:
    """Seconds per unit of work on this library, as measured when its records were made."""

    row_s: float | None  # one test row scored under one router
    step_s: float | None  # one training step of an expert
    source: str  # where the pace comes from, in words

    @property
    def known(self) -> bool:
        return self.row_s is not None


def pace(info: LibraryInfo) -> Pace:
    """The library's pace: rows from its last evaluation, steps from its experts' training; a
    scored row stands in for a step and the other way round (on the shipped library a step takes
    1.7 s and a row 2.6 s: the same order)."""
    evaluation = info.evaluation or {}
    rows = sum(s.get("examples", 0) for s in evaluation.get("scores", []))
    row_s = evaluation["seconds"] / rows if rows and evaluation.get("seconds") else None
    per_step = [
        m["seconds"] / m["steps"]
        for m in (e.get("metrics") or {} for e in info.experts)
        if m.get("seconds") and m.get("steps")
    ]
    step_s = statistics.median(per_step) if per_step else None
    if row_s is not None:
        source = "the pace of this library's last evaluation"
    elif step_s is not None:
        source = "the pace of its experts' training (no evaluation on record)"
    else:
        return Pace(None, None, "no timing on record for this library")
    return Pace(row_s or step_s, step_s or row_s, source)


def task_count(info: LibraryInfo, tasks: str) -> int | None:
    """How many tasks an evaluation of the set `tasks` scores (None for `unused`: the worker
    finds those in the data when the job starts)."""
    seen = len({t for e in info.experts if e["kind"] in TASK_KINDS for t in e.get("tasks") or []})
    return {"held-out": len(info.held_out), "seen": seen, "all": len(info.held_out) + seen}.get(tasks)


def training_steps(info: LibraryInfo, steps: int | None) -> int:
    """An adaptation's steps: those asked for, else the library's experts' (their median)."""
    if steps:
        return int(steps)
    trained = [e["metrics"]["steps"] for e in info.experts if (e.get("metrics") or {}).get("steps")]
    return int(statistics.median(trained)) if trained else 0


@dataclass(frozen=True)
class Estimate:
    seconds: float | None  # None: no pace on record, or work not counted before the job starts
    rows: int | None  # test rows x routers scored (at most); None: not counted yet
    source: str

    @property
    def long(self) -> bool:
        """Whether the run asks for a second press before it starts."""
        if self.seconds is not None:
            return self.seconds > CONFIRM_S
        return self.rows is None or self.rows > UNTIMED_ROWS

    def line(self) -> str:
        if self.seconds is not None:
            return f"{duration(self.seconds)} at {self.source}"
        rows = f"{self.rows} test rows to score, " if self.rows is not None else ""
        return f"{rows}time unknown: {self.source}"


def evaluation(info: LibraryInfo, routers: list[str], tasks: str, limit: int) -> Estimate:
    """Every router on every task of the set, `limit` test rows each (tasks may have fewer: then
    less); LoraHub first searches its merge on each task."""
    count = task_count(info, tasks)
    if count is None:
        return Estimate(None, None, "the unused tasks are counted when the job starts")
    p = pace(info)
    rows = len(routers) * count * int(limit)
    if not p.known:
        return Estimate(None, rows, p.source)
    search = count * LORAHUB_BUDGET * p.step_s if "lorahub" in routers else 0.0
    return Estimate(rows * p.row_s + search, rows, p.source)


def adaptation(info: LibraryInfo, methods: list[str], shots: list[int], steps: int | None, limit: int) -> Estimate:
    """Each method at each number of shots trained (LoraHub: its search), then every result and
    the zero-shot Arrow and base scored on `limit` test rows. Results already stored are not
    trained again: then less."""
    runs = len(methods) * len(shots)
    rows = (runs + 2) * int(limit)
    p = pace(info)
    if not p.known:
        return Estimate(None, rows, p.source)
    lorahub = len(shots) if "lorahub" in methods else 0
    trained = (runs - lorahub) * training_steps(info, steps) + lorahub * LORAHUB_BUDGET
    return Estimate(trained * p.step_s + rows * p.row_s, rows, p.source)


def in_all(estimate: Estimate) -> str:
    """What a job's status lines add: ` (estimated: about 55 min in all)`, or nothing untimed."""
    return "" if estimate.seconds is None else f" (estimated: {duration(estimate.seconds)} in all)"


def request_key(folder: str, options: dict) -> str:
    """What a second press must ask again to start the run the first one estimated."""
    return json.dumps([folder, options], sort_keys=True, default=str)


def confirmation(estimate: Estimate, key: str, confirmed: str | None, button: str) -> str | None:
    """The line that asks for a second press (a long run not yet confirmed with these very
    settings), or None: start now."""
    if not estimate.long or confirmed == key:
        return None
    return f"**{estimate.line()}**: press **{button}** again to start it (or change the settings)."
