"""MBC over a library: the Gram matrix of the experts' weight vectors, summed block by block."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_adapter

from lorlib_ui.core.adapters import WEIGHTS_FILE
from lorlib_ui.core.derived import KINDS
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library
from lorlib_ui.training import clusters
from lorlib_ui.training.clusters import embed_library, task_experts, weight_gram
from lorlib_ui.training.mbc import embed, sparsify

MBC_GRAM = KINDS["mbc-gram"].file


def dense_vectors(library):
    """The n x D matrix the streaming path never builds: each expert's factors flattened module
    by module in sorted order, as float32."""
    rows = []
    for expert in task_experts(library):
        factors = library.load_adapter(expert.name).factors
        rows.append(torch.cat([t.float().reshape(-1) for m in sorted(factors) for t in factors[m]]))
    return torch.stack(rows).numpy()


def assert_gram_close(actual, desired):
    """Equal up to float32 sums: the blocks' products are float32, so an entry that is a small
    difference of large terms is off by about u·‖x_i‖‖x_j‖, not relative to itself."""
    scale = np.abs(np.diag(desired)).max()
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("block_bytes", [1, 1 << 20, clusters.BLOCK_BYTES])  # a module per block .. one block
def test_weight_gram_is_the_gram_of_the_sparsified_vectors(tiny_library, monkeypatch, block_bytes):
    monkeypatch.setattr(clusters, "BLOCK_BYTES", block_bytes)
    reference = sparsify(dense_vectors(tiny_library), 0.3).astype(np.float64)
    gram = weight_gram(tiny_library, task_experts(tiny_library), 0.3)
    assert gram.dtype == np.float64 and gram.shape == (6, 6)
    assert_gram_close(gram, reference @ reference.T)


def test_column_blocks_cover_every_module_once_in_order():
    layout = {"a": (2, 2), "b": (3, 3), "c": (1, 1), "d": (10, 10)}
    assert clusters._column_blocks(sorted(layout), layout, 8) == [["a"], ["b", "c"], ["d"]]
    assert clusters._column_blocks(sorted(layout), layout, 1000) == [["a", "b", "c", "d"]]


def test_library_embedding_equals_the_in_memory_one(tiny_library, monkeypatch):
    monkeypatch.setattr(clusters, "BLOCK_BYTES", 1)
    names = [e.name for e in task_experts(tiny_library)]
    _, streamed = embed_library(tiny_library)
    in_memory = embed(names, dense_vectors(tiny_library))
    assert streamed.names == names
    np.testing.assert_allclose(streamed.similarity, in_memory.similarity, atol=1e-6)


def test_an_expert_replaced_between_the_passes_is_refused(tiny_library, monkeypatch):
    """The thresholds of pass 1 and the blocks of pass 2 must come from the same weights."""
    blocks = clusters._column_blocks
    target = tiny_library.path / tiny_library.expert("task2").path / WEIGHTS_FILE

    def replacing_first(*args):  # called once, between the passes
        shutil.copy(target, target.with_suffix(".new"))
        os.replace(target.with_suffix(".new"), target)  # same bytes, a new file, as the library writes
        return blocks(*args)

    monkeypatch.setattr(clusters, "_column_blocks", replacing_first)
    with pytest.raises(LorlibError, match="task2 changed on disk while it was clustered; run again"):
        weight_gram(tiny_library, task_experts(tiny_library), 0.5)


def test_bad_quantile_is_refused_before_reading(tiny_library, monkeypatch):
    monkeypatch.setattr(tiny_library, "load_adapter", lambda name: pytest.fail("read an adapter"))
    with pytest.raises(LorlibError, match="sparsity quantile"):
        weight_gram(tiny_library, task_experts(tiny_library), 1.0)


def test_experts_stored_in_other_dtypes_are_read_as_float32(tiny_library):
    """One expert in bfloat16, the others in float32: the blocks hold each one's own values."""
    from safetensors.torch import load_file, save_file

    path = tiny_library.path / tiny_library.expert("task1").path / WEIGHTS_FILE
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    reference = sparsify(dense_vectors(tiny_library), 0.5).astype(np.float64)
    gram = weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    assert_gram_close(gram, reference @ reference.T)


def test_the_shipped_library_clusters_the_same_streamed_or_in_memory(tmp_path):
    """Issue #15: the Gram path (never holding n x D) gives the shipped library the clusters of
    the in-memory path, at the k it was built with."""
    from lorlib_ui.cli.default_library import OUT
    from lorlib_ui.core.library import Library
    from lorlib_ui.training.mbc import adjusted_rand_index, mbc_cluster

    shipped = Library.open(shutil.copytree(OUT, tmp_path / "library"))  # its kept Gram matrix unused
    (shipped.path / MBC_GRAM).unlink(missing_ok=True)
    k = len(shipped.clusters["members"])
    names = [e.name for e in task_experts(shipped)]
    _, streamed = embed_library(shipped)
    in_memory = embed(names, dense_vectors(shipped))
    np.testing.assert_allclose(streamed.similarity, in_memory.similarity, atol=1e-5)
    labels = [str(label) for label in mbc_cluster(in_memory, k)]
    assert adjusted_rand_index(mbc_cluster(streamed, k), labels) == 1.0


# ---- the Gram matrix the library keeps (the cluster view of 1,024 experts) ---------------------


def fresh_gram(library, keep_quantile=0.5):
    """The Gram matrix computed from the weights alone, as if nothing were kept."""
    reference = sparsify(dense_vectors(library), keep_quantile).astype(np.float64)
    return reference @ reference.T


def computed_rows(monkeypatch) -> list[list[str]]:
    """Records, call by call, the experts whose rows `weight_gram` computes from the weights."""
    calls = []
    compute = clusters._gram_rows

    def recording(library, experts, new, *args, **kwargs):
        calls.append([experts[i].name for i in new])
        return compute(library, experts, new, *args, **kwargs)

    monkeypatch.setattr(clusters, "_gram_rows", recording)
    return calls


def test_a_kept_gram_is_read_not_computed(tiny_library, monkeypatch):
    calls = computed_rows(monkeypatch)
    first = weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    assert (tiny_library.path / MBC_GRAM).is_file()
    monkeypatch.setattr(clusters, "read_spans", lambda *a: pytest.fail("read an adapter's weights"))
    again = weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    assert calls == [[f"task{i}" for i in range(6)]]  # every row once, then none
    np.testing.assert_array_equal(again, first)
    assert_gram_close(again, fresh_gram(tiny_library))


def test_only_the_rows_of_new_and_replaced_experts_are_computed(tiny_library, tiny_base, tmp_path, monkeypatch):
    from lorlib_ui.core.adapters import read_adapter
    from lorlib_ui.core.library import expert_from_adapter

    weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    calls = computed_rows(monkeypatch)
    entries = []
    for name, seed in [("task2", 40), ("task9", 41)]:  # task2 replaced, task9 new
        adapter = read_adapter(make_adapter(tmp_path / name, tiny_base, seed=seed))
        entries.append((expert_from_adapter(name, adapter, tiny_library.base_model, kind="private"), adapter))
    tiny_library.add_experts(entries, force=True)
    gram = weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    assert calls == [["task2", "task9"]]
    assert_gram_close(gram, fresh_gram(tiny_library))
    kept = clusters._stored_gram(tiny_library)
    assert sorted(kept.rows) == sorted(e.weights_hash for e in task_experts(tiny_library))  # the old task2 is gone


def test_another_quantile_is_computed_whole_and_leaves_the_kept_matrix(tiny_library, monkeypatch):
    weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    kept = (tiny_library.path / MBC_GRAM).read_bytes()
    calls = computed_rows(monkeypatch)
    assert_gram_close(weight_gram(tiny_library, task_experts(tiny_library), 0.3), fresh_gram(tiny_library, 0.3))
    assert_gram_close(weight_gram(tiny_library, task_experts(tiny_library), 0.3), fresh_gram(tiny_library, 0.3))
    assert [len(rows) for rows in calls] == [6, 6]
    assert (tiny_library.path / MBC_GRAM).read_bytes() == kept
    weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    assert len(calls) == 2  # the default quantile's matrix is still the kept one


def _rewrite_kept(library, tensors=None, **metadata):
    """The kept matrix written again with some of its tensors or metadata changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = library.path / MBC_GRAM
    with safe_open(path, "pt") as handle:
        stored = handle.metadata()
    save_file({**load_file(path), **(tensors or {})}, path, metadata={**stored, **metadata})


@pytest.mark.parametrize(
    "damage",
    [
        "bytes",  # not a safetensors file
        "format",  # written by a lorlib that built the vectors otherwise
        "not finite",
        "negative diagonal",
        "hashes",  # not a list of strings
        "shape",
    ],
)
def test_a_damaged_or_foreign_kept_matrix_is_computed_again(tiny_library, monkeypatch, damage):
    gram = weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    if damage == "bytes":
        (tiny_library.path / MBC_GRAM).write_bytes(b"\x00" * 64)
    elif damage == "format":
        _rewrite_kept(tiny_library, format="0")
    elif damage == "not finite":
        bad = torch.from_numpy(gram.copy())
        bad[2, 3] = float("nan")
        _rewrite_kept(tiny_library, {"gram": bad})
    elif damage == "negative diagonal":
        _rewrite_kept(tiny_library, {"gram": -torch.from_numpy(gram.copy())})
    elif damage == "hashes":
        _rewrite_kept(tiny_library, hashes=json.dumps([[1]] * 6))
    else:
        _rewrite_kept(tiny_library, {"thresholds": torch.zeros(5, dtype=torch.float64)})
    calls = computed_rows(monkeypatch)
    assert_gram_close(weight_gram(tiny_library, task_experts(tiny_library), 0.5), fresh_gram(tiny_library))
    assert [len(rows) for rows in calls] == [6]


def test_experts_with_the_same_weights_share_one_kept_row(tiny_library, tiny_adapters, monkeypatch):
    from lorlib_ui.core.library import import_adapters

    weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    import_adapters(tiny_library.path, [str(tiny_adapters[1])], names=["twin"])  # task1's weights again
    library = Library.open(tiny_library.path)
    calls = computed_rows(monkeypatch)
    gram = weight_gram(library, task_experts(library), 0.5)
    assert calls == []  # its hash is task1's: nothing to compute
    names = [e.name for e in task_experts(library)]
    assert gram[names.index("twin")].tolist() == gram[names.index("task1")].tolist()
    assert_gram_close(gram, fresh_gram(library))
    assert len(clusters._stored_gram(library).rows) == 6


def test_a_library_that_cannot_be_written_still_clusters(tiny_library, monkeypatch):
    """A read-only folder or a full disk: the Gram is computed, just not kept (nor half-written)."""
    from lorlib_ui.core import atomic

    def refused(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(atomic, "save_tensors", refused)
    gram = weight_gram(tiny_library, task_experts(tiny_library), 0.5)
    assert_gram_close(gram, fresh_gram(tiny_library))
    assert not list(tiny_library.path.glob(f"*{MBC_GRAM}*"))


def test_importing_keeps_the_gram_up_to_date(tiny_library, tiny_base, tmp_path, monkeypatch):
    """After an import through the worker, a cluster view computes nothing from the weights."""
    from lorlib_ui.worker.local import LocalWorker

    folder = make_adapter(tmp_path / "extra", tiny_base, seed=50)
    LocalWorker().import_adapters(str(tiny_library.path), [str(folder)])
    calls = computed_rows(monkeypatch)
    library = Library.open(tiny_library.path)
    assert "extra" in library.names
    assert_gram_close(weight_gram(library, task_experts(library), 0.5), fresh_gram(library))
    assert calls == []


def test_the_command_line_import_keeps_the_gram_up_to_date(tiny_library, tiny_base, tmp_path, capsys, monkeypatch):
    from conftest import run

    folder = make_adapter(tmp_path / "extra", tiny_base, seed=51)
    code, _, err = run(capsys, "import-peft", tiny_library.path, folder)
    assert code == 0, err
    calls = computed_rows(monkeypatch)
    library = Library.open(tiny_library.path)
    assert "extra" in library.names
    assert_gram_close(weight_gram(library, task_experts(library), 0.5), fresh_gram(library))
    assert calls == []


def test_a_build_leaves_the_gram_of_its_experts_kept(built):
    library = Library.open(built)
    kept = clusters._stored_gram(library)
    assert sorted(kept.rows) == sorted(e.weights_hash for e in task_experts(library))
    assert_gram_close(kept.gram, fresh_gram(library))


def test_a_random_grouping_keeps_mbc_sizes_and_deals_the_experts_at_random(tmp_path):
    """The control of finding 4 (issue #31): the cluster sizes MBC finds on the shipped library,
    each filled with experts drawn at random; seeded, and recorded as method "random"."""
    from collections import Counter

    from lorlib_ui.cli.default_library import OUT
    from lorlib_ui.core.library import Library

    shipped = Library.open(shutil.copytree(OUT, tmp_path / "library"))
    mbc = {s: clusters.cluster_library(shipped, 7, seed=s) for s in (0, 1)}
    drawn = [(s, clusters.cluster_library(shipped, 7, seed=s, grouping="random")) for s in (0, 0, 1)]
    assert drawn[0][1].labels == drawn[1][1].labels  # seeded
    for s, random in drawn:  # the sizes of MBC's clusters at the same seed
        assert sorted(Counter(random.labels).values()) == sorted(Counter(mbc[s].labels).values())
        assert random.experts == mbc[s].experts
        assert random.to_manifest([f"c{i}" for i in range(7)])["method"] == "random"
    assert drawn[0][1].labels != mbc[0].labels and drawn[0][1].labels != drawn[2][1].labels
    assert drawn[0][1].ari < mbc[0].ari - 0.3  # the families are no longer what groups the experts
    with pytest.raises(LorlibError, match="unknown grouping"):
        clusters.cluster_library(shipped, 7, grouping="families")
