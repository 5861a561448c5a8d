"""Figures from plain data: the right cells, points and labels."""

import numpy as np

from lorlib_ui.app import figures
from lorlib_ui.core.record import RoutingRecord
from lorlib_ui.worker.api import ClusterView


def _record():
    rng = np.random.default_rng(0)
    weights = rng.random((4, 5, 3)).astype(np.float32)
    weights[:, 2] = 0.0  # a token no expert was used for
    weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-9)
    modules = [f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj" for i in range(4)]
    tokens = ["The", " cat", "<pad>", " sat", "."]
    return RoutingRecord("arrow", ["a", "b", "c"], modules, tokens, weights, np.zeros_like(weights))


def test_layer_heatmap_is_layers_by_experts():
    record = _record()
    trace = figures.layer_heatmap(record).data[0]
    assert np.asarray(trace.z).shape == (4, 3) and list(trace.x) == ["a", "b", "c"]
    assert list(trace.y) == ["L0 q_proj", "L0 v_proj", "L1 q_proj", "L1 v_proj"]
    assert np.allclose(trace.z, record.weights.mean(axis=1))


def test_token_heatmap_and_colours_at_one_layer():
    record = _record()
    module = record.modules[3]
    record.weights[3][:, 2] = 0.0  # expert c tops no token at this layer: it stays out of the legend
    trace = figures.token_heatmap(record, module).data[0]
    assert np.asarray(trace.z).shape == (5, 3) and np.allclose(trace.z, record.weights[3])
    coloured, legend = figures.token_colours(record, module)
    assert [t for t, _ in coloured] == record.tokens
    expected = ["abc"[i] for i in record.weights[3].argmax(-1)]
    assert [label for _, label in coloured] == [e if i != 2 else None for i, e in enumerate(expected)]
    used = {e for i, e in enumerate(expected) if i != 2}
    assert "c" not in used and set(legend) == used
    assert all(legend[e] == figures.colour_of(record.experts)[e] for e in used)


def _view(n=6):
    rng = np.random.default_rng(1)
    labels = [i % 2 for i in range(n)]
    similarity = np.eye(n)
    return ClusterView(
        names=[f"e{i}" for i in range(n)],
        kinds=["private"] * n,
        families=["f0", "f0", "f1", "f1", "f2", None][:n],
        tasks=[[f"t{i}"] for i in range(n)],
        labels=labels,
        k=2,
        coords=rng.normal(size=(n, 2)),
        similarity=similarity,
        clustered=[f"e{i}" for i in sorted(range(n), key=lambda i: labels[i])],
        silhouette={2: 0.3, 3: 0.1},
        ari=None,
    )


def test_cluster_scatter_has_one_point_per_expert_in_each_colouring():
    view = _view()
    for colour_by, groups in (("cluster", 2), ("family", 4)):
        fig = figures.cluster_scatter(view, colour_by)
        assert len(fig.data) == groups
        assert sorted(name for trace in fig.data for name in trace.text) == sorted(view.names)
    by_cluster = figures.cluster_scatter(view, "cluster")
    for trace in by_cluster.data:
        assert {view.labels[view.names.index(n)] for n in trace.text} == {int(trace.name.split()[-1])}


def test_similarity_silhouette_and_evaluation_figures():
    view = _view()
    assert np.asarray(figures.similarity_heatmap(view).data[0].z).shape == (6, 6)
    curve = figures.silhouette_curve(view)
    assert list(curve.data[0].x) == [2, 3] and list(curve.data[1].x) == [2]
    summary = [
        {"router": "base", "exact_match": 0.1, "mc_accuracy": None},
        {"router": "arrow", "exact_match": 0.4, "mc_accuracy": 0.5},
    ]
    bars = figures.evaluation_bars(summary)
    assert [t.name for t in bars.data] == ["base", "arrow"]
    assert np.isnan(bars.data[0].y[1]) and bars.data[1].y[0] == 40.0
