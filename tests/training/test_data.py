import gzip
import json

import datasets
import pandas as pd
import pytest

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.data import SPLITS, MultiTaskData, assign_splits, load_tasks

ROWS = [
    {"task": "add", "family": "math", "input": "1+1", "output": "2", "split": "train"},
    {"task": "add", "family": "math", "input": "2+2", "output": "4", "split": "validation"},
    {"task": "add", "family": "math", "input": "3+3", "output": "6", "split": "test"},
    {"task": "mood", "family": "text", "input": "I am glad", "output": "happy", "split": "train"},
]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(LorlibError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_jsonl_with_our_own_column_names(tmp_path):
    data = load_tasks(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert isinstance(data, MultiTaskData) and len(data) == 4
    assert data.tasks == ["add", "mood"] and data.families == ["math", "text"]
    assert list(data.frame.columns) == ["task", "family", "input", "output", "options", "split"]
    assert all(data.frame[column].dtype == object for column in data.frame.columns)
    assert data.rows("add", "validation") == [{"input": "2+2", "output": "4", "options": None}]
    assert data.split_sizes() == {
        "add": {"train": 1, "validation": 1, "test": 1},
        "mood": dict.fromkeys(SPLITS, 0) | {"train": 1},
    }


def test_jsonl_lines_end_only_at_newlines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"task": "t", "input": "a\u2028b\x85c", "output": "d"}, ensure_ascii=False) + "\n")
    assert load_tasks(path).rows("t", "train")[0]["input"] == "a\u2028b\x85c"


def test_jsonl_gz_reads_like_jsonl(tmp_path):
    plain = load_tasks(write_jsonl(tmp_path / "d.jsonl", ROWS))
    zipped = load_tasks(write_jsonl(tmp_path / "d.jsonl.gz", ROWS, opener=gzip.open))
    pd.testing.assert_frame_equal(plain.frame, zipped.frame)


def test_instruction_is_prepended_and_options_kept(tmp_path):
    rows = [
        {
            "task": "t",
            "instruction": "Answer yes or no.",
            "input": "Is snow white?",
            "output": "yes",
            "options": ["yes", "no"],
        },
        {"task": "t", "instruction": " ", "input": "Is coal white?", "output": "no", "options": None},
    ]
    data = load_tasks(write_jsonl(tmp_path / "d.jsonl", rows))
    assert list(data.frame["input"]) == ["Answer yes or no.\n\nIs snow white?", "Is coal white?"]
    assert list(data.frame["options"]) == [("yes", "no"), None]


def test_flan_columns_load_as_they_are(tmp_path):
    flan = pd.DataFrame(
        {
            "source": ["Translate: chat", "Translate: chien", "Is it true? yes"],
            "target": ["cat", "dog", "yes"],
            "task_name": ["wmt_fr_en", "wmt_fr_en", "boolq"],
            "task_source": ["Flan2021", "Flan2021", "T0"],
            "split": ["train", "validation", "test"],
        }
    )
    flan.to_parquet(tmp_path / "flan.parquet")
    data = load_tasks(tmp_path / "flan.parquet")
    assert data.tasks == ["boolq", "wmt_fr_en"] and data.family_of("wmt_fr_en") == "Flan2021"
    assert data.rows("wmt_fr_en", "validation") == [{"input": "Translate: chien", "output": "dog", "options": None}]
    assert data.rows("boolq", "test")[0]["output"] == "yes"


def test_csv_keeps_every_cell_as_text_and_takes_column_overrides(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text(
        'kind,question,answer,split\nquiz,"Agent, number?",007,dev\nquiz,Missing?,NA,train\n', encoding="utf-8"
    )
    data = load_tasks(path, columns={"task": "kind", "input": "question", "output": "answer"})
    assert list(data.frame["output"]) == ["007", "NA"]
    assert list(data.frame["split"]) == ["validation", "train"]
    assert data.frame["input"][0] == "Agent, number?"


def test_prompt_response_and_category_columns(tmp_path):
    rows = [{"task_name": "t", "prompt": "p", "response": "r", "category": "c"}]
    data = load_tasks(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.rows("t")[0]["input"] == "p" and data.rows("t")[0]["output"] == "r" and data.families == ["c"]


def test_parquet_lists_and_numbers(tmp_path):
    pd.DataFrame(
        {"task": ["t", "t"], "input": ["a", "b"], "output": [42, 7], "options": [["42", "41"], None]}
    ).to_parquet(tmp_path / "d.parquet")
    frame = load_tasks(tmp_path / "d.parquet", seed=1).frame
    assert list(frame["output"]) == ["42", "7"] and list(frame["options"]) == [("42", "41"), None]


def test_single_task_source_needs_a_name(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"input": "x", "output": "y"}])
    assert "no task column" in one_line_error(load_tasks, path)
    data = load_tasks(path, task="mine")
    assert data.tasks == ["mine"] and data.families == ["mine"]


def test_saved_dataset_folders(tmp_path):
    flat = {"task_name": ["t", "t"], "source": ["a", "b"], "target": ["1", "2"], "split": ["train", "test"]}
    datasets.Dataset.from_dict(flat).save_to_disk(str(tmp_path / "flat"))
    assert load_tasks(tmp_path / "flat").rows("t", "test") == [{"input": "b", "output": "2", "options": None}]

    part = {"task": ["t", "u"], "input": ["a", "b"], "output": ["1", "2"]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(part), "validation": datasets.Dataset.from_dict(part)}
    ).save_to_disk(str(tmp_path / "dict"))
    data = load_tasks(tmp_path / "dict")
    assert data.split_sizes() == {name: {"train": 1, "validation": 1, "test": 0} for name in ("t", "u")}


def test_hub_ids_go_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, subset):
        calls.append((name, subset))
        part = datasets.Dataset.from_dict({"task_name": ["t"], "source": ["a"], "target": ["b"]})
        return datasets.DatasetDict({"test": part})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_tasks("someone/flan-10k-flat", subset="tiny")
    assert calls == [("someone/flan-10k-flat", "tiny")] and data.origin == "someone/flan-10k-flat"
    assert data.rows("t", "test") == [{"input": "a", "output": "b", "options": None}]

    def offline(name, subset):
        raise ConnectionError("Couldn't reach the hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert one_line_error(load_tasks, "someone/flan-10k-flat") == (
        "someone/flan-10k-flat: could not load from the hub (Couldn't reach the hub)"
    )


def test_optional_readers_say_what_to_install(tmp_path, monkeypatch):
    import importlib.util
    import sys

    (tmp_path / "saved").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    assert "needs datasets (pip install datasets)" in one_line_error(load_tasks, tmp_path / "saved")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "pyarrow" else real_find_spec(name))
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    assert "needs pyarrow (pip install pyarrow)" in one_line_error(load_tasks, tmp_path / "d.parquet")


def test_automatic_split_is_80_10_10_per_task_and_deterministic(tmp_path):
    rows = [{"task": "big", "input": f"q{i}", "output": "a"} for i in range(1000)]
    rows += [{"task": "small", "input": f"q{i}", "output": "a"} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_tasks(path)
    assert data.split_sizes() == {
        "big": {"train": 800, "validation": 100, "test": 100},
        "small": {"train": 40, "validation": 5, "test": 5},
    }
    assert list(load_tasks(path).frame["split"]) == list(data.frame["split"])
    assert list(load_tasks(path, seed=1).frame["split"]) != list(data.frame["split"])
    # a task's split does not depend on the other tasks loaded with it
    alone = load_tasks(write_jsonl(tmp_path / "small.jsonl", rows[1000:])).frame["split"]
    assert list(alone) == list(data.frame["split"][1000:])


@pytest.mark.parametrize(
    ("count", "expected"), [(0, (0, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (14, (12, 1, 1)), (15, (11, 2, 2))]
)
def test_assign_splits_sizes(count, expected):
    labels = assign_splits(count, "k")
    assert tuple(labels.count(s) for s in SPLITS) == expected
    assert labels == assign_splits(count, "k")


def test_select_and_lookups(tmp_path):
    data = load_tasks(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert data.tasks_in("math") == ["add"]
    assert data.select(families=["text"]).tasks == ["mood"]
    assert len(data.select(tasks=["add"], families=["math"])) == 3
    assert "no task 'sub'" in one_line_error(data.select, tasks=["sub"])
    assert "no family 'art'" in one_line_error(data.tasks_in, "art")
    assert "no rows match" in one_line_error(data.select, tasks=["add"], families=["text"])
    assert "split must be one of" in one_line_error(data.rows, "add", "dev")


def _bad_utf8_csv(path):
    path.write_bytes(b"task,input,output\nt,caf\xe9,x\n")


def _bad_gzip(path):
    path.write_bytes(b"not gzip at all")


ERRORS = [
    ("d.jsonl", '{"task": "t", "input": "a", "output": "b"}\n{"task": "t", "input": \n', "line 2 is not valid JSON"),
    ("d.jsonl", '["t", "a", "b"]\n', "line 1 is not a JSON object"),
    (
        "d.jsonl",
        '{"task": "t", "input": "a", "output": "b"}\n\n{"task": "t", "input": "c"}\n',
        "line 3, column 'output': missing",
    ),
    (
        "d.jsonl",
        '{"task": "t", "input": "a", "output": ["b", "c"]}\n',
        "line 1, column 'output': expected text, got list",
    ),
    ("d.jsonl", '{"task": "", "input": "a", "output": "b"}\n', "line 1, column 'task': empty"),
    (
        "d.jsonl",
        '{"task": "t", "input": "a", "output": "b", "split": "holdout"}\n',
        "line 1, column 'split': unknown split 'holdout'",
    ),
    (
        "d.jsonl",
        '{"task": "t", "input": "a", "output": "b", "options": 3}\n',
        "line 1, column 'options': expected a list",
    ),
    (
        "d.jsonl",
        '{"task": "t", "input": "a", "output": "b", "options": "[oops"}\n',
        "line 1, column 'options': options are not",
    ),
    ("d.jsonl", '{"task": "t", "question": "a", "output": "b"}\n', "no input column (looked for source, input, prompt"),
    ("d.jsonl", "\n\n", "no rows"),
    ("d.csv", "task,input,output\nt,a,b\nt,,c\n", "row 2, column 'input': empty"),
    ("d.csv", "task,input,output\nt,a,b\nt,a,b,extra\n", "malformed CSV"),
    ("d.csv", "", "empty CSV file"),
    ("d.csv", _bad_utf8_csv, "line 2 is not valid UTF-8"),
    ("d.jsonl.gz", _bad_gzip, "not a valid gzip file"),
    ("d.parquet", "PAR1 but not really", "not a readable parquet file"),
    ("d.txt", "task,input,output\n", "unknown format"),
]


@pytest.mark.parametrize(("name", "content", "expected"), ERRORS)
def test_errors_name_the_file_row_and_column(tmp_path, name, content, expected):
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_text(content, encoding="utf-8")
    message = one_line_error(load_tasks, path)
    assert message.startswith(str(path)) and expected in message


def test_overridden_column_must_exist(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    message = one_line_error(load_tasks, path, columns={"input": "question"})
    assert message.startswith(str(path)) and "no column 'question' for input" in message
    assert "unknown field 'prompt_text'" in one_line_error(load_tasks, path, columns={"prompt_text": "input"})


def test_missing_source_is_neither_file_nor_hub_id(tmp_path):
    assert "no such file or folder" in one_line_error(load_tasks, tmp_path / "absent.jsonl")
