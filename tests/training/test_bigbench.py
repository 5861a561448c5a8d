import gzip
import hashlib
import io
import json
import random
import re
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training import bigbench
from lorlib_ui.training.bigbench import Example, balance_labels, build, fetch_tarball, instruction_of, main, task_rows
from lorlib_ui.training.data import SPLITS, load_tasks

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CANARY = "TOY DATA ONLY. canary GUID 00000000-0000-0000-0000-000000000000"
LICENCE = "Apache License\nVersion 2.0, January 2004\n"

TOY_ADD = {
    "description": "Add two numbers.",
    "examples": [{"input": f"{i} + {i}", "target": [str(2 * i), "other"]} for i in range(30)]
    + [
        {"input": " ", "target": "1"},
        {"input": "x" * 601, "target": "1"},
        {"input": "long answer", "target": "y" * 121},
        {"input": "0 + 0", "target": "0"},
    ],
}
TOY_MOOD = {
    "task_prefix": "Is the speaker happy?",
    "examples": [
        {"input": f"I feel {w}", "target_scores": {"yes": int(w == "great"), "no": int(w != "great")}}
        for w in ("great", "bad", "sad")
    ]
    + [{"input": "I feel both", "target_scores": {"yes": 1, "no": 1}}],
}


def add_member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_sdist(path, tasks, licence=LICENCE):
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "bigbench-1.0.0/README.md", b"toy")
        for task_path, task in tasks.items():
            data = task if isinstance(task, bytes) else json.dumps(task).encode()
            add_member(tar, f"bigbench-1.0.0/bigbench/benchmark_tasks/{task_path}/task.json", data)
        if licence is not None:
            add_member(tar, "bigbench-1.0.0/LICENSE", licence.encode())
    return path


def make_selection(path, families):
    path.write_text(json.dumps({"about": "toy", "source": {"canary": CANARY}, "families": families}))
    return path


@pytest.fixture
def toy(tmp_path):
    tarball = make_sdist(tmp_path / "bb.tar.gz", {"toy_add": TOY_ADD, "toy_mood/sub": TOY_MOOD, "unused": b"{not json"})
    selection = make_selection(tmp_path / "sel.json", {"math": ["toy_add"], "mood": ["toy_mood/sub", "toy_absent"]})
    return tarball, selection


def read_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_build_reformats_examples_and_writes_licence_and_notice(toy, tmp_path):
    tarball, selection = toy
    out = tmp_path / "assets" / "tasks.jsonl.gz"
    reports = {r.path: r for r in build(tarball, selection, out)}
    rows = read_rows(out)
    assert list(rows[0]) == ["task", "family", "instruction", "input", "output", "options", "split"]
    add = [r for r in rows if r["task"] == "toy_add"]
    assert len(add) == 30 and {r["family"] for r in add} == {"math"}
    assert {r["input"]: r["output"] for r in add}["7 + 7"] == "14"  # the first accepted target
    assert all(r["instruction"] == "Add two numbers." and r["options"] is None for r in add)
    assert reports["toy_add"].dropped == Counter(
        {"empty": 1, "input too long": 1, "output too long": 1, "repeated input": 1}
    )
    mood = {r["input"]: r for r in rows if r["task"] == "toy_mood.sub"}
    assert set(mood) == {"I feel great", "I feel bad", "I feel sad"}
    assert mood["I feel great"]["output"] == "yes" and mood["I feel sad"]["options"] == ["yes", "no"]
    assert mood["I feel bad"]["instruction"] == "Is the speaker happy?"
    assert reports["toy_mood/sub"].dropped == Counter({"no single best option": 1})
    assert "no task.json" in reports["toy_absent"].problem and reports["toy_absent"].rows == 0
    assert [r["split"] for r in add] == sorted((r["split"] for r in add), key=SPLITS.index)
    assert Counter(r["split"] for r in add) == {"train": 24, "validation": 3, "test": 3}
    assert (out.parent / "BIGBENCH_LICENSE.txt").read_text() == LICENCE
    notice = (out.parent / "BIGBENCH_NOTICE.md").read_text()
    assert (
        CANARY in notice and "python -m lorlib_ui.training.bigbench" in notice and "33 examples from 2 tasks" in notice
    )


def test_build_gives_the_same_bytes_twice(toy, tmp_path):
    tarball, selection = toy
    first, second = tmp_path / "a" / "t.jsonl.gz", tmp_path / "b" / "t.jsonl.gz"
    build(tarball, selection, first)
    build(tarball, selection, second)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes()[4:8] == b"\0\0\0\0"  # gzip header timestamp
    assert (first.parent / "BIGBENCH_NOTICE.md").read_text() == (second.parent / "BIGBENCH_NOTICE.md").read_text()


def test_built_rows_load_as_multitask_data(toy, tmp_path):
    tarball, selection = toy
    build(tarball, selection, tmp_path / "t.jsonl.gz")
    data = load_tasks(tmp_path / "t.jsonl.gz")
    assert data.tasks == ["toy_add", "toy_mood.sub"] and data.families == ["math", "mood"]
    assert data.rows("toy_add", "test")[0]["input"].startswith("Add two numbers.\n\n")


def _labelled(counts):
    return [Example(f"{label} {i}", label, None) for label, n in counts.items() for i in range(n)]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"no": 900, "yes": 100}, {"no": 200, "yes": 100}),  # at most twice the rarest label
        ({"no": 500, "yes": 5}, {"no": 50, "yes": 5}),  # but never fewer than MIN_ROWS_PER_LABEL
        ({"a": 800, "b": 100, "c": 5}, {"a": 200, "b": 100, "c": 5}),  # a stray label does not set the cap
        ({"a": 60, "b": 40}, {"a": 60, "b": 40}),  # balanced enough already
    ],
)
def test_balance_labels_on_skewed_tasks(counts, expected):
    examples = _labelled(counts)
    balanced = balance_labels(examples, random.Random(0))
    assert Counter(e.output for e in balanced) == expected
    assert balanced == [e for e in examples if e in set(balanced)]  # order kept


def test_free_form_tasks_are_not_balanced():
    examples = [Example(f"q{i}", f"a{i % 50}", None) for i in range(1000)]  # 50 outputs: not a few labels
    assert balance_labels(examples, random.Random(0)) == examples


def test_task_rows_caps_each_task():
    skewed = {"examples": [{"input": f"q{i}", "target": "no" if i % 10 else "yes"} for i in range(2000)]}
    rows, report = task_rows("skewed", "f", skewed)
    labels = Counter(r["output"] for r in rows)  # 400 no and 200 yes after balancing, then 400 of those
    assert labels.total() == 400 and 1.5 < labels["no"] / labels["yes"] < 2.5
    assert report.balanced_from == 2000 and report.split_counts == {"train": 320, "validation": 40, "test": 40}
    free = {"examples": [{"input": f"q{i}", "target": f"a{i}"} for i in range(1000)]}
    assert len(task_rows("free", "f", free)[0]) == bigbench.MAX_ROWS_PER_TASK


def test_instruction_is_one_short_line():
    long = "Read the passage. " * 30 + "Then answer."
    text = instruction_of({"description": long})
    assert len(text) <= bigbench.MAX_INSTRUCTION_CHARS and text.endswith("passage.")
    assert instruction_of({"task_prefix": "  Q:\n be brief ", "description": "d"}) == "Q: be brief"
    assert instruction_of({}) == ""


def test_summary_warns_about_unused_and_small_tasks(toy, tmp_path, capsys):
    tarball, selection = toy
    assert main(["--tarball", str(tarball), "--selection", str(selection), "--out", str(tmp_path / "t.jsonl.gz")]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"toy_add\s+24\s+3\s+3", out) and "33 rows, 2 tasks, 2 families" in out
    assert "warning: task toy_absent is not used: no task.json" in err
    assert "warning: task toy_mood/sub has only 3 rows: 4 examples in task.json (1 no single best option)" in err


def test_archive_without_licence_gets_the_committed_apache_text(tmp_path):
    # The real 1.0.0 sdist ships no LICENSE file.
    unlicensed = make_sdist(tmp_path / "nolicence.tar.gz", {"toy_add": TOY_ADD}, licence=None)
    selection = make_selection(tmp_path / "sel.json", {"math": ["toy_add"]})
    build(unlicensed, selection, tmp_path / "out" / "t.jsonl.gz")
    copied = (tmp_path / "out" / "BIGBENCH_LICENSE.txt").read_bytes()
    assert copied == (ASSETS / "BIGBENCH_LICENSE.txt").read_bytes()
    assert "does not include its licence file" in (tmp_path / "out" / "BIGBENCH_NOTICE.md").read_text()


def test_unusable_archives_and_selections(tmp_path, capsys):
    selection = make_selection(tmp_path / "sel.json", {"math": ["toy_add"]})
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(LorlibError, match="not a readable .tar.gz"):
        build(junk, selection, tmp_path / "t.jsonl.gz")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"families": {"x": ["a/../b?"]}}))
    assert main(["--tarball", str(junk), "--selection", str(bad), "--out", str(tmp_path / "t.jsonl.gz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_fetch_tarball_downloads_the_sdist_with_pip(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / "bigbench-1.0.0.tar.gz").write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bigbench.subprocess, "run", fake_run)
    target = tmp_path / "cache" / "bigbench-1.0.0.tar.gz"
    assert fetch_tarball(target).read_bytes() == b"sdist"
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "bigbench==1.0.0" in calls[0]
    assert fetch_tarball(target) == target and len(calls) == 1  # present: no second download

    monkeypatch.setattr(
        bigbench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: offline")
    )
    with pytest.raises(LorlibError, match="could not download bigbench==1.0.0 from PyPI: ERROR: offline"):
        fetch_tarball(tmp_path / "elsewhere" / "bigbench-1.0.0.tar.gz")


# What `python -m lorlib_ui.training.bigbench` reported for the committed file.
EXPECTED_TASKS = 64
EXPECTED_FAMILIES = 14


def test_committed_dataset():
    rows = read_rows(ASSETS / "bigbench_tasks.jsonl.gz")
    selection = json.loads((ASSETS / "bigbench_selection.json").read_text())
    family_of = {path.replace("/", "."): family for family, paths in selection["families"].items() for path in paths}
    splits_of: dict[str, set] = {}
    for row in rows:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", row["task"]) and family_of[row["task"]] == row["family"]
        assert row["input"].strip() and row["output"].strip() and row["split"] in SPLITS
        assert row["options"] is None or row["output"] in row["options"]
        splits_of.setdefault(row["task"], set()).add(row["split"])
    assert len(splits_of) == EXPECTED_TASKS and len({r["family"] for r in rows}) == EXPECTED_FAMILIES
    assert all(splits == set(SPLITS) for splits in splits_of.values())
    assert max(Counter(r["task"] for r in rows).values()) <= bigbench.MAX_ROWS_PER_TASK
    assert selection["source"]["canary"] in (ASSETS / "BIGBENCH_NOTICE.md").read_text()
    # the unmodified Apache License 2.0 text, as published at apache.org/licenses/LICENSE-2.0.txt
    assert hashlib.md5((ASSETS / "BIGBENCH_LICENSE.txt").read_bytes()).hexdigest() == "3b83ef96387f14655fc854ddc3c6bd57"
    assert len(load_tasks("default").tasks) == EXPECTED_TASKS
