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
    after = insight.show(worker, tab, path, "arrow@private", "content", None)
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
