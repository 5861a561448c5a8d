"""Build the embedded multi-task dataset, assets/bigbench_tasks.jsonl.gz, from BIG-bench.

The paper trains one LoRA expert per task and clusters the experts (Ostapenko et al., 2024,
§4-5); checking a clustering needs tasks whose families are known. assets/bigbench_selection.json
names 64 JSON tasks of BIG-bench (Srivastava et al., 2022) in 14 families, chosen to be short
enough for a 135M-parameter base model. This module turns them into rows that `lorlib_ui.training.data`
loads as "default":

 1. One streaming pass over the BIG-bench 1.0.0 sdist from PyPI (358 MB gzipped), parsing only
    the selected task.json files (and a top-level LICENSE, which 1.0.0 lacks: the committed
    Apache-2.0 text then stands in).
 2. Every example becomes (input, output, options): the output is the target (the first one when
    several are accepted) or, for multiple-choice examples, the option with the highest score,
    with all options kept. Empty, over-long, ambiguous and repeated examples are dropped.
 3. Classification-like tasks (a few outputs cover most rows) are balanced: no label keeps more
    than twice the rows of the rarest real label, or `MIN_ROWS_PER_LABEL`, whichever is larger.
 4. At most `MAX_ROWS_PER_TASK` rows per task, split 80/10/10 by `data.assign_splits`.
 5. Rows are written sorted by task and split, gzipped with a zero timestamp, so that a rebuild
    gives the same bytes. The licence and a notice with the canary string go next to them.

    python -m lorlib_ui.training.bigbench [--tarball PATH] [--selection PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lorlib_ui.core.assets import asset
from lorlib_ui.core.cache import cache_dir
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.data import SPLITS, assign_splits

DEFAULT_SELECTION = asset("bigbench_selection.json", must_exist=False)
DEFAULT_OUT = asset("bigbench_tasks.jsonl.gz", must_exist=False)
LICENSE_NAME = "BIGBENCH_LICENSE.txt"
# The 1.0.0 sdist does not ship BIG-bench's LICENSE file (its sources carry Apache-2.0 headers).
# This committed copy of the unmodified Apache License 2.0 text stands in for it.
COMMITTED_LICENSE = asset(LICENSE_NAME, must_exist=False)
NOTICE_NAME = "BIGBENCH_NOTICE.md"
SDIST = "bigbench==1.0.0"
SDIST_FILE = "bigbench-1.0.0.tar.gz"
TASKS_IN_ARCHIVE = "bigbench/benchmark_tasks"  # under the archive's top folder, bigbench-1.0.0/

# The base model has 135M parameters and experts are trained on sequences of a few hundred
# tokens: 600 characters of input (about 150 tokens) and 120 of output keep an example, with its
# instruction, well inside that, and keep out tasks whose answers are essays.
MAX_INPUT_CHARS = 600
MAX_OUTPUT_CHARS = 120
# Natural-instructions definitions run to paragraphs; the gist is in the first sentences.
MAX_INSTRUCTION_CHARS = 300
MAX_ROWS_PER_TASK = 400
MIN_ROWS_WARNING = 40
SEED = 0

# Label balancing: a task is classification-like when its MAX_LABELS most frequent outputs
# cover LABEL_COVERAGE of its rows. Labels under RARE_LABEL_SHARE of the rows are strays (a
# typo, an odd answer) that should not set the cap, except that the two most frequent labels
# always count, so that a 99:1 task is still balanced. MIN_ROWS_PER_LABEL keeps a lopsided task
# from shrinking to nothing.
MAX_LABELS = 10
LABEL_COVERAGE = 0.9
RARE_LABEL_SHARE = 0.02
MIN_ROWS_PER_LABEL = 50

_TASK_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Selection:
    """The tasks to take: {family: [task path under benchmark_tasks/]}, and BIG-bench's canary."""

    families: dict[str, list[str]]
    canary: str

    @property
    def paths(self) -> list[str]:
        return [path for paths in self.families.values() for path in paths]


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    options: tuple[str, ...] | None


@dataclass
class TaskReport:
    """What happened to one selected task, for the summary."""

    name: str
    family: str
    path: str
    split_counts: dict[str, int] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    examples_in_source: int = 0
    balanced_from: int | None = None
    problem: str | None = None  # why the task gave no rows at all

    @property
    def rows(self) -> int:
        return sum(self.split_counts.values())

    def drops(self) -> str:
        """The dropped examples by reason, e.g. "3 empty, 12 input too long"."""
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))


def task_name(path: str) -> str:
    """A task's short unique name: its path under benchmark_tasks/ with dots for slashes."""
    return path.strip("/").replace("/", ".")


def read_selection(path: Path) -> Selection:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LorlibError(f"{path}: cannot read the task selection ({exc})") from None
    families = raw.get("families") if isinstance(raw, dict) else None
    if not isinstance(families, dict) or not families:
        raise LorlibError(f"{path}: expected a 'families' object mapping family names to lists of task paths")
    seen: set[str] = set()
    for family, paths in families.items():
        if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip("/") for p in paths):
            raise LorlibError(f"{path}: family {family!r} must be a list of task paths")
        for task_path in paths:
            name = task_name(task_path)
            if not _TASK_NAME.fullmatch(name):
                raise LorlibError(f"{path}: task path {task_path!r} has characters other than letters, digits, ._-/")
            if name in seen:
                raise LorlibError(f"{path}: task {task_path!r} is selected twice")
            seen.add(name)
    canary = raw.get("source", {}).get("canary", "") if isinstance(raw.get("source"), dict) else ""
    return Selection(families={f: list(p) for f, p in families.items()}, canary=canary)


def default_tarball() -> Path:
    return cache_dir() / SDIST_FILE


def fetch_tarball(path: Path) -> Path:
    """The sdist at `path`, downloaded from PyPI first (sdist only, no install) when absent."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {SDIST} (358 MB) from PyPI to {path} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".bigbench-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SDIST, "-d", tmp, "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_FILE
        if done.returncode != 0 or not got.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LorlibError(f"could not download {SDIST} from PyPI: {last}")
        shutil.move(got, path)
    return path


def read_archive(tarball: Path, task_paths: list[str]) -> tuple[dict[str, bytes], str | None]:
    """({task path: its task.json bytes}, the top-level LICENSE text or None) in one streaming pass
    that stops as soon as everything wanted has been seen. Task paths missing from the archive are
    simply absent."""
    wanted = {f"{TASKS_IN_ARCHIVE}/{p.strip('/')}/task.json": p for p in task_paths}
    found: dict[str, bytes] = {}
    licence = None
    try:
        with tarfile.open(tarball, mode="r|gz") as archive:
            for member in archive:
                inner = member.name.split("/", 1)[1] if "/" in member.name else ""
                if member.isfile() and inner in wanted:
                    found[wanted[inner]] = archive.extractfile(member).read()
                elif member.isfile() and inner == "LICENSE":
                    licence = archive.extractfile(member).read().decode("utf-8")
                if licence is not None and len(found) == len(wanted):
                    break
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise LorlibError(f"{tarball}: not a readable .tar.gz ({exc})") from None
    return found, licence


def instruction_of(task: dict) -> str:
    """The task's prefix, else its description, on one line and short.

    Natural-instructions tasks carry a long definition ("Definition: ... Things to Avoid: ...
    Emphasis/Caution: ... Prompt: ...") whose last part, after "Prompt:", is the one-sentence
    instruction itself; that part is taken. Other text is cut after its last full sentence that
    fits in MAX_INSTRUCTION_CHARS."""
    for key in ("task_prefix", "description"):
        text = " ".join(str(task.get(key) or "").split())
        prompt = text.rpartition("Prompt:")[2].strip()
        if prompt:
            return _shorten(prompt, MAX_INSTRUCTION_CHARS)
    return ""


def _shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters: after its last full sentence if there is one,
    else at a word boundary."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    sentence_end = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    if sentence_end > 0:
        return head[: sentence_end + 1]
    return head.rsplit(" ", 1)[0].rstrip(" ,;:")


def example_of(raw: dict) -> tuple[Example | None, str | None]:
    """(the example, None) or (None, why it was dropped)."""
    if not isinstance(raw, dict):
        return None, "not an object"
    text = _plain(raw.get("input"))
    scores = raw.get("target_scores")
    options = None
    if isinstance(scores, dict) and scores:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
            return None, "scores that are not numbers"
        best = max(scores.values())
        winners = [option for option, score in scores.items() if score == best]
        if len(winners) != 1:
            return None, "no single best option"
        output, options = winners[0].strip(), tuple(o.strip() for o in scores)
    else:
        target = raw.get("target")
        if isinstance(target, list):  # several accepted answers: the first is the canonical one
            target = next((t for t in target if _plain(t)), None)
        output = _plain(target)
    if not text or not output:
        return None, "empty"
    if len(text) > MAX_INPUT_CHARS:
        return None, "input too long"
    if len(output) > MAX_OUTPUT_CHARS or (options and max(map(len, options)) > MAX_OUTPUT_CHARS):
        return None, "output too long"
    return Example(text, output, options), None


def _plain(value) -> str:
    """A JSON scalar as stripped text ("" for null and for lists or objects)."""
    if value is None or isinstance(value, (list, dict)):
        return ""
    return str(value).strip()


def usable_examples(task: dict) -> tuple[list[Example], Counter]:
    """The task's examples in file order, each input once, and a count of the drops by reason."""
    kept, dropped, seen = [], Counter(), set()
    for raw in task.get("examples") or []:
        example, reason = example_of(raw)
        if example is not None and example.input in seen:
            example, reason = None, "repeated input"
        if example is None:
            dropped[reason] += 1
            continue
        seen.add(example.input)
        kept.append(example)
    return kept, dropped


def label_cap(outputs: list[str]) -> int | None:
    """The most rows any one output may keep, or None when the task is not classification-like."""
    counts = Counter(outputs)
    top = counts.most_common(MAX_LABELS)
    if not outputs or sum(c for _, c in top) < LABEL_COVERAGE * len(outputs):
        return None
    real = [c for _, c in top if c >= RARE_LABEL_SHARE * len(outputs)]
    if len(real) < 2:
        real = [c for _, c in top[:2]]
    return max(2 * min(real), MIN_ROWS_PER_LABEL)


def balance_labels(examples: list[Example], rng: random.Random) -> list[Example]:
    """Downsample the frequent outputs of a classification-like task to `label_cap` rows each,
    keeping the examples' order; other tasks come back unchanged."""
    cap = label_cap([e.output for e in examples])
    if cap is None:
        return examples
    by_label: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.output, []).append(index)
    keep = set()
    for label in sorted(by_label):
        indices = by_label[label]
        keep.update(indices if len(indices) <= cap else rng.sample(indices, cap))
    return [e for i, e in enumerate(examples) if i in keep]


def task_rows(path: str, family: str, task: dict, seed: int = SEED) -> tuple[list[dict], TaskReport]:
    """The rows of one task, in split order, and what was done to get them."""
    name = task_name(path)
    report = TaskReport(name=name, family=family, path=path, examples_in_source=len(task.get("examples") or []))
    examples, report.dropped = usable_examples(task)
    rng = random.Random(f"{seed}:{name}")
    balanced = balance_labels(examples, rng)
    if len(balanced) < len(examples):
        report.balanced_from = len(examples)
    rng.shuffle(balanced)
    chosen = balanced[:MAX_ROWS_PER_TASK]
    splits = assign_splits(len(chosen), f"{seed}:{name}")
    instruction = instruction_of(task)
    rows = [
        {
            "task": name,
            "family": family,
            "instruction": instruction,
            "input": example.input,
            "output": example.output,
            "options": list(example.options) if example.options else None,
            "split": split,
        }
        for example, split in zip(chosen, splits)
    ]
    rows.sort(key=lambda row: SPLITS.index(row["split"]))  # stable: keeps the shuffled order within a split
    report.split_counts = {split: splits.count(split) for split in SPLITS}
    return rows, report


def build(tarball: Path, selection_path: Path, out: Path) -> list[TaskReport]:
    """Write `out`, the licence and the notice; return one report per selected task."""
    selection = read_selection(selection_path)
    sources, licence = read_archive(tarball, selection.paths)
    rows, reports = [], []
    for family, paths in selection.families.items():
        for path in paths:
            task_rows_of_path, report = _rows_from_source(path, family, sources.get(path))
            rows.extend(task_rows_of_path)
            reports.append(report)
    rows.sort(key=lambda row: row["task"])  # stable: each task keeps its split order
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_rows(rows, out)
    _write_licence(licence, out.parent / LICENSE_NAME)
    (out.parent / NOTICE_NAME).write_text(_notice(reports, selection, out, licence is not None), encoding="utf-8")
    return reports


def _rows_from_source(path: str, family: str, source: bytes | None) -> tuple[list[dict], TaskReport]:
    """`task_rows` of a task.json as found in the archive, or no rows and the reason."""
    unusable = TaskReport(name=task_name(path), family=family, path=path)
    if source is None:
        unusable.problem = "no task.json in the archive (a programmatic task, or a wrong path)"
        return [], unusable
    try:
        task = json.loads(source.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        unusable.problem = f"task.json is not valid JSON ({exc})"
        return [], unusable
    if not isinstance(task, dict):
        unusable.problem = "task.json is not a JSON object"
        return [], unusable
    rows, report = task_rows(path, family, task)
    if not rows:
        report.problem = f"no usable example ({report.drops() or 'no examples'})"
    return rows, report


def _write_licence(from_archive: str | None, path: Path) -> None:
    if from_archive is not None:
        path.write_text(from_archive, encoding="utf-8")
    elif not COMMITTED_LICENSE.is_file():
        raise LorlibError(f"the archive has no LICENSE and {COMMITTED_LICENSE} is missing: restore it from git")
    elif path.resolve() != COMMITTED_LICENSE.resolve():
        shutil.copyfile(COMMITTED_LICENSE, path)


def _write_rows(rows: list[dict], out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    # No file name and a zero timestamp in the gzip header: a rebuild gives the same bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(out)


def _notice(reports: list[TaskReport], selection: Selection, out: Path, licence_in_archive: bool) -> str:
    used = [r for r in reports if r.rows]
    families = sorted({r.family for r in used})
    if licence_in_archive:
        licence = f"its licence file is copied unchanged into `{LICENSE_NAME}`."
    else:
        licence = (
            "the sdist does not include its licence file, but its source files carry\n"
            f"Apache-2.0 headers (setup.py among them), so `{LICENSE_NAME}` holds the unmodified text of\n"
            "the Apache License 2.0."
        )
    return f"""# BIG-bench data in lorlib

`{out.name}` holds {sum(r.rows for r in used)} examples from {len(used)} tasks ({len(families)} families) of
BIG-bench, the Beyond the Imitation Game benchmark (Srivastava et al., 2022,
https://github.com/google/BIG-bench). They come from the `task.json` files in the source
distribution `{SDIST}` on PyPI. BIG-bench is released under the Apache License 2.0;
{licence}

The examples were not written by us. `lorlib_ui/training/bigbench.py` sampled and reformatted them: it
kept the tasks and families listed in `bigbench_selection.json`; turned each example into one
input and one output (the first accepted target, or the best-scored option for multiple-choice
examples, whose options are kept); shortened each task's instruction; dropped empty, repeated
and over-long examples (input over {MAX_INPUT_CHARS} or output over {MAX_OUTPUT_CHARS} characters); evened out
the labels of classification-like tasks; kept at most {MAX_ROWS_PER_TASK} examples per task with a
fixed seed; and split each task 80/10/10 into train, validation and test. To rebuild the file,
byte for byte (the 358 MB sdist is downloaded from PyPI into the lorlib cache unless --tarball
names a local copy):

    python -m lorlib_ui.training.bigbench [--tarball bigbench-1.0.0.tar.gz]

BIG-bench asks that its canary string travel with its data, so that documents containing the
data can be found and kept out of training corpora:

{selection.canary}
"""


def print_summary(reports: list[TaskReport], seconds: float) -> None:
    width = max(len(r.name) for r in reports)
    print(f"  {'task':<{width}}  train  validation  test")
    for family in dict.fromkeys(r.family for r in reports):
        members = [r for r in reports if r.family == family]
        total = {split: sum(r.split_counts.get(split, 0) for r in members) for split in SPLITS}
        print(f"{family}: {len(members)} tasks, " + ", ".join(f"{s} {n}" for s, n in total.items()))
        for r in members:
            counts = f"{r.split_counts.get('train', 0):5d}  {r.split_counts.get('validation', 0):10d}  "
            counts += f"{r.split_counts.get('test', 0):4d}"
            notes = [f"dropped {r.drops()}"] if r.dropped else []
            if r.balanced_from is not None:
                notes.append(f"labels balanced from {r.balanced_from} rows")
            print(f"  {r.name:<{width}}  {counts}" + (f"  ({'; '.join(notes)})" if notes else ""))
    used = [r for r in reports if r.rows]
    families = len({r.family for r in used})
    print(f"{sum(r.rows for r in used)} rows, {len(used)} tasks, {families} families in {seconds:.1f} s")
    for r in reports:
        if r.problem:
            print(f"warning: task {r.path} is not used: {r.problem}", file=sys.stderr)
        elif r.rows < MIN_ROWS_WARNING:
            why = r.drops() or "nothing dropped"
            print(
                f"warning: task {r.path} has only {r.rows} rows: {r.examples_in_source} examples in task.json ({why})",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorlib_ui.training.bigbench", description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, default=None, help=f"the {SDIST_FILE} sdist (downloaded when absent)")
    parser.add_argument("--selection", type=Path, default=DEFAULT_SELECTION, help="the families and tasks to take")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the .jsonl.gz to write")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        tarball = fetch_tarball(args.tarball or default_tarball())
        reports = build(tarball, args.selection, args.out)
    except LorlibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(reports, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
