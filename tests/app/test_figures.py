"""Figures from plain data: the right cells, points and labels."""

import colorsys
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lorlib_ui.app import cluster_figures, evaluation_figures, figures, routing_figures
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


def test_layer_heatmap_is_layers_by_experts_a_panel_per_kind_of_module():
    record = _record()  # L0 q_proj, L0 v_proj, L1 q_proj, L1 v_proj
    fig = routing_figures.layer_heatmap(record)
    q, v = fig.data
    assert [a.text for a in fig.layout.annotations] == ["q_proj", "v_proj"]
    assert list(q.x) == list(v.x) == ["a", "b", "c"] and list(q.y) == list(v.y) == ["L0", "L1"]
    mean = record.weights.mean(axis=1)
    assert np.allclose(q.z, mean[[0, 2]]) and np.allclose(v.z, mean[[1, 3]])
    assert (q.zmin, q.zmax) == (v.zmin, v.zmax) and [q.showscale, v.showscale] == [False, True]  # one scale
    assert q.text[1][0] == "L1 q_proj" and "%{text}" in q.hovertemplate


def test_token_heatmap_and_colours_at_one_layer():
    record = _record()
    module = record.modules[3]
    record.weights[3][:, 2] = 0.0  # expert c tops no token at this layer: it stays out of the legend
    trace = routing_figures.token_heatmap(record, module).data[0]
    assert np.asarray(trace.z).shape == (5, 3) and np.allclose(trace.z, record.weights[3])
    some = routing_figures.token_heatmap(record, module, tokens=[1, 3]).data[0]  # the chat template left out
    assert np.allclose(some.z, record.weights[3][[1, 3]])
    assert list(some.y) == [routing_figures.token_labels(record)[i] for i in (1, 3)]
    coloured, legend = routing_figures.token_colours(record, module)
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
        fig = cluster_figures.cluster_scatter(view, colour_by)
        assert len(fig.data) == groups
        assert sorted(name for trace in fig.data for name in trace.text) == sorted(view.names)
    by_cluster = cluster_figures.cluster_scatter(view, "cluster")
    for trace in by_cluster.data:
        assert {view.labels[view.names.index(n)] for n in trace.text} == {int(trace.name.split()[-1])}


def test_similarity_silhouette_and_evaluation_figures():
    view = _view()
    assert np.asarray(cluster_figures.similarity_heatmap(view).data[0].z).shape == (6, 6)
    curve = cluster_figures.silhouette_curve(view)
    assert list(curve.data[0].x) == [2, 3] and list(curve.data[1].x) == [2]
    summary = [
        {"router": "base", "exact_match": 0.1, "mc_accuracy": None},
        {"router": "arrow", "exact_match": 0.4, "mc_accuracy": 0.5},
    ]
    bars = evaluation_figures.evaluation_bars(summary)
    assert [t.name for t in bars.data] == ["base", "arrow"]
    assert np.isnan(bars.data[0].y[1]) and bars.data[1].y[0] == 40.0
    summary[1] |= {"exact_match_ci": [0.3, 0.5], "exact_match_task_ci": [0.2, 0.7]}  # error bars: over tasks
    arrow = evaluation_figures.evaluation_bars(summary).data[1]
    assert arrow.error_y.array[0] == pytest.approx(30.0) and arrow.error_y.arrayminus[0] == pytest.approx(20.0)


def _grouped_record():
    """Arrow limited to experts a, b, c of four: it scores d too (a finite logit) but never picks it.
    Each token goes to its top 2 of a, b, c."""
    rng = np.random.default_rng(2)
    logits = rng.random((2, 3, 4)) + 0.1
    weights = np.zeros_like(logits)
    for m in range(2):
        for t in range(3):
            top = np.argsort(-logits[m, t, :3])[:2]
            weights[m, t, top] = np.exp(logits[m, t, top]) / np.exp(logits[m, t, top]).sum()
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    return RoutingRecord("arrow@private(top_k=2)", ["a", "b", "c", "d"], modules, ["x", "y", "z"], weights, logits)


def test_shown_experts_are_those_the_router_could_use():
    record = _grouped_record()
    assert routing_figures.shown_experts(record) == ["a", "b", "c", "d"]  # Arrow scores every expert
    assert routing_figures.shown_experts(record, {"a", "b", "c"}) == ["a", "b", "c"]  # its group, from the spec
    no_logits = np.full((2, 3, 3), np.nan)  # a static router scores nothing
    one = RoutingRecord("expert:b", ["a", "b", "c"], record.modules, record.tokens, np.zeros((2, 3, 3)), no_logits)
    one.weights[:, :, 1] = 1.0
    assert routing_figures.shown_experts(one) == ["b"]
    base = RoutingRecord("base", ["a", "b", "c"], record.modules, record.tokens, np.zeros((2, 3, 3)), no_logits)
    assert routing_figures.shown_experts(base) == ["a", "b", "c"]  # no expert used: all, not an empty figure
    assert routing_figures.shown_experts(base, {"c"}) == ["c"]


def test_heatmaps_show_only_the_shown_experts():
    record = _grouped_record()
    shown = ["a", "b", "c"]
    layer = routing_figures.layer_heatmap(record, shown).data[0]
    assert list(layer.x) == shown and np.allclose(layer.z, record.weights.mean(axis=1)[:, :3])
    tokens = routing_figures.token_heatmap(record, record.modules[1], shown).data[0]
    assert list(tokens.x) == shown and np.allclose(tokens.z, record.weights[1][:, :3])


def test_expert_logits_has_a_bar_per_shown_expert_and_highlights_the_top_k():
    record = _grouped_record()
    fig = routing_figures.expert_logits(record, record.modules[1], 2, ["a", "b", "c"])
    others, chosen = fig.data
    assert others.orientation == chosen.orientation == "h"
    assert len(others.y) + len(chosen.y) == 3  # d, outside the group, has no bar
    top = [["a", "b", "c"][i] for i in np.argsort(-record.logits[1, 2, :3])[:2]]
    assert sorted(chosen.y) == sorted(top) and list(others.y) == sorted({"a", "b", "c"} - set(top))
    assert chosen.marker.color != others.marker.color
    assert np.allclose(np.asarray(chosen.x) + chosen.base, [record.logits[1, 2, "abcd".index(e)] for e in chosen.y])
    assert list(chosen.text) == [f"w={record.weights[1, 2, 'abcd'.index(e)]:.2f}" for e in chosen.y]
    order = list(fig.layout.yaxis.categoryarray)  # highest first, drawn on top
    assert order == sorted("abc", key=lambda e: -record.logits[1, 2, "abcd".index(e)])
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.title.text.startswith("Routing logits of token 2: 'z'") and "top" not in fig.layout.title.text
    assert fig.layout.xaxis.range[0] == 0 and "not 0" not in fig.layout.xaxis.title.text  # logits 0.1 to 1.1


def test_expert_logits_of_a_static_router_shows_its_weights_and_says_so():
    record = _record()  # weights over a, b, c; no logits
    record.logits[:] = np.nan
    record.router = "uniform"
    fig = routing_figures.expert_logits(record, record.modules[0], 1)
    assert "uniform computes no routing logits" in fig.layout.title.text
    bars = {e: x + trace.base for trace in fig.data for e, x in zip(trace.y, trace.x)}
    assert bars == pytest.approx({e: record.weights[0, 1, i] for i, e in enumerate("abc")})
    assert fig.layout.xaxis.range[0] == 0 and fig.layout.xaxis.title.text == "weight"


def test_difference_heatmap_is_a_minus_b_over_either_routers_experts():
    a = _grouped_record()
    b = _grouped_record()
    b.weights = np.zeros_like(b.weights)
    b.weights[:, :, 3] = 1.0  # B always picks d
    b.logits = np.full_like(b.logits, np.nan)
    trace = routing_figures.difference_heatmap(a, b, ["a", "b", "c", "d"]).data[0]
    assert list(trace.x) == ["a", "b", "c", "d"]
    assert np.allclose(trace.z, a.weights.mean(axis=1) - b.weights.mean(axis=1))
    assert trace.zmid == 0 and trace.zmin == -trace.zmax == pytest.approx(-1.0)
    narrow = routing_figures.difference_heatmap(a, b, ["b", "d"]).data[0]
    assert list(narrow.x) == ["b", "d"] and np.allclose(narrow.z[:, 1], -1.0)


def test_similarity_colours_span_the_off_diagonal_range():
    view = _view(4)
    view.similarity = np.array(
        [[1.0, 0.2, -0.1, 0.4], [0.2, 1.0, 0.3, 0.05], [-0.1, 0.3, 1.0, 0.25], [0.4, 0.05, 0.25, 1.0]]
    )
    fig = cluster_figures.similarity_heatmap(view)
    trace = fig.data[0]
    assert (trace.zmin, trace.zmax) == (-0.1, 0.4)
    assert np.isnan(np.diag(np.asarray(trace.z, dtype=float))).all()  # the diagonal is left blank
    assert trace.zmid is None and "-0.10 to 0.40" in fig.layout.title.text  # sequential, its range named


def _big_view(n=300, k=3, seed=0):
    """n experts in k clusters whose within-cluster cosine is about 0.8 and across about 0.1."""
    rng = np.random.default_rng(seed)
    labels = [i % k for i in range(n)]
    order = sorted(range(n), key=lambda i: (labels[i], i))
    names = [f"e{i:03d}" for i in range(n)]
    same = np.equal.outer(labels, labels)
    similarity = np.where(same, 0.8, 0.1) + rng.normal(scale=0.01, size=(n, n))
    similarity = (similarity + similarity.T) / 2
    np.fill_diagonal(similarity, 1.0)
    return ClusterView(
        names=names,
        kinds=["private"] * n,
        families=[None] * n,
        tasks=[[name] for name in names],
        labels=labels,
        k=k,
        coords=rng.normal(size=(n, 2)),
        similarity=similarity[np.ix_(order, order)],
        clustered=[names[i] for i in order],
        silhouette={2: 0.3, 3: 0.5},
        ari=None,
    )


def test_many_experts_scatter_in_webgl_and_few_in_svg():
    assert {trace.type for trace in cluster_figures.cluster_scatter(_big_view()).data} == {"scattergl"}
    assert {trace.type for trace in cluster_figures.cluster_scatter(_view()).data} == {"scatter"}
    assert sum(len(trace.x) for trace in cluster_figures.cluster_scatter(_big_view()).data) == 300


def test_many_experts_similarity_is_by_cluster_with_a_drill_down():
    view = _big_view()
    choices = cluster_figures.similarity_focus(view)
    assert choices == ["all clusters", "cluster 0 (100 experts)", "cluster 1 (100 experts)", "cluster 2 (100 experts)"]
    overview = cluster_figures.similarity_heatmap(view).data[0]
    z = np.asarray(overview.z, dtype=float)
    assert z.shape == (3, 3) and np.allclose(np.diag(z), 0.8, atol=0.01) and np.allclose(z[0, 1], 0.1, atol=0.01)
    assert list(overview.x) == ["cluster 0 (100)", "cluster 1 (100)", "cluster 2 (100)"]
    inside = cluster_figures.similarity_heatmap(view, choices[2]).data[0]
    assert np.asarray(inside.z).shape == (100, 100)
    assert list(inside.x) == [name for name in view.clustered if view.labels[view.names.index(name)] == 1]
    assert cluster_figures.similarity_focus(_view()) == ["all clusters"]  # few experts: each has its row


def test_cluster_means_leave_out_each_expert_with_itself():
    view = _view(4)
    view.labels, view.k = [0, 0, 1, 1], 2
    view.clustered = view.names
    view.similarity = np.array([[1.0, 0.5, 0.1, 0.2], [0.5, 1.0, 0.3, 0.0], [0.1, 0.3, 1.0, 0.7], [0.2, 0.0, 0.7, 1.0]])
    z = np.asarray(cluster_figures._cluster_heatmap(view.similarity, np.array(view.labels), 2).data[0].z, dtype=float)
    assert np.allclose(z, [[0.5, 0.15], [0.15, 0.7]])


# ---- colours: one meaning each, for colour-blind readers too (issue #34, part 4) ------------------

MANIFEST = Path(__file__).resolve().parents[2] / "assets" / "library" / "manifest.json"


def _library_families() -> dict[str, str | None]:
    """The shipped library's experts and their families, in its order (no model: the manifest only)."""
    return {e["name"]: e.get("family") for e in json.loads(MANIFEST.read_text())["experts"]}


def _hue(colour: str) -> float:
    return colorsys.rgb_to_hls(*(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)))[0]


def _record_topping(experts: list[str], tops: list[str]) -> RoutingRecord:
    """A one-layer record over `experts` whose token i goes to tops[i] alone."""
    weights = np.zeros((1, len(tops), len(experts)), dtype=np.float32)
    for t, name in enumerate(tops):
        weights[0, t, experts.index(name)] = 1.0
    return RoutingRecord("arrow", experts, ["model.layers.0.q_proj"], list(tops), weights, np.zeros_like(weights))


def test_each_expert_has_its_own_colour_in_its_familys_hue():
    families = _library_families()
    private = [name for name, family in families.items() if family and not name.startswith(("cluster", "shared"))]
    assert len(private) == 26 and len({families[name] for name in private}) == 7
    record = _record_topping(private, private)  # every expert tops one token: all 26 in the legend
    _, legend = routing_figures.token_colours(record, record.modules[0], families)
    assert set(legend) == set(private) and len(set(legend.values())) == 26
    base = figures.family_colours(families.values())
    assert len(set(base.values())) == 7 and set(base.values()) <= set(figures.PALETTE)
    for name in private:
        assert _hue(legend[name]) == pytest.approx(_hue(base[families[name]]), abs=0.02), name
    # the whole library, shared and cluster experts too (two without a family: grey shades), no two alike
    everything = figures.colour_of(list(families), families)
    assert len(set(everything.values())) == len(families) == 34
    assert everything["shared"] != everything["cluster2"] and _hue(everything["shared"]) == _hue(figures.NO_FAMILY)


def test_a_family_keeps_its_colour_across_calls_and_views():
    families = _library_families()
    names = list(families)
    assert figures.family_colours(families.values()) == figures.family_colours(reversed(list(families.values())))
    arithmetic = [n for n in names if families[n] == "arithmetic"]
    sentiment = [n for n in names if families[n] == "sentiment"]
    # two prompts whose tokens go to different experts: the expert both show has one colour
    _, one = routing_figures.token_colours(
        _record_topping(names, arithmetic[:2] + sentiment), "model.layers.0.q_proj", families
    )
    _, two = routing_figures.token_colours(_record_topping(names, arithmetic[1:]), "model.layers.0.q_proj", families)
    assert one[arithmetic[1]] == two[arithmetic[1]]
    # the Clusters tab, over a few of the experts, colours a family as every view does
    few = arithmetic[:2] + sentiment[:2]
    view = ClusterView(
        names=few,
        kinds=["private"] * 4,
        families=[families[n] for n in few],
        tasks=[[n] for n in few],
        labels=[0, 0, 1, 1],
        k=2,
        coords=np.zeros((4, 2)),
        similarity=np.eye(4),
        clustered=few,
        silhouette={},
        ari=None,
    )
    base = figures.family_colours(families.values())
    by_family = cluster_figures.cluster_scatter(view, "family", families.values())
    assert {t.name: t.marker.color for t in by_family.data} == {f: base[f] for f in ("arithmetic", "sentiment")}
    by_cluster = cluster_figures.cluster_scatter(view, "cluster", families.values())
    assert not {t.marker.color for t in by_cluster.data} & set(figures.PALETTE)  # clusters look like no family
    assert len({t.marker.symbol for t in by_cluster.data}) == 2


def test_routers_differ_in_colour_and_pattern_and_per_task_bars_have_row_intervals():
    routers = ["base", "uniform", "arrow", "arrow-cluster", "shared", "oracle"]  # the shipped evaluation's
    summary = [{"router": r, "exact_match": 0.1 * i, "mc_accuracy": 0.5} for i, r in enumerate(routers)]
    rows = [1.0, 0.0, 1.0, 1.0]
    scores = [{"router": r, "task": "t", "exact_match": 0.75, "rows": {"exact_match": rows}} for r in routers[:-1]] + [
        {"router": "oracle", "task": "t", "exact_match": 0.5}
    ]  # a record stored without its rows
    for fig in (evaluation_figures.evaluation_bars(summary), evaluation_figures.per_task_bars(scores, routers)):
        markers = {t.name: (t.marker.color, t.marker.pattern.shape or "") for t in fig.data}
        arrow, cluster = markers["arrow"], markers["arrow-cluster"]
        assert arrow[0] != cluster[0] and arrow[1] != cluster[1]
        assert len({colour for colour, _ in markers.values()}) == len({p for _, p in markers.values()}) == 6
    bars = {t.name: t for t in evaluation_figures.per_task_bars(scores, routers).data}
    half = 100 * 1.96 * np.std(rows, ddof=1) / np.sqrt(len(rows))
    assert bars["arrow"].error_y.array[0] == pytest.approx(half)
    assert "4 rows" in bars["arrow"].hovertext[0] and "1.96·SE" in bars["arrow"].hovertext[0]
    assert bars["oracle"].error_y.array is None and bars["oracle"].hovertext == ("",)


def test_recomputed_clusters_are_numbered_as_the_stored_ones():
    stored = [0, 0, 1, 1, 2, 2]
    assert cluster_figures.align_labels([2, 2, 0, 0, 1, 1], stored) == stored  # a permutation comes back
    assert cluster_figures.align_labels([1, 1, 1, 1, 0, 0], stored) in ([0, 0, 0, 0, 2, 2], [1, 1, 1, 1, 2, 2])
    split = [0, 0, 1, 1, 2, 3, 3]  # stored cluster 1 split in two: its larger part keeps its number
    assert cluster_figures.align_labels(split, [0, 0, 1, 1, 1, 2, 2]) == [0, 0, 1, 1, 3, 2, 2]
    assert cluster_figures.align_labels([1, -1, 0], [-1, 5, 5]) == [0, -1, 5]  # -1: outside, in either
    view = _view(6)  # MBC's labels [0, 1, 0, 1, 0, 1]
    clusters = {"k": 2, "assignment": {f"e{i}": f"cluster{1 - i % 2}" for i in range(6)}}
    numbered, note = cluster_figures.numbered_as_stored(view, clusters)
    assert numbered.labels == [1, 0, 1, 0, 1, 0] and "stored clustering" in note
    assert numbered.clustered == ["e1", "e3", "e5", "e0", "e2", "e4"]  # ordered by the new numbers
    clusters["assignment"]["e0"] = "cluster0"  # the stored grouping differs from MBC's: stored labels, no ARI
    numbered, note = cluster_figures.numbered_as_stored(dataclasses.replace(view, ari=0.5), clusters)
    assert numbered.labels == [0, 0, 1, 0, 1, 0] and numbered.ari is None and "differently" in note
    assert cluster_figures.numbered_as_stored(view, {}) == (view, "")


def test_similarity_heatmap_outlines_each_cluster_and_says_why_nothing_to_pick():
    view = _view(6)  # clustered: e0 e2 e4 (cluster 0), e1 e3 e5 (cluster 1)
    boxes = {(s.x0, s.x1, s.y0, s.y1) for s in cluster_figures.similarity_heatmap(view).layout.shapes}
    assert boxes == {(-0.5, 2.5, -0.5, 2.5), (2.5, 5.5, 2.5, 5.5)}
    assert "all 6 experts fit one heatmap" in cluster_figures.focus_info(view)
    assert "pick one" in cluster_figures.focus_info(_big_view())


def test_figures_follow_the_pages_theme():
    assert figures.LAYOUT["paper_bgcolor"] == figures.LAYOUT["plot_bgcolor"] == "rgba(0,0,0,0)"
    fig = evaluation_figures.evaluation_bars([{"router": "arrow", "exact_match": 0.4, "mc_accuracy": None}])
    assert fig.layout.paper_bgcolor == fig.layout.plot_bgcolor == "rgba(0,0,0,0)"
    assert fig.layout.template.layout.paper_bgcolor == "rgba(0,0,0,0)"


# ---- the Route tab's figures, legible on a projector (issue #34, part 3) --------------------------


def test_expert_aliases_are_short_unique_and_leave_short_names_alone():
    names = list(_library_families())  # the shipped library's 34 experts
    aliases = figures.expert_aliases(names)
    assert len(set(aliases.values())) == len(names) and max(map(len, aliases.values())) <= 17
    assert aliases["linguistic_mappings.past_tense_regular_json"] == "lm.pas_ten_reg"
    assert aliases["multiemo.medicine_sentence_en"] == "multi.medicine"  # "sentence_en": every multiemo's
    assert aliases["fact_checker.politifact"] == "fc.politifact" and aliases["shared"] == "shared"
    alike = figures.expert_aliases(["word_unscrambling", "word_unscrambled"])  # both would be word_uns
    assert alike == {"word_unscrambling": "word_unscrambling", "word_unscrambled": "word_unscrambled"}
    two = figures.expert_aliases(["fact_checker.covid19_scientific", "fine_control.covid19_scientific"])
    assert [a.split(".")[0] for a in two.values()] == ["fact_checker", "fine_control"]  # not both "fc"


def _library_record(layers=30, seed=0):
    """The shipped library's experts over `layers` layers of q_proj and v_proj, two tokens, with
    Arrow's logits between 2.2 and 2.5 and its top 2 weighted 0.59 and 0.41."""
    experts = list(_library_families())
    modules = [f"model.layers.{i}.self_attn.{kind}" for i in range(layers) for kind in ("q_proj", "v_proj")]
    logits = 2.2 + 0.3 * np.random.default_rng(seed).random((len(modules), 2, len(experts)))
    weights = np.zeros_like(logits)
    np.put_along_axis(weights, np.argsort(-logits, axis=-1)[..., :2], np.array([0.59, 0.41]), axis=-1)
    return RoutingRecord("arrow", experts, modules, ["The", " cat"], weights, logits)


def test_layer_heatmaps_label_every_layer_of_every_module_and_name_experts_by_alias():
    record = _library_record()
    uniform = dataclasses.replace(record, router="uniform", logits=np.full_like(record.logits, np.nan))
    uniform.weights = np.full_like(record.weights, 1 / len(record.experts))
    aliases = figures.expert_aliases(record.experts)
    for fig in (routing_figures.layer_heatmap(record), routing_figures.difference_heatmap(record, uniform)):
        assert [a.text for a in fig.layout.annotations] == ["q_proj", "v_proj"]
        rows = [fig.layout.yaxis, fig.layout.yaxis2]
        assert sum(len(axis.ticktext) for axis in rows) == len(record.modules) == 60  # not every other one
        assert all(list(axis.tickvals) == list(t.y) == [f"L{i}" for i in range(30)] for axis, t in zip(rows, fig.data))
        for axis in (fig.layout.xaxis, fig.layout.xaxis2):
            assert list(axis.tickvals) == record.experts and list(axis.ticktext) == [aliases[e] for e in record.experts]
            assert axis.tickfont.size >= 13
        assert all(list(t.x) == record.experts and "%{x}" in t.hovertemplate for t in fig.data)  # full names
        assert min(axis.tickfont.size for axis in rows) >= 13
    tokens = routing_figures.token_heatmap(record, record.modules[7])
    assert list(tokens.layout.xaxis.ticktext) == [aliases[e] for e in record.experts]
    assert list(tokens.layout.yaxis.tickvals) == list(tokens.data[0].y) == ["0: 'The'", "1: ' cat'"]


def test_expert_logits_are_the_top_ten_on_a_zoomed_axis_with_the_chosen_weights():
    record = _library_record(layers=1)
    logits = dict(zip(record.experts, record.logits[0, 0]))
    by_logit = sorted(record.experts, key=lambda e: -logits[e])
    fig = routing_figures.expert_logits(record, record.modules[0], 0)
    others, chosen = fig.data
    order = list(fig.layout.yaxis.categoryarray)
    assert order == by_logit[:10] and fig.layout.yaxis.autorange == "reversed"  # the highest on top
    assert len(others.y) + len(chosen.y) == 10 and "(top 10 of 34)" in fig.layout.title.text
    start = fig.layout.xaxis.range[0]
    assert 2.0 < start < min(logits[e] for e in order)  # from 0, 2.2 and 2.5 would look alike
    assert f"starts at {start:.2f}, not 0" in fig.layout.xaxis.title.text
    assert np.allclose(np.asarray(others.x) + others.base, [logits[e] for e in others.y])
    assert list(chosen.y) == by_logit[:2] and list(chosen.text) == ["w=0.59", "w=0.41"]
    assert chosen.textfont.size >= 13 and fig.layout.yaxis.tickfont.size >= 13
    aliases = figures.expert_aliases(record.experts)
    ticks = dict(zip(fig.layout.yaxis.tickvals, fig.layout.yaxis.ticktext))
    assert [ticks[e] for e in by_logit[:3]] == [f"<b>{aliases[e]}</b>" for e in by_logit[:2]] + [aliases[by_logit[2]]]
    assert fig.layout.height <= 500  # sized to its ten bars
    low = min(record.experts, key=logits.get)  # a chosen expert outside the top 10 keeps its bar
    record.weights[0, 0] = 0.0
    record.weights[0, 0, record.experts.index(low)] = 1.0
    order = list(routing_figures.expert_logits(record, record.modules[0], 0).layout.yaxis.categoryarray)
    assert order == by_logit[:9] + [low]
