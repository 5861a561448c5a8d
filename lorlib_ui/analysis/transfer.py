"""The transfer matrix: every expert alone, and the base model, scored on every task's test rows.

Rows are tasks, columns the base model and each expert applied alone (the router `expert:NAME`).
A cell holds, per test row, the mean log-probability per token of the reference answer (as the
evaluation scores it) and, when asked, the exact match of the greedy answer. An expert's *gain*
on a task is its mean answer log-likelihood minus the base model's: the ground truth of whether
it helps, against which routing is judged (`routing_stats`). The paper's analysis of which experts
help which tasks (Ostapenko et al., 2024, Sec. 6) rests on the same single-expert scores.

The matrix is stored beside the experts, in LIBRARY/transfer.json (a side file named in the
manifest). Each cell records the hash of the expert's weights (the base column: the base model's
fingerprint), the data it was scored on and the row limit; a cell whose expert has changed or
that was scored on other rows is not used, and is computed again. A run computes only the cells
that are missing: one expert at a time, all of that expert's rows in one batched pass, saving
after each expert, so a cancelled or killed run keeps what it finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorlib_ui.analysis.evaluation import DatasetOptions, answer_budget, score_rows, select_tasks, test_rows
from lorlib_ui.core.derived import Changes, created_since
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import KINDS, Library
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router
from lorlib_ui.training.config import ANALYSIS_ROWS
from lorlib_ui.training.data import MultiTaskData, load_tasks
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import QUIET, Count, Reporter
from lorlib_ui.training.training import Cancelled

SIDE_FILE = "transfer"  # LIBRARY/transfer.json
FORMAT = "lorlib-transfer"
BASE = "base"  # the column of the base model alone
DEFAULT_LIMIT = ANALYSIS_ROWS


@dataclass(frozen=True, kw_only=True)
class TransferOptions(DatasetOptions):
    """Which cells of the transfer matrix to fill (the `transfer` command's flags and a transfer job's keys)."""

    limit: int | None = option(DEFAULT_LIMIT, f"test rows per task (default {DEFAULT_LIMIT})")
    experts: str | tuple[str, ...] | None = option(
        None, "a kind (private, cluster, ...) or comma-separated experts", sets=KINDS
    )
    exact_match: bool = option(False, "also generate answers for exact match (slower)")
    device: str | None = option(None, "cuda or cpu (default: cuda when present)")
    dtype: str | None = option(None, "float32, bfloat16, float16 or auto")


@dataclass
class TransferMatrix:
    """Tasks x columns (the base model first, then experts); NaN where a cell is not computed."""

    tasks: list[str]
    families: list[str | None]
    columns: list[str]
    loglik: np.ndarray  # (tasks, columns) mean answer log-likelihood
    exact_match: np.ndarray  # (tasks, columns) fraction, NaN where not computed
    rows: np.ndarray  # (tasks, columns) test rows scored
    per_row: dict[tuple[str, str], dict[str, list[float] | None]]  # (task, column) -> loglik, exact_match

    def gain(self, measure: str = "loglik") -> np.ndarray:
        """(tasks, columns): each column's score minus the base model's on the same task."""
        values = getattr(self, measure)
        return values - values[:, [self.columns.index(BASE)]]

    def to_dict(self) -> dict:
        def listed(a: np.ndarray) -> list:
            return [[None if not np.isfinite(x) else round(float(x), 5) for x in row] for row in a]

        return {
            "tasks": self.tasks,
            "families": self.families,
            "columns": self.columns,
            "loglik": listed(self.loglik),
            "exact_match": listed(self.exact_match),
            "gain": listed(self.gain()),
            "rows": self.rows.tolist(),
        }


def column_keys(library: Library) -> dict[str, str]:
    """What each column's cells were computed with: the expert's weights, or the base model."""
    base = {BASE: f"base:{library.base_model}:{library.base_fingerprint}"}
    return base | {e.name: e.weights_hash for e in library.experts}


def select_columns(library: Library, which: str | list[str] | None) -> list[str]:
    """Experts by name, or all experts of one kind (private, cluster, ...); None: every expert."""
    if which is None:
        return library.names
    if isinstance(which, str):
        if which not in KINDS:
            raise LorlibError(f"unknown kind of expert {which!r}; use {', '.join(KINDS)} or name the experts")
        names = library.groups()[which]  # general: marked general ones too
        if not names:
            raise LorlibError(f"library {library.path} has no {which} experts")
        return names
    for name in which:
        library.expert(name)  # an unknown name fails here, naming it
    if not which:
        raise LorlibError("the list of experts is empty")
    return list(dict.fromkeys(which))


def _stored_cells(library: Library) -> dict[str, dict[str, dict]]:
    stored = library.derived.read_json(SIDE_FILE)
    if not stored or stored.get("format") != FORMAT or not isinstance(stored.get("cells"), dict):
        return {}  # none yet, or damaged: computed again
    return stored["cells"]


def _fresh(cells: dict[str, dict[str, dict]], keys: dict[str, str]) -> dict[str, dict[str, dict]]:
    """The cells whose column is still what it was computed with (an expert unchanged)."""
    kept = {
        task: {col: c for col, c in by_column.items() if keys.get(col) == c.get("key")}
        for task, by_column in cells.items()
    }
    return {task: by_column for task, by_column in kept.items() if by_column}


def load_transfer(library: Library) -> TransferMatrix | None:
    """The stored matrix, keeping only cells whose expert is unchanged; None when there are none.
    Tasks in stored order, columns in library order (the base model first)."""
    keys = column_keys(library)
    return _matrix(_fresh(_stored_cells(library), keys), keys)


def stale_transfer(library: Library) -> tuple[TransferMatrix | None, Changes]:
    """The stored matrix with the cells `load_transfer` drops as stale kept where their expert is
    still in the library (scored with its old weights), and what changed: the experts retrained
    since (their cells are stale), and those added since it was scored (no column yet). To show,
    marked stale, until computed again; never to judge routing by."""
    keys = column_keys(library)
    stored = _stored_cells(library)
    cells = {
        task: {col: c for col, c in by_column.items() if col in keys and (col != BASE or c.get("key") == keys[BASE])}
        for task, by_column in stored.items()
    }
    cells = {task: by_column for task, by_column in cells.items() if by_column}
    retrained = {col for by_column in cells.values() for col, c in by_column.items() if c.get("key") != keys[col]}
    scored = {col for by_column in cells.values() for col in by_column}
    updated = library.extra.get("side_files", {}).get(SIDE_FILE, {}).get("updated", "")
    added = [e.name for e in library.experts if cells and e.name not in scored and created_since(e.created, updated)]
    changed = Changes(added=tuple(added), retrained=tuple(n for n in library.names if n in retrained))
    return _matrix(cells, keys), changed


# Scoring one test row of one cell with the embedded SmolLM2-135M on a CPU: the shipped library's
# `transfer --tasks all` scored 910 cells of 20 rows in 3,215 s (its history); rough.
ROW_SECONDS = 0.2


def transfer_seconds(cells: int, limit: int | None) -> float:
    """About how long scoring `cells` cells takes on a CPU, `limit` test rows each."""
    return cells * (limit or DEFAULT_LIMIT) * ROW_SECONDS


def _matrix(cells: dict[str, dict[str, dict]], keys: dict[str, str]) -> TransferMatrix | None:
    if not cells:
        return None
    used = {col for by_column in cells.values() for col in by_column}
    columns = [c for c in keys if c in used]
    tasks = list(cells)
    shape = (len(tasks), len(columns))
    loglik, exact, rows = np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, dtype=int)
    per_row = {}
    for i, task in enumerate(tasks):
        for j, col in enumerate(columns):
            cell = cells[task].get(col)
            if cell is None:
                continue
            loglik[i, j] = np.mean(cell["loglik"])
            if cell.get("exact_match") is not None:
                exact[i, j] = np.mean(cell["exact_match"])
            rows[i, j] = len(cell["loglik"])
            per_row[task, col] = {"loglik": cell["loglik"], "exact_match": cell.get("exact_match")}
    families = [next(iter(cells[t].values())).get("family") for t in tasks]
    return TransferMatrix(tasks, families, columns, loglik, exact, rows, per_row)


def _usable(cell: dict | None, key: str, source: str, limit: int | None, exact_match: bool) -> bool:
    return (
        cell is not None
        and cell.get("key") == key
        and cell.get("data") == source
        and cell.get("limit") == limit
        and (not exact_match or cell.get("exact_match") is not None)
    )


def compute_transfer(
    rm: RoutedModel,
    data: MultiTaskData,
    source: str,
    tasks: list[str],
    columns: list[str],
    limit: int | None = DEFAULT_LIMIT,
    exact_match: bool = False,
    reporter: Reporter = QUIET,
) -> dict[str, int]:
    """Fill in the missing cells of tasks x (base + columns) and store them in the library after
    each column, a `Count` to `reporter` after each. Returns counts of computed and reused cells."""
    library = rm.library
    keys = column_keys(library)
    cells = _stored_cells(library)
    rows = {task: test_rows(data, task, limit) for task in tasks}
    budgets = {task: answer_budget(rm.tokenizer, data, task) for task in tasks} if exact_match else None
    wanted = [BASE, *[c for c in columns if c != BASE]]
    todo = {
        col: [t for t in tasks if not _usable(cells.get(t, {}).get(col), keys[col], source, limit, exact_match)]
        for col in wanted
    }
    todo = {col: missing for col, missing in todo.items() if missing}
    counts = {"computed": sum(map(len, todo.values())), "reused": len(tasks) * len(wanted)}
    counts["reused"] -= counts["computed"]
    for done, (col, missing) in enumerate(todo.items(), start=1):
        if reporter.cancelled():
            raise Cancelled("transfer cancelled")
        router = make_router("base" if col == BASE else f"expert:{col}", rm.experts)
        scores = score_rows(rm, router, {t: rows[t] for t in missing}, budgets, choices=False)
        fresh = {
            task: {
                "key": keys[col],
                "data": source,
                "limit": limit,
                "family": data.family_of(task),
                "loglik": [round(x, 5) for x in scores[task].loglik],
                "exact_match": scores[task].exact_match,
            }
            for task in missing
        }
        _store(library, col, fresh)
        reporter.progress(Count(done, len(todo), col))
    return counts


def _store(library: Library, column: str, fresh: dict[str, dict]) -> None:
    """Merge one column's new cells into the stored matrix (as it is on disk now: another run may
    have added cells meanwhile), dropping the cells of experts that changed or left."""

    def update(stored: dict | None, current: Library) -> tuple[dict, dict]:
        old = stored["cells"] if stored and stored.get("format") == FORMAT else {}
        cells = _fresh(old, column_keys(current))
        for task, cell in fresh.items():
            cells.setdefault(task, {})[column] = cell
        return {"format": FORMAT, "version": 1, "cells": cells}, {"cells": sum(map(len, cells.values()))}

    library.derived.update_json(SIDE_FILE, update)


def transfer_library(
    path: str, options: TransferOptions | None = None, reporter: Reporter = QUIET
) -> tuple[TransferMatrix, dict[str, int]]:
    """Compute the missing cells of the library's transfer matrix over `options.tasks` (a list or
    a set: held-out, seen, all, unused) and `options.experts` (a list, a kind, or None for all),
    store them, and return the stored matrix with counts of computed and reused cells."""
    o = options or TransferOptions()
    library = Library.open(path)
    if not library.experts:
        raise LorlibError(f"library {library.path} has no experts")
    source = library.data_source(o.data)
    loaded = load_tasks(source)
    tasks = select_tasks(library, o.tasks, loaded)
    columns = select_columns(library, o.experts)
    for task in tasks:
        test_rows(loaded, task, o.limit)  # an unknown task, or one without test rows, fails before the model loads
    rm = RoutedModel.load(library, device=o.device, dtype=o.dtype)
    counts = compute_transfer(rm, loaded, source, tasks, columns, o.limit, o.exact_match, reporter)
    matrix = load_transfer(Library.open(path))
    if matrix is None:  # every expert changed while the run went on
        raise LorlibError(f"library {path} changed during the run; run transfer again")
    return matrix, counts
