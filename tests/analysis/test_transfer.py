"""The transfer matrix: each expert alone scored on each task, stored in the library, incremental."""

import json

import pytest
import torch
from conftest import library_snapshot, make_adapter, run

from lorlib_ui.analysis.transfer import BASE, TransferOptions, load_transfer, transfer_library
from lorlib_ui.core.adapters import read_adapter
from lorlib_ui.core.library import Library, expert_from_adapter
from lorlib_ui.training.reporter import Reporter
from lorlib_ui.training.training import Cancelled

TASKS = ("fox", "dog")


@pytest.fixture(scope="module")
def fox_dog(tmp_path_factory, tiny_base):
    """Two tasks with fixed answers ('fox', 'dog'), one expert trained on each, and 'antifox', the
    fox expert's update negated (B -> -B), built to hurt the fox task. Only v_proj is adapted: with
    q and k adapted too, the product of their updates survives the negation and antifox helps."""
    from lorlib_ui.training.building import BuildOptions, build_library
    from lorlib_ui.training.config import TrainConfig

    root = tmp_path_factory.mktemp("foxdog")
    rows = [{"task": t, "family": "animals", "input": f"say a word {i}", "output": t} for t in TASKS for i in range(30)]
    data = root / "fixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = TrainConfig(steps=60, batch_size=4, learning_rate=3e-2, rank=8, targets=("v_proj",))
    build_library(root / "lib", BuildOptions(data=str(data), shared=False, base_model=str(tiny_base)), config)
    lib = Library.open(root / "lib")
    adapter = read_adapter(root / "lib" / lib.expert("fox").path)
    adapter.factors = {m: (a, -b) for m, (a, b) in adapter.factors.items()}
    lib.add_experts([(expert_from_adapter("antifox", adapter, lib.base_model), adapter)])
    return root / "lib", data


@pytest.fixture
def library(fox_dog, tmp_path):
    import shutil

    path, data = fox_dog
    shutil.copytree(path, tmp_path / "lib")
    return tmp_path / "lib", data


def _by_hand(path, data, task: str, spec: str, limit: int) -> list[float]:
    """Each test row's mean log-probability per answer token, from one unbatched forward pass."""
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router
    from lorlib_ui.training.data import load_tasks

    rm = RoutedModel.load(Library.open(path), device="cpu")
    rows = load_tasks(str(data)).rows(task, "test")[:limit]
    router = make_router(spec, rm.experts)
    out = []
    for row in rows:
        prompt = rm.tokenizer(row["input"])["input_ids"]
        answer = rm.tokenizer(" " + row["output"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.inference_mode(), rm.routing(router):
            logp = torch.log_softmax(rm.model(input_ids=ids).logits[0].float(), dim=-1)
        picked = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(answer)]
        out.append(float(sum(picked) / len(picked)))
    return out


def test_cells_equal_a_hand_computation_and_gain_says_who_helps(library):
    path, data = library
    matrix, counts = transfer_library(
        str(path), TransferOptions(tasks=("fox", "dog"), data=str(data), limit=3, exact_match=True)
    )
    assert counts == {"computed": 8, "reused": 0}
    assert matrix.columns == [BASE, "dog", "fox", "antifox"] and matrix.tasks == ["fox", "dog"]  # library order
    for task in TASKS:
        for column in matrix.columns:
            spec = "base" if column == BASE else f"expert:{column}"
            expected = _by_hand(path, data, task, spec, 3)
            assert matrix.per_row[task, column]["loglik"] == pytest.approx(expected, abs=1e-4)
    gain = matrix.gain()
    fox, dog = matrix.tasks.index("fox"), matrix.tasks.index("dog")
    fox_col, dog_col, anti = (matrix.columns.index(c) for c in ("fox", "dog", "antifox"))
    # measured: fox +0.57 and antifox -0.21 on the fox task; each task's own expert leads by > 0.3
    assert gain[fox, fox_col] > 0.3 and gain[fox, anti] < -0.1  # the fox expert helps fox, its negation hurts it
    assert gain[fox, fox_col] > gain[fox, dog_col] + 0.2 and gain[dog, dog_col] > gain[dog, fox_col] + 0.2
    assert (gain[:, 0] == 0).all()
    for (task, column), cell in matrix.per_row.items():
        assert set(cell["exact_match"]) <= {0.0, 1.0} and len(cell["exact_match"]) == 3
        i, j = matrix.tasks.index(task), matrix.columns.index(column)
        assert matrix.exact_match[i, j] == pytest.approx(sum(cell["exact_match"]) / 3)
    assert matrix.rows.tolist() == [[3] * 4, [3] * 4]


def test_a_rerun_computes_only_missing_or_stale_cells(library):
    from lorlib_ui.core.adapters import read_adapter

    path, data = library
    experts = ("dog", "fox")
    _, counts = transfer_library(str(path), TransferOptions(tasks=("fox",), experts=experts, data=str(data), limit=2))
    assert counts == {"computed": 3, "reused": 0}
    _, counts = transfer_library(
        str(path), TransferOptions(tasks=("fox", "dog"), experts=experts, data=str(data), limit=2)
    )
    assert counts == {"computed": 3, "reused": 3}  # only the dog task's cells
    _, counts = transfer_library(
        str(path), TransferOptions(tasks=("fox", "dog"), experts=experts, data=str(data), limit=2)
    )
    assert counts == {"computed": 0, "reused": 6}
    _, counts = transfer_library(str(path), TransferOptions(tasks=("fox",), experts=experts, data=str(data), limit=1))
    assert counts == {"computed": 3, "reused": 0}  # other rows: computed again
    # replacing the dog expert (with the fox expert's weights) invalidates its column only
    lib = Library.open(path)
    fox = lib.expert("fox")
    adapter = read_adapter(path / fox.path)
    entry = lib.expert("dog")
    lib.add_experts([(entry, adapter)], force=True)
    stale = load_transfer(Library.open(path))
    assert "dog" not in stale.columns and stale.columns == [BASE, "fox"]
    _, counts = transfer_library(str(path), TransferOptions(tasks=("fox",), experts=experts, data=str(data), limit=1))
    assert counts == {"computed": 1, "reused": 2}
    lib.remove_expert("dog")
    assert load_transfer(Library.open(path)).columns == [BASE, "fox"]


def test_the_matrix_is_a_side_file_named_in_the_manifest(library):
    path, data = library
    transfer_library(str(path), TransferOptions(tasks=("dog",), experts=("dog",), data=str(data), limit=2))
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["side_files"]["transfer"]
    assert entry["file"] == "transfer.json" and entry["cells"] == 2
    stored = json.loads((path / "transfer.json").read_text())
    assert set(stored["cells"]["dog"]) == {BASE, "dog"}
    assert not [p for p in path.iterdir() if p.name.startswith(".transfer")]  # no temporary left
    (path / "transfer.json").write_text("{not json")  # damaged: treated as absent, recomputed
    assert load_transfer(Library.open(path)) is None
    _, counts = transfer_library(str(path), TransferOptions(tasks=("dog",), experts=("dog",), data=str(data), limit=2))
    assert counts["computed"] == 2


def test_cancel_keeps_the_columns_already_finished(library):
    path, data = library
    seen = []

    reporter = Reporter(progress=lambda count: seen.append(count.what), cancelled=lambda: len(seen) >= 2)
    with pytest.raises(Cancelled):
        transfer_library(str(path), TransferOptions(tasks=("fox",), data=str(data), limit=1), reporter)
    kept = load_transfer(Library.open(path))
    assert kept.columns == [BASE, "dog"] and seen == [BASE, "dog"]


def test_command_line_prints_the_matrix_and_refuses_bad_input(library, capsys):
    path, data = library
    code, out, err = run(capsys, "transfer", path, "--tasks", "fox,dog", "--data", data, "--limit", "2", "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert printed["columns"] == [BASE, "dog", "fox", "antifox"] and len(printed["gain"]) == 2
    assert printed["computed"] == 8
    code, out, err = run(capsys, "transfer", path, "--tasks", "fox", "--data", data, "--limit", "2")
    assert code == 0 and "antifox" in out and "reused 4" in err
    before = library_snapshot(path)
    for argv, message in (
        (["--tasks", "fox", "--experts", "cat"], "unknown expert 'cat'"),
        (["--tasks", "fox", "--experts", "cluster"], "has no cluster experts"),
        (["--tasks", "nope"], "no task 'nope'"),
        (["--tasks", "held-out"], "holds no tasks out"),
        (["--tasks", "fox", "--limit", "0"], "must be positive"),
    ):
        code, out, err = run(capsys, "transfer", path, "--data", data, *argv)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert library_snapshot(path) == before


def test_a_changed_library_keeps_its_stale_cells_for_showing_and_says_what_changed(tiny_library, tiny_base, tmp_path):
    """After the matrix is scored, task0 is retrained and an expert is added: the normal read drops
    task0's column; the stale read keeps it, names task0 retrained and the new expert unscored."""
    import time

    from lorlib_ui.analysis.transfer import _store, column_keys, stale_transfer
    from lorlib_ui.core.derived import Changes

    keys = column_keys(tiny_library)
    for column in [BASE, *tiny_library.names]:
        cell = {"key": keys[column], "loglik": [-3.0 + (column == "task0")], "exact_match": None, "family": "f"}
        _store(tiny_library, column, {"t": cell})
    assert stale_transfer(Library.open(tiny_library.path))[1] == Changes()  # unchanged: nothing stale
    time.sleep(1.1)  # the new expert is created a second after the matrix: times count to the second
    retrained = read_adapter(make_adapter(tmp_path / "retrained", tiny_base, seed=70))
    extra = read_adapter(make_adapter(tmp_path / "extra", tiny_base, seed=71))
    tiny_library.add_experts([(expert_from_adapter("task0", retrained, "tiny"), retrained)], force=True)
    tiny_library.add_experts([(expert_from_adapter("extra", extra, "tiny"), extra)])
    library = Library.open(tiny_library.path)
    assert "task0" not in load_transfer(library).columns  # never judged by
    matrix, changed = stale_transfer(library)
    assert changed == Changes(added=("extra",), retrained=("task0",))
    assert "task0" in matrix.columns and "extra" not in matrix.columns
    assert matrix.loglik[0, matrix.columns.index("task0")] == -2.0  # its cell, from its old weights
