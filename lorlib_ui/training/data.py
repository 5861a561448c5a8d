"""Multi-task training data: one table of examples, each tagged with its task, family and split.

The paper trains one LoRA expert per task (Ostapenko et al., 2024, §5: "private" experts on the
FLAN tasks of `flan-10k-flat`, whose columns are source, target, task_name, task_source, split)
and groups tasks into families to check what clustering recovers. `load_tasks` turns any such
table into a `MultiTaskData` whose columns are always the same:

    task  family  input  output  options  split

Sources: a .jsonl / .jsonl.gz / .csv / .parquet file, a folder written by `datasets`'
`save_to_disk`, a hub dataset id (online only), or "default", the embedded BIG-bench set built by
`lorlib_ui.training.bigbench`. Columns are found by name (`COLUMN_CANDIDATES`, first match wins) unless
the caller names them. When an instruction column is present and non-empty it is prepended to
the input, so that every consumer sees the same prompt. Without a split column each task is split
80/10/10 by `assign_splits`, which the dataset builder uses too.

Anything wrong with the data raises `LorlibError` with one line naming the file and, where it
applies, the row and the column. Rows count from 1: the line number in a JSON-lines file, the
record number (header not counted) in a CSV file, a parquet file or a dataset.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lorlib_ui.core.assets import asset
from lorlib_ui.core.errors import LorlibError

DEFAULT_SOURCE = "bigbench_tasks.jsonl.gz"  # in the assets folder
SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1  # of each task, for validation and again for test

COLUMN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "task": ("task_name", "task"),
    "input": ("source", "input", "prompt"),
    "output": ("target", "output", "response", "completion"),
    "family": ("family", "category", "task_family", "task_source"),
    "split": ("split",),
    "options": ("options",),
    "instruction": ("instruction",),
}
_SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation"}
_SPLIT_NAMES |= {"dev": "validation", "test": "test"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True, eq=False)
class MultiTaskData:
    """Examples of many tasks. `frame` has the columns task, family, input, output, options
    (a tuple of strings for multiple-choice rows, else None) and split; `origin` names the source."""

    frame: pd.DataFrame
    origin: str

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.frame["task"].unique())

    @property
    def families(self) -> list[str]:
        return sorted(self.frame["family"].unique())

    def family_of(self, task: str) -> str:
        return str(self.frame.loc[self.frame["task"] == self._known_task(task), "family"].iloc[0])

    def tasks_in(self, family: str) -> list[str]:
        if family not in set(self.frame["family"]):
            raise LorlibError(f"{self.origin}: no family {family!r} (families: {', '.join(self.families)})")
        return sorted(self.frame.loc[self.frame["family"] == family, "task"].unique())

    def rows(self, task: str, split: str = "train") -> list[dict]:
        """The examples of one task in one split, in file order, as dicts of input, output, options."""
        if split not in SPLITS:
            raise LorlibError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        mask = (self.frame["task"] == self._known_task(task)) & (self.frame["split"] == split)
        return self.frame.loc[mask, ["input", "output", "options"]].to_dict("records")

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """{task: {split: number of rows}} with every split present, zeros included."""
        counts = self.frame.groupby(["task", "split"]).size()
        return {task: {split: int(counts.get((task, split), 0)) for split in SPLITS} for task in self.tasks}

    def select(self, tasks: Iterable[str] | None = None, families: Iterable[str] | None = None) -> MultiTaskData:
        """The rows whose task is in `tasks` and whose family is in `families` (None: no condition)."""
        mask = pd.Series(True, index=self.frame.index)
        if tasks is not None:
            mask &= self.frame["task"].isin([self._known_task(t) for t in tasks])
        if families is not None:
            families = list(families)
            for family in families:
                self.tasks_in(family)  # refuses an unknown family
            mask &= self.frame["family"].isin(families)
        if not mask.any():
            raise LorlibError(f"{self.origin}: no rows match that selection of tasks and families")
        return MultiTaskData(self.frame[mask].reset_index(drop=True), self.origin)

    def _known_task(self, task: str) -> str:
        if task not in set(self.frame["task"]):
            raise LorlibError(f"{self.origin}: no task {task!r}")
        return task


def assign_splits(count: int, key: str) -> list[str]:
    """Split labels for `count` rows of one task: 10% validation, 10% test (at least one each once
    there are three rows), the rest train, in a random order fixed by `key` alone, so a task's
    split does not depend on which other tasks are loaded with it."""
    held_out = max(1, int(count * HELD_OUT_FRACTION + 0.5)) if count >= 3 else 0
    labels = ["train"] * (count - 2 * held_out) + ["validation"] * held_out + ["test"] * held_out
    random.Random(key).shuffle(labels)
    return labels


def load_tasks(
    source: str | Path = "default",
    columns: dict[str, str] | None = None,
    task: str | None = None,
    seed: int = 0,
    subset: str | None = None,
) -> MultiTaskData:
    """Load multi-task data from a file, a `save_to_disk` folder, a hub id, or "default".

    `columns` maps our names (task, input, output, family, split, options, instruction) to the
    source's, overriding `COLUMN_CANDIDATES`. `task` names the single task of a source without a
    task column. `seed` fixes the automatic split; `subset` is the hub dataset's configuration."""
    unknown = set(columns or {}) - set(COLUMN_CANDIDATES)
    if unknown:
        raise LorlibError(f"columns: unknown field {sorted(unknown)[0]!r} (known: {', '.join(COLUMN_CANDIDATES)})")
    origin, frame, row_word = _read_source(source, subset)
    if frame.empty:
        raise LorlibError(f"{origin}: no rows")
    return _to_tasks(frame, origin, row_word, columns or {}, task, seed)


def _read_source(source: str | Path, subset: str | None) -> tuple[str, pd.DataFrame, str]:
    """(origin, raw table, what a row is called in messages: 'line' for JSON lines, else 'row')."""
    if str(source) == "default":
        source = asset(DEFAULT_SOURCE, must_exist=False)
        if not source.is_file():
            raise LorlibError(
                f"the embedded data {source} is missing; rebuild it with python -m lorlib_ui.training.bigbench"
            )
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), _read_saved_dataset(path), "row"
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            return str(path), _read_jsonl(path), "line"
        if name.endswith((".csv", ".csv.gz")):
            return str(path), _read_csv(path), "row"
        if name.endswith(".parquet"):
            return str(path), _read_parquet(path), "row"
        raise LorlibError(f"{path}: unknown format (expected .jsonl, .jsonl.gz, .csv, .parquet or a datasets folder)")
    if isinstance(source, str) and _HUB_ID.fullmatch(source) and not Path(source).suffix:
        return source, _read_hub(source, subset), "row"
    raise LorlibError(f"{source}: no such file or folder, nor a hub dataset id like owner/name")


def _text_of(path: Path) -> str:
    """The file decoded as UTF-8 (gunzipped first when it ends in .gz)."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise LorlibError(f"{path}: not a valid gzip file ({exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LorlibError(f"{path}: line {line} is not valid UTF-8 (byte {exc.start})") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    records, lines = [], []
    # Split on "\n" only: str.splitlines would also break inside strings that hold U+2028 or \x85.
    for number, line in enumerate(_text_of(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorlibError(f"{path}: line {number} is not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise LorlibError(f"{path}: line {number} is not a JSON object")
        records.append(record)
        lines.append(number)
    return pd.DataFrame.from_records(records, index=lines)


def _read_csv(path: Path) -> pd.DataFrame:
    # Every cell as text: "NA", "null" or "007" are data, not missing values or numbers.
    try:
        frame = pd.read_csv(io.StringIO(_text_of(path)), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise LorlibError(f"{path}: empty CSV file") from None
    except pd.errors.ParserError as exc:
        raise LorlibError(f"{path}: malformed CSV ({str(exc).strip().splitlines()[-1]})") from None
    frame.index = range(1, len(frame) + 1)
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    if importlib.util.find_spec("pyarrow") is None:
        raise LorlibError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise LorlibError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    frame.index = range(1, len(frame) + 1)
    return frame


def _read_saved_dataset(folder: Path) -> pd.DataFrame:
    datasets = _import_datasets(str(folder))
    if not any((folder / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise LorlibError(f"{folder}: not a folder written by datasets' save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as exc:
        raise LorlibError(f"{folder}: could not load the saved dataset ({_first_line(exc)})") from None
    return _dataset_frame(loaded)


def _read_hub(dataset_id: str, subset: str | None) -> pd.DataFrame:
    datasets = _import_datasets(dataset_id)
    try:
        loaded = datasets.load_dataset(dataset_id, subset)
    except Exception as exc:  # network, auth and hub errors have no common base; all mean "not loadable"
        raise LorlibError(f"{dataset_id}: could not load from the hub ({_first_line(exc)})") from None
    return _dataset_frame(loaded)


def _import_datasets(origin: str):
    try:
        import datasets
    except ImportError:
        raise LorlibError(
            f"{origin}: reading datasets folders and hub ids needs datasets (pip install datasets)"
        ) from None
    return datasets


def _dataset_frame(loaded) -> pd.DataFrame:
    """One table from a Dataset or a DatasetDict; a DatasetDict's keys become the split column
    unless the rows carry their own."""
    if hasattr(loaded, "to_pandas"):
        frame = loaded.to_pandas()
    else:
        parts = []
        for name, part in loaded.items():
            piece = part.to_pandas()
            if "split" not in piece.columns:
                piece["split"] = name
            parts.append(piece)
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    frame.index = range(1, len(frame) + 1)
    return frame


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _to_tasks(
    raw: pd.DataFrame, origin: str, row_word: str, columns: dict[str, str], task: str | None, seed: int
) -> MultiTaskData:
    found = _map_columns(raw, origin, columns, single_task=task is not None)
    where = raw.index.to_numpy()

    def fail(position: int, column: str, problem: str) -> LorlibError:
        return LorlibError(f"{origin}: {row_word} {where[position]}, column {column!r}: {problem}")

    frame = pd.DataFrame(index=range(len(raw)))
    if "task" in found:
        frame["task"] = _text_column(raw[found["task"]], found["task"], fail)
    else:
        if not task.strip():
            raise LorlibError("task: the name of a single task cannot be empty")
        frame["task"] = task
    inputs = _text_column(raw[found["input"]], found["input"], fail)
    if "instruction" in found:
        instructions = _text_column(raw[found["instruction"]], found["instruction"], fail, allow_empty=True)
        given = instructions.str.strip() != ""
        inputs = inputs.where(~given, instructions.str.strip() + "\n\n" + inputs)
    frame["input"] = inputs
    frame["output"] = _text_column(raw[found["output"]], found["output"], fail)
    if "family" in found:
        frame["family"] = _text_column(raw[found["family"]], found["family"], fail)
    else:  # nothing known about families: each task stands alone
        frame["family"] = frame["task"]
    frame["options"] = _options_column(raw[found["options"]], found["options"], fail) if "options" in found else None
    if "split" in found:
        frame["split"] = _split_column(raw[found["split"]], found["split"], fail)
    else:
        frame["split"] = pd.Series("", index=frame.index, dtype=object)
        for name, positions in frame.groupby("task").indices.items():
            frame.loc[positions, "split"] = assign_splits(len(positions), f"{seed}:{name}")
    return MultiTaskData(frame[["task", "family", "input", "output", "options", "split"]], origin)


def _map_columns(raw: pd.DataFrame, origin: str, columns: dict[str, str], single_task: bool) -> dict[str, str]:
    """Our field name -> the source's column, for every field the source has."""
    present = [str(c) for c in raw.columns]
    found = {}
    for field, candidates in COLUMN_CANDIDATES.items():
        if field in columns:
            if columns[field] not in present:
                raise LorlibError(f"{origin}: no column {columns[field]!r} for {field} (columns: {', '.join(present)})")
            found[field] = columns[field]
        else:
            match = next((c for c in candidates if c in present), None)
            if match is not None:
                found[field] = match
    for field in ("task", "input", "output"):
        if field not in found and not (field == "task" and single_task):
            hint = "pass task=NAME for a single task" if field == "task" else f"pass columns={{'{field}': NAME}}"
            expected = ", ".join(COLUMN_CANDIDATES[field])
            raise LorlibError(f"{origin}: no {field} column (looked for {expected}; {hint})")
    return found


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _text_column(values: pd.Series, column: str, fail, allow_empty: bool = False) -> pd.Series:
    """The column as strings; lists, dicts and (unless allowed) missing or blank cells are refused."""
    values = values.reset_index(drop=True)
    structured = values.map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray)))
    if structured.any():
        position = int(np.flatnonzero(structured.to_numpy())[0])
        raise fail(position, column, f"expected text, got {type(values[position]).__name__}")
    missing = values.map(_is_missing)
    text = values.where(missing, values.astype(str)).where(~missing, "")
    if not allow_empty:
        blank = text.str.strip() == ""
        if blank.any():
            position = int(np.flatnonzero(blank.to_numpy())[0])
            raise fail(position, column, "missing" if missing[position] else "empty")
    return text.astype(object)


def _options_column(values: pd.Series, column: str, fail) -> pd.Series:
    """Each cell as a tuple of option strings, or None. A JSON list written as text (CSV) is accepted."""
    result = []
    for position, value in enumerate(values):
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise fail(position, column, "options are not a valid JSON list") from None
        if isinstance(value, (list, tuple, np.ndarray)):
            options = tuple(str(o) for o in value)
            result.append(options or None)
        elif _is_missing(value) or value == "":
            result.append(None)
        else:
            raise fail(position, column, f"expected a list of options, got {type(value).__name__}")
    return pd.Series(result, dtype=object)


def _split_column(values: pd.Series, column: str, fail) -> pd.Series:
    values = values.reset_index(drop=True)
    names = values.map(lambda v: _SPLIT_NAMES.get(v.strip().lower()) if isinstance(v, str) else None)
    unknown = names.isna()
    if unknown.any():
        position = int(np.flatnonzero(unknown.to_numpy())[0])
        raise fail(position, column, f"unknown split {values[position]!r} (expected train, validation or test)")
    return names.astype(object)
