"""The Insight tab: its figures from a hand-made view, and its handlers over real worker jobs."""

import os
import time

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from lorlib_ui.app import insight, layout  # noqa: E402
from lorlib_ui.app import insight_figures as figs  # noqa: E402
from lorlib_ui.worker.api import InsightView, JobRequest  # noqa: E402
from lorlib_ui.worker.local import LocalWorker  # noqa: E402


def _stats(tasks, experts, mass):
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    by_layer = {k: [0.5, 0.25] for k in ("own_accuracy", "own_chance", "family_accuracy", "family_chance")}
    summary = {k: 0.5 for k in ("own_accuracy", "own_chance", "family_accuracy", "family_chance", "spearman")}
    summary |= {"own_tasks": 1, "family_tasks": 2, "entropy": 0.7, "uniform_entropy": 1.1}
    summary |= {"own_accuracy_ci": [0.25, 0.75], "family_accuracy_ci": None}
    return {
        "tasks": tasks,
        "families": ["f"] * len(tasks),
        "experts": experts,
        "layers": layers,
        "mass": mass,
        "mass_by_layer": [[row, row] for row in mass],
        "summary": summary,
        "per_task": [
            {
                "task": t,
                "family": "f",
                "own_accuracy": 0.5,
                "family_accuracy": 0.5,
                "family_chance": 0.25,
                "spearman": 0.4,
                "most_routed": experts[0],
                "most_routed_gain": 1.0,
                "best_gain": 2.0,
            }
            for t in tasks
        ],
        "by_layer": by_layer | {"entropy": [0.6, 0.8], "uniform_entropy": [1.1, 1.1]},
    }


@pytest.fixture
def view():
    """Transfer and routing stored in other orders than the view's (tasks by family, experts by cluster)."""
    transfer = {
        "tasks": ["t2", "t1"],
        "columns": ["base", "e2", "e1", "e3"],
        "gain": [[0.0, -0.5, 2.0, 0.1], [0.0, 1.5, -3.0, None]],
        "loglik": [[-4.0, -4.5, -2.0, -3.9], [-5.0, -3.5, -8.0, None]],
    }
    routing = {"arrow@private": {"content": _stats(["t1", "t2"], ["e1", "e2"], [[0.9, 0.1], [0.2, 0.8]])}}
    return InsightView(
        tasks=["t1", "t2"],
        families=["f", "f"],
        experts=["e1", "e2", "e3"],
        groups=["c0", "c1", "shared"],
        transfer=transfer,
        routing=routing,
    )


def test_transfer_and_routing_share_one_order_and_transfer_centres_on_no_gain(view):
    transfer = figs.transfer_heatmap(view).data[0]
    assert list(transfer.y) == ["t1", "t2"] and list(transfer.x) == ["e1", "e2", "e3"]
    z = np.array(transfer.z, dtype=float)
    assert z[0, 0] == -3.0 and z[0, 1] == 1.5 and np.isnan(z[0, 2]) and z[1, 0] == 2.0
    assert transfer.zmid == 0 and transfer.zmin == -3.0 and transfer.zmax == 3.0
    hover = np.array(transfer.customdata)
    assert np.allclose(hover[1, :, 1].astype(float), -4.0)  # base log-likelihood on hover
    assert list(hover[0, :, 2]) == ["e1 (c0)", "e2 (c1)", "e3 (shared)"]  # each expert's group too
    routing = figs.routing_heatmap(view, "arrow@private").data[0]
    assert list(routing.x) == list(transfer.x) and list(routing.y) == list(transfer.y)
    mass = np.array(routing.z, dtype=float)
    assert np.allclose(mass[:, :2], [[0.9, 0.1], [0.2, 0.8]]) and np.isnan(mass[:, 2]).all()  # e3: not usable
    layer = figs.routing_matrix(view, "arrow@private", layer="model.layers.1.self_attn.q_proj")
    assert np.allclose(layer[:, :2], [[0.9, 0.1], [0.2, 0.8]])


def test_per_layer_plots_and_the_table(view):
    accuracy = figs.accuracy_by_layer(view, "arrow@private")
    assert [t.name for t in accuracy.data] == ["own expert", "own: chance", "family expert", "family: chance"]
    assert list(accuracy.data[0].y) == [50.0, 25.0]
    entropy = figs.entropy_by_layer(view, "arrow@private")
    assert list(entropy.data[0].y) == [0.6, 0.8] and list(entropy.data[1].y) == [1.1, 1.1]
    table = figs.per_task_table(view, "arrow@private")
    assert list(table["task"]) == ["t1", "t2"] and list(table["family chance %"]) == [25.0, 25.0]
    text = figs.summary_text(view, "arrow@private")
    assert "50.0%** [25.0, 75.0]" in text and "family in **50.0%** (chance" in text


def _finish(worker, request, deadline_s=300):
    job = worker.submit(request)
    deadline = time.monotonic() + deadline_s
    while (status := worker.job(job)).state in ("queued", "running"):
        assert time.monotonic() < deadline, f"{request.kind} job still {status.state} after {deadline_s} s"
        time.sleep(0.2)
    assert status.state == "done", status.message
    return status


def test_jobs_store_what_the_tab_draws(built):
    worker = LocalWorker(device="cpu")
    page = layout.build_page(worker, str(built))[1]
    tab, path = page.insight, str(built)
    before = insight.show(worker, tab, path, None, "content", None)
    assert before[tab.router].value == "arrow@private"
    assert not before[tab.matrices].visible and not before[tab.per_layer].visible
    assert "No transfer matrix yet" in before[tab.notes] and "No routing statistics" in before[tab.notes]
    status = _finish(worker, JobRequest("transfer", path, {"tasks": "held-out", "limit": 2}))
    assert status.result["computed"] > 0
    _finish(worker, JobRequest("routing", path, {"router": "arrow@private", "tasks": "held-out", "limit": 2}))
    view = worker.insight(path)
    assert view.tasks == sorted(view.tasks, key=lambda t: (view.families[view.tasks.index(t)], t))
    assert view.task_set == "held-out" and view.stale == {}
    after = insight.show(worker, tab, path, "arrow@private", "content", None)
    assert after[tab.tasks].value == "held-out"  # the Tasks choice says what the matrices show
    assert after[tab.matrices].visible and after[tab.per_layer].visible and after[tab.notes] == ""
    transfer, routing = after[tab.transfer_plot].data[0], after[tab.routing_plot].data[0]
    assert np.array(transfer.z).shape == np.array(routing.z).shape == (2, len(view.experts))
    assert list(transfer.x) == list(routing.x) and list(transfer.y) == list(routing.y) == view.tasks
    private = [i for i, g in enumerate(view.groups) if g != "shared"]
    assert np.allclose(np.nansum(np.array(routing.z, dtype=float)[:, private], axis=1), 1.0, atol=1e-4)
    assert (
        len(after[tab.table].value["data"]) == 2 and after[tab.table].visible and "arrow@private" in after[tab.summary]
    )
    layers = [value for _, value in after[tab.layer].choices][1:]
    one = insight.show(worker, tab, path, "arrow@private", "all", layers[0])
    stats = worker.insight(path).routing["arrow@private"]["all"]
    expected = np.array([row[0] for row in stats["mass_by_layer"]])
    got = np.array(one[tab.routing_plot].data[0].z, dtype=float)
    columns = [view.experts.index(e) for e in stats["experts"]]
    rows = [view.tasks.index(t) for t in stats["tasks"]]
    assert np.allclose(got[np.ix_(rows, columns)], expected, atol=1e-4)


def test_long_names_are_shortened_on_the_axis_and_kept_apart(view):
    from dataclasses import replace

    long = replace(
        view, experts=["linguistic_mappings.past_tense_regular_json", "linguistic_mappings.past_tense_x", "e3"]
    )
    labels = list(figs.routing_heatmap(long, "arrow@private").data[0].x)
    assert len(set(labels)) == 3 and all(len(label) <= figs.LABEL + 3 for label in labels) and labels[2] == "e3"


def _judged(view, **summary):
    """The view, its router's summary replaced in part."""
    from dataclasses import replace

    stats = view.routing["arrow@private"]["content"]
    stats = stats | {"summary": stats["summary"] | summary}
    return replace(view, routing={"arrow@private": {"content": stats}})


def test_the_verdict_follows_from_the_numbers(view):
    three = _judged(view, family_accuracy=0.45, family_chance=0.15, family_accuracy_task_ci=[0.3, 0.6], spearman=0.14)
    text = figs.verdict(three, "arrow@private")
    assert "family 3× as often as chance (45.0%, 95% interval over tasks 30.0–60.0%, against 15.0%" in text
    assert ", but how much it routes to an expert barely follows how much that expert helps (ρ = 0.14" in text
    assert "mean over 2 tasks" in text
    straddles = _judged(view, family_accuracy=0.16, family_chance=0.15, family_accuracy_task_ci=[0.1, 0.22])
    text = figs.verdict(straddles, "arrow@private")
    assert "not clearly more often than chance" in text and "×" not in text
    below = _judged(view, family_accuracy=0.1, family_chance=0.15, family_accuracy_task_ci=None, spearman=0.6)
    text = figs.verdict(below, "arrow@private")
    assert "less often than chance (10.0%, against 15.0% by chance)" in text and "×" not in text
    assert "but how much it routes to an expert follows how much" in text  # a strong ρ after a miss
    no_transfer = _judged(view, family_accuracy=0.6, family_chance=0.15, family_accuracy_task_ci=None, spearman=None)
    assert figs.verdict(no_transfer, "arrow@private").endswith(
        "4× as often as chance (60.0%, against 15.0% by chance); compute transfer to see whether it routes "
        "to the experts that help."
    )


def test_each_tasks_best_expert_is_starred_on_both_matrices(view):
    assert figs.best_experts(view) == {"t1": "e2", "t2": "e1"}  # the largest gain over base on each task
    for fig in (figs.transfer_heatmap(view), figs.routing_heatmap(view, "arrow@private")):
        stars = [t for t in fig.data if t.type == "scatter"]
        assert len(stars) == 1 and stars[0].marker.symbol == "star"
        assert list(stars[0].x) == ["e2", "e1"] and list(stars[0].y) == ["t1", "t2"]
        assert set(stars[0].x) <= set(fig.data[0].x)  # on the heatmap's own columns


def test_the_table_leads_with_where_routing_went_and_what_it_gains(view):
    table = figs.per_task_table(view, "arrow@private")
    assert list(table.columns[:4]) == ["task", "most routed", "its gain", "best gain"]
    assert list(table["its gain"]) == [1.0, 1.0] and list(table["best gain"]) == [2.0, 2.0]


def test_q_and_v_are_two_lines_over_a_labelled_layer_axis(view):
    from dataclasses import replace

    stats = view.routing["arrow@private"]["content"]
    layers = [f"model.layers.{i}.self_attn.{kind}" for i in (0, 1) for kind in ("q_proj", "v_proj")]
    by_layer = {key: [0.5, 0.3, 0.6, 0.2] for key in ("own_accuracy", "family_accuracy")}
    by_layer |= {key: [0.25] * 4 for key in ("own_chance", "family_chance")}
    by_layer |= {"entropy": [0.6, 0.7, 0.8, 0.9], "uniform_entropy": [1.1] * 4}
    stats = stats | {"layers": layers, "by_layer": by_layer}
    alternating = replace(view, routing={"arrow@private": {"content": stats}})
    fig = figs.accuracy_by_layer(alternating, "arrow@private")
    lines = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert lines["family expert · q_proj"] == ([0, 1], [50.0, 60.0])
    assert lines["family expert · v_proj"] == ([0, 1], [30.0, 20.0])
    assert lines["family: chance"] == ([0, 1], [25.0, 25.0])  # the same for q and v: one line
    assert "family: chance · v_proj" not in lines
    assert fig.layout.xaxis.title.text == "layer (0: nearest the input)" and fig.layout.xaxis.showticklabels
    entropy = {t.name: list(t.y) for t in figs.entropy_by_layer(alternating, "arrow@private").data}
    assert entropy["routing · q_proj"] == [0.6, 0.8] and entropy["routing · v_proj"] == [0.7, 0.9]


def test_stale_results_are_faded_and_titled_with_the_reason(view):
    from dataclasses import replace

    stale = replace(view, stale={"arrow@private": "1 expert added since"})
    routing = figs.routing_heatmap(stale, "arrow@private")
    assert routing.layout.title.text.startswith("<b>stale: 1 expert added since</b><br>Routing: arrow@private")
    assert routing.data[0].opacity == figs.STALE_OPACITY
    for fig in (figs.accuracy_by_layer(stale, "arrow@private"), figs.entropy_by_layer(stale, "arrow@private")):
        assert "stale: 1 expert added since" in fig.layout.title.text
    assert figs.verdict(stale, "arrow@private").startswith("*Stale (1 expert added since):* ")
    transfer = figs.transfer_heatmap(stale)  # fresh: unmarked
    assert "stale" not in transfer.layout.title.text and transfer.data[0].opacity is None
    label = insight.table_label("1 expert added since")
    assert label == "Per task — stale: 1 expert added since (click a header to sort)"


def _stored_routing_and_transfer(library):
    """Routing statistics of arrow@private and a transfer matrix, stored for the library's experts."""
    from lorlib_ui.analysis.routing_stats import SIDE_FILE, library_key
    from lorlib_ui.analysis.transfer import BASE, _store, column_keys

    names = library.names
    mass = [[1 / len(names)] * len(names) for _ in range(2)]
    entry = {"key": library_key(library), "limit": 2}
    entry |= {tokens: _stats(["t1", "t2"], names, mass) for tokens in ("all", "content")}

    def update(stored, current):
        return {"format": "lorlib-routing", "version": 1, "routers": {"arrow@private": entry}}, {}

    library.derived.update_json(SIDE_FILE, update)
    keys = column_keys(library)
    for column in [BASE, *names]:
        cells = {t: {"key": keys[column], "loglik": [-3.0], "exact_match": None, "family": "f"} for t in ("t1", "t2")}
        _store(library, column, cells)


def test_a_library_change_keeps_the_results_shown_marked_stale_with_how_long_recomputing_takes(
    tiny_library, tiny_base, tmp_path
):
    """Stored statistics, transfer and gates, then an expert added: the Insight view keeps the
    statistics, marked stale with the reason and an estimate; what judges (load_routing) and what
    routes (the router menu) treat them as absent, and the menu says why and how long."""
    import torch
    from conftest import make_adapter

    from lorlib_ui.analysis.routing_stats import load_routing
    from lorlib_ui.core.adapters import read_adapter
    from lorlib_ui.core.library import Library, expert_from_adapter

    _stored_routing_and_transfer(tiny_library)
    for e in tiny_library.experts:
        keys = {"model.layers.0.self_attn.q_proj": torch.ones(8)}
        tiny_library.derived.write_expert("gates", e.name, keys, {"seconds": 120.0}, e.weights_hash)
    worker, path = LocalWorker(device="cpu"), str(tiny_library.path)
    before = worker.insight(path)
    assert before.stale == {} and "arrow@private" in before.routing and before.unscored == []
    assert "phatgoose" in worker.library(path).routers
    time.sleep(1.1)  # the new expert is created a second after the keys and the matrix
    extra = read_adapter(make_adapter(tmp_path / "extra", tiny_base, seed=60))
    tiny_library.add_experts([(expert_from_adapter("extra", extra, tiny_library.base_model), extra)])
    assert load_routing(Library.open(path)) == {}
    view = worker.insight(path)
    assert view.stale == {"arrow@private": "1 expert added since"} and view.unscored == ["extra"]
    assert view.routing["arrow@private"]["content"]["tasks"] == ["t1", "t2"]
    assert view.recompute["arrow@private"] == "under a minute on a CPU"  # 2 tasks x 2 prompts
    missing = worker.library(path).routers_missing["phatgoose"]
    assert missing == (
        "needs gates for 1 of its 7 experts (keys stale: 1 expert added or replaced since): "
        "run `lorlib gates LIBRARY` (about 2 min for that one)"
    )
    page = layout.build_page(worker, path)[1]
    tab = page.insight
    shown = insight.show(worker, tab, path, "arrow@private", "content", None)
    assert shown[tab.matrices].visible and shown[tab.per_layer].visible
    assert "No routing statistics" not in shown[tab.notes]
    assert (
        "Routing statistics of **arrow@private** **stale: 1 expert added since** — press **Route the tasks** "
        "to recompute (under a minute on a CPU)." in shown[tab.notes]
    )
    assert "No transfer column yet for 1 expert added since (extra)" in shown[tab.notes]
    assert "stale: 1 expert added since" in shown[tab.routing_plot].layout.title.text
    assert shown[tab.summary].startswith("*Stale (1 expert added since):*")
    assert "stale" in shown[tab.table].label
