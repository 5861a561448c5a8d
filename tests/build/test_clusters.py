"""MBC over a library: the Gram matrix of the experts' weight vectors, summed block by block."""

import os
import shutil

import numpy as np
import pytest
import torch

from lorlib_ui.build import clusters
from lorlib_ui.build.clusters import embed_library, task_experts, weight_gram
from lorlib_ui.build.mbc import embed, sparsify
from lorlib_ui.core.adapters import WEIGHTS_FILE
from lorlib_ui.core.errors import LorlibError


def dense_vectors(library):
    """The n x D matrix the streaming path never builds: each expert's factors flattened module
    by module in sorted order, as float32."""
    rows = []
    for expert in task_experts(library):
        factors = library.load_adapter(expert.name).factors
        rows.append(torch.cat([t.float().reshape(-1) for m in sorted(factors) for t in factors[m]]))
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("block_bytes", [1, 1 << 20, clusters.BLOCK_BYTES])  # a module per block .. one block
def test_weight_gram_is_the_gram_of_the_sparsified_vectors(tiny_library, monkeypatch, block_bytes):
    monkeypatch.setattr(clusters, "BLOCK_BYTES", block_bytes)
    reference = sparsify(dense_vectors(tiny_library), 0.3).astype(np.float64)
    gram = weight_gram(tiny_library, task_experts(tiny_library), 0.3)
    assert gram.dtype == np.float64 and gram.shape == (6, 6)
    np.testing.assert_allclose(gram, reference @ reference.T, rtol=1e-5)


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
    np.testing.assert_allclose(gram, reference @ reference.T, rtol=1e-5)


def test_the_shipped_library_clusters_the_same_streamed_or_in_memory():
    """Issue #15: the Gram path (never holding n x D) gives the shipped library the clusters of
    the in-memory path, at the k it was built with."""
    from lorlib_ui.build.mbc import adjusted_rand_index, mbc_cluster
    from lorlib_ui.cli.default_library import OUT
    from lorlib_ui.core.library import Library

    shipped = Library.open(OUT)
    k = len(shipped.clusters["members"])
    names = [e.name for e in task_experts(shipped)]
    _, streamed = embed_library(shipped)
    in_memory = embed(names, dense_vectors(shipped))
    np.testing.assert_allclose(streamed.similarity, in_memory.similarity, atol=1e-5)
    labels = [str(label) for label in mbc_cluster(in_memory, k)]
    assert adjusted_rand_index(mbc_cluster(streamed, k), labels) == 1.0
