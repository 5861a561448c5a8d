"""The explorer's event handlers, called directly with a worker: no server, no browser."""

import os
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from lorlib_ui.app import evaluate, layout, links, route  # noqa: E402
from lorlib_ui.app.events import shows_errors  # noqa: E402
from lorlib_ui.core.errors import LorlibError  # noqa: E402
from lorlib_ui.core.record import RoutingRecord  # noqa: E402
from lorlib_ui.worker.api import RouteUpdate  # noqa: E402
from lorlib_ui.worker.local import LocalWorker  # noqa: E402


@pytest.fixture(scope="module")
def worker():
    return LocalWorker(device="cpu")


@pytest.fixture
def page(worker, tiny_library):
    """The page's components, in a Blocks that is never launched."""
    return layout.build_page(worker, str(tiny_library.path))[1]


def test_opening_a_library_updates_exactly_the_wired_outputs(worker, page, tiny_library):
    out = layout.open_library(worker, page, str(tiny_library.path))
    assert set(out) == set(page.opened_outputs())  # keyed by component: nothing unwired, nothing missed
    assert out[page.path] == str(tiny_library.path)
    assert "6 experts" in out[page.status]
    routers = out[page.route.router]
    assert "expert:task0" in [c[0] for c in routers.choices] and routers.value == "arrow"
    assert list(out[page.library.table]["name"]) == [f"task{i}" for i in range(6)]


def test_route_streams_then_draws_the_record(worker, page, tiny_library):
    updates = list(route.route(worker, page.route, str(tiny_library.path), "the quick brown", "arrow", 2, 1.0, 4))
    assert all(set(u) == {page.route.answer, page.route.timing} for u in updates[:-1])
    final = updates[-1]
    tab, record = page.route, final[page.route.record]
    assert record.weights.shape[0] == len(record.modules)
    assert "done in" in final[tab.timing] and final[tab.layer_plot].data[0].type == "heatmap"
    assert final[tab.layer_box].visible and final[tab.detail_box].visible  # hidden until now
    assert final[tab.shown] == record.experts  # arrow over the whole library: every expert
    token = final[tab.token_pick].value
    assert 0 < token < len(record.tokens)  # the first generated token
    assert len(record.tokens) - token == 4  # the 4 new tokens asked for, each routed once
    detail = route.layer_detail(tab, record, final[tab.module_pick].value, token, final[tab.shown])
    assert detail[tab.token_plot].data[0].type == "heatmap"
    bars = detail[tab.logits_plot].data
    assert sum(len(trace.x) for trace in bars) == 6 and len(bars[1].x) == 2  # every expert; the top 2 chosen


def test_route_plots_are_hidden_until_a_route_fills_them(page):
    tab = page.route
    boxes = {id(box) for box in (tab.layer_box, tab.detail_box, tab.compare_box)}
    assert not any(box.visible for box in (tab.layer_box, tab.detail_box, tab.compare_box))

    def in_a_box(block) -> bool:
        while block is not None and id(block) not in boxes:
            block = block.parent
        return block is not None

    plots = [tab.layer_plot, tab.token_plot, tab.logits_plot, tab.compare_plot_a, tab.compare_plot_b, tab.compare_diff]
    assert all(in_a_box(plot) for plot in plots + [tab.module_pick, tab.token_pick, tab.coloured])
    assert not in_a_box(tab.answer)


def test_route_group_members_and_default_token():
    experts = [{"name": "p0", "kind": "private"}, {"name": "s", "kind": "shared"}, {"name": "p1", "kind": "private"}]
    assert route.group_members("arrow@private", experts) == {"p0", "p1"}
    assert route.group_members("uniform@shared", experts) == {"s"}
    assert route.group_members("arrow", experts) is None and route.group_members("expert:s", experts) is None
    # general is a flag beside the kind: the marked shared expert and one of kind general, no other
    flagged = [*experts, {"name": "g", "kind": "general", "general": True}]
    flagged[1] = {**flagged[1], "general": True}
    assert route.group_members("arrow@general", flagged) == {"s", "g"}
    record = RoutingRecord("arrow", [], [], ["a", "b", "c", "d"], np.zeros((0, 4, 0)), np.zeros((0, 4, 0)))
    assert route.default_token(record, 3) == 3 and route.default_token(record, 0) == 0  # the first generated
    assert route.default_token(record, 9) == 0  # a prompt count that does not fit the record
    assert route.default_token(record, 4) == 3  # nothing generated: the prompt's last
    record.template = [0, 3]  # ... of the user's own text, not the chat template's
    assert route.default_token(record, 4) == 2


class GroupedWorker:
    """A worker over four experts, three private and one shared, whose Arrow routes each token to
    its top two private experts but scores the shared one too, as `arrow@private` does."""

    EXPERTS = ["p0", "p1", "p2", "shared"]
    MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]

    def library(self, path):
        kinds = ["private", "private", "private", "shared"]
        return SimpleNamespace(experts=[{"name": n, "kind": k} for n, k in zip(self.EXPERTS, kinds)])

    def route(self, request):
        tokens = ["a", "b", "c", "d", "e"]
        logits = np.random.default_rng(len(request.router)).random((2, 5, 4)) + 0.1
        weights = np.zeros_like(logits)
        if request.router == "arrow@private":
            top = np.argsort(-logits[..., :3], axis=-1)[..., :2]
            np.put_along_axis(weights, top, 0.5, axis=-1)
        else:  # expert:shared
            weights[..., 3], logits[:] = 1.0, np.nan
        record = RoutingRecord(request.router, self.EXPERTS, self.MODULES, tokens, weights, logits)
        yield RouteUpdate("an answer", done=True, record=record, n_prompt_tokens=3, first_token_s=0.1, total_s=0.2)


def test_route_hides_experts_outside_the_routers_group(page):
    tab, worker = page.route, GroupedWorker()
    final = list(route.route(worker, tab, "lib", "hi", "arrow@private", 2, 1.0, 4))[-1]
    assert final[tab.shown] == ["p0", "p1", "p2"]
    assert list(final[tab.layer_plot].data[0].x) == ["p0", "p1", "p2"]
    assert final[tab.token_pick].value == 3  # the first generated token, after the 3 of the prompt
    detail = route.layer_detail(tab, final[tab.record], GroupedWorker.MODULES[1], 2, final[tab.shown])
    assert list(detail[tab.token_plot].data[0].x) == ["p0", "p1", "p2"]
    others, chosen = detail[tab.logits_plot].data
    assert len(others.x) == 1 and len(chosen.x) == 2  # three bars, the top 2 highlighted; none for shared
    moved = route.token_detail(tab, final[tab.record], GroupedWorker.MODULES[0], 4, final[tab.shown])
    assert "token 4: 'e' at L0 q_proj" in moved[tab.logits_plot].layout.title.text


def _compared(updates) -> dict:
    """What a streamed comparison leaves on the page: each output's last update."""
    out = {}
    for update in updates:
        out |= update
    return out


def test_route_compare_draws_both_and_their_difference(page):
    tab, worker = page.route, GroupedWorker()
    out = _compared(route.compare(worker, tab, "lib", "hi", "arrow@private", "expert:shared", 2, 1.0, 4))
    assert list(out[tab.compare_plot_a].data[0].x) == ["p0", "p1", "p2"]
    assert list(out[tab.compare_plot_b].data[0].x) == ["shared"]
    diff = out[tab.compare_diff]  # no expert both can use: nothing subtracted, each one's named apart
    assert not diff.data and "only A uses p0, p1, p2; only B uses shared" in diff.layout.title.text
    assert out[tab.compare_box].visible


def test_errors_become_one_visible_line(worker, page, tiny_library):
    with pytest.raises(gr.Error, match="the prompt is empty"):
        list(route.route(worker, page.route, str(tiny_library.path), "  ", "arrow", 2, 1.0, 4))
    with pytest.raises(gr.Error, match="pick at least one router"):
        list(evaluate.evaluate(worker, page.evaluate, str(tiny_library.path), [], "held-out", 5))
    with pytest.raises(gr.Error, match="no library at /nonexistent"):
        layout.open_library(worker, page, "/nonexistent")


def test_shows_errors_names_a_bug_as_unexpected():
    @shows_errors
    def broken():
        raise KeyError("x")

    @shows_errors
    def refused():
        raise LorlibError("a clear line")

    with pytest.raises(gr.Error, match="unexpected KeyError"):
        broken()
    with pytest.raises(gr.Error) as refusal:
        refused()
    assert refusal.value.message == "a clear line"


# ---- the Library tab's expert view -------------------------------------------------------------


def test_expert_view_is_hidden_until_an_expert_is_picked(worker, page, tiny_library):
    from lorlib_ui.app import library

    tab = page.library
    assert not any(component.visible for component in tab.detail_outputs())  # no empty frames at start
    out = library.expert_detail(worker, tab, str(tiny_library.path), None)  # an empty library picks none
    assert set(out) == set(tab.detail_outputs()) and not any(update["visible"] for update in out.values())
    # a library (re)opening shows nothing new until the user has picked an expert, and then the pick
    untouched = library.reshow(worker, tab, str(tiny_library.path), "task0", False)
    assert all(update == gr.update() for update in untouched.values())
    again = library.reshow(worker, tab, str(tiny_library.path), "task0", True)
    assert again[tab.summary]["visible"] and "### task0" in again[tab.summary]["value"]


def test_expert_view_draws_the_spectrum_and_neighbours_of_the_picked_expert(worker, page, tiny_library):
    from lorlib_ui.app import library

    tab, path = page.library, str(tiny_library.path)
    out = library.expert_detail(worker, tab, path, "task3")
    adapter = tiny_library.load_adapter("task3")

    def dense(module):
        a, b = adapter.factors[module]
        return adapter.scales[module] * b.double().numpy() @ a.double().numpy()

    norms = out[tab.norms_plot]["value"].data
    assert [t.name for t in norms] == ["q_proj", "k_proj", "v_proj", "o_proj"]  # the model's order
    for trace in norms:
        assert list(trace.x) == [0, 1]  # one point per layer
        expected = [np.linalg.norm(dense(f"model.layers.{i}.self_attn.{trace.name}")) for i in (0, 1)]
        np.testing.assert_allclose(trace.y, expected, rtol=1e-5)
    heatmap = out[tab.spectrum_plot]["value"].data[0]  # layers across; kind and singular value down
    assert list(heatmap.x) == [0, 1] and np.shape(heatmap.z) == (16, 2)
    assert list(heatmap.y)[:5] == ["q_proj σ1", "q_proj σ2", "q_proj σ3", "q_proj σ4", "k_proj σ1"]
    for k, kind in enumerate(["q_proj", "k_proj", "v_proj", "o_proj"]):
        for layer in (0, 1):
            expected = np.linalg.svd(dense(f"model.layers.{layer}.self_attn.{kind}"), compute_uv=False)[:4]
            np.testing.assert_allclose(np.asarray(heatmap.z)[4 * k : 4 * k + 4, layer], expected, rtol=1e-5)
    table = out[tab.nearest]["value"]
    assert out[tab.nearest]["visible"] and len(table) == 5 and "task3" not in set(table["expert"])
    assert list(table["cosine"]) == sorted(table["cosine"], reverse=True) and table["cosine"].abs().max() <= 1
    summary = out[tab.summary]["value"]
    assert out[tab.summary]["visible"] and "### task3" in summary and "at rank 4" in summary
    assert library.NO_CURVE_IMPORTED in summary  # an imported adapter: no curve to draw
    assert out[tab.loss_plot]["visible"] is False and out[tab.norms_plot]["visible"]
    with pytest.raises(gr.Error, match="unknown expert 'nobody'"):
        library.expert_detail(worker, tab, path, "nobody")


def test_expert_view_of_the_shipped_library_says_nothing_of_missing_curves(worker, page):
    """Its experts were trained here before curves were kept: the steps and final loss show, and
    no line on every expert says what is missing."""
    from lorlib_ui.app import library
    from lorlib_ui.core.assets import asset

    tab, path = page.library, str(asset("library"))
    info = worker.library(path)
    first = next(e for e in info.experts if e["kind"] == "private")
    out = library.expert_detail(worker, tab, path, first["name"])
    assert "no loss curve" not in out[tab.summary]["value"] and out[tab.loss_plot]["visible"] is False
    assert f"Trained {first['metrics']['steps']} steps" in out[tab.summary]["value"]
    norms = out[tab.norms_plot]["value"].data
    assert first["target_modules"] == ["q_proj", "v_proj"] and [t.name for t in norms] == ["q_proj", "v_proj"]
    assert all(list(t.x) == list(range(30)) for t in norms)  # SmolLM2's 30 layers, in order
    cluster = next(e["name"] for e in info.experts if e["kind"] == "cluster")
    out = library.expert_detail(worker, tab, path, cluster)
    assert out[tab.nearest]["visible"] is False and "no nearest experts: MBC embeds" in out[tab.summary]["value"]


def test_expert_view_draws_the_recorded_loss_curve(worker, page, built):
    import json

    from lorlib_ui.app import library

    experts = json.loads((built / "manifest.json").read_text())["experts"]
    private = next(e for e in experts if e["kind"] == "private")
    out = library.expert_detail(worker, page.library, str(built), private["name"])
    curve = out[page.library.loss_plot]
    assert curve["visible"] and list(curve["value"].data[0].y) == private["metrics"]["loss_curve"]
    assert list(curve["value"].data[0].x) == [1, 2, 3]
    assert "no loss curve" not in out[page.library.summary]["value"]


def test_every_router_of_the_menu_routes_through_the_app(tmp_path, tiny_base, tiny_adapters, worker):
    """With gates, mean activations and a general expert in the library, the Route tab's menu
    offers every router of the registry that runs on a prompt, and each one routes."""
    from conftest import PROMPT_ROUTERS, build_library, with_every_key

    library = with_every_key(build_library(tmp_path / "lib", tiny_base, tiny_adapters))
    path = str(library.path)
    page = layout.build_page(worker, path)[1]
    out = layout.open_library(worker, page, path)
    offered = [c[0] for c in out[page.route.router].choices]
    routers = PROMPT_ROUTERS
    assert set(routers) <= set(offered) and "expert:task0" in offered
    assert "oracle" not in offered and "lorahub" not in offered  # they choose per evaluated task
    for spec in routers:
        final = list(route.route(worker, page.route, path, "the quick brown", spec, 2, 1.0, 2, 0.5))[-1]
        record = final[page.route.record]
        assert record.router.startswith(spec) and record.weights.shape[1] == len(record.tokens)
        assert ("density=0.5" in record.router) == (spec == "ties")  # the slider reaches the router
    note = out[page.route.router_note]
    assert note.startswith("**arrow**: Arrow") and "Not available" not in note  # the library has everything


def test_the_evaluate_tab_offers_lorahub_unticked(page):
    from lorlib_ui.core.routers import evaluable, presets

    box = page.evaluate.routers
    choices = [c[0] for c in box.choices]
    assert choices[: len(presets())] == list(presets()) and "lorahub" in choices
    assert box.value == list(presets()) and evaluable()["lorahub"] is False  # a search per task: asked for


def test_the_insight_matrices_and_tables_download_as_csv(worker):
    """The shipped library's stored transfer matrix and Arrow's routing, a row per task and expert."""
    import zipfile

    import pandas as pd

    from lorlib_ui.app import insight, tables
    from lorlib_ui.core.assets import asset

    path = str(asset("library"))
    view = worker.insight(path)
    out = insight.download(worker, path, "arrow@private", "content", None)["value"]
    with zipfile.ZipFile(out) as zf:
        names = sorted(zf.namelist())
        assert names == ["routing-arrow-private.csv", "transfer.csv"]
        transfer = pd.read_csv(zf.open("transfer.csv"))
        routing = pd.read_csv(zf.open("routing-arrow-private.csv"))
    assert len(transfer) == len(view.transfer["tasks"]) * len(view.transfer["columns"])
    assert set(transfer.columns) == {"task", "family", "expert", "loglik", "exact_match", "gain"}
    shares = routing.groupby("task")["share"].sum()
    assert ((shares - 1).abs() < 1e-3).all()  # each task's tokens, shared out over the experts
    one = tables.write_csv({"means": pd.DataFrame({"router": ["arrow"], "exact_match": [0.3]})}, "evaluation")
    assert one.endswith("means.csv") and pd.read_csv(one)["router"].tolist() == ["arrow"]


def test_the_route_tab_opens_on_the_librarys_demo_example_and_says_what_it_shows(worker, page):
    from dataclasses import replace

    from lorlib_ui.app import route
    from lorlib_ui.core.assets import asset

    tab = page.route
    info = worker.library(str(asset("library")))
    demo = {"task": "t", "prompt": "2 + 2?", "expected": "4", "router": "arrow", "answer": "4", "base_answer": "5"}
    shown = route.opened(tab, replace(info, demo=demo), [])
    assert shown[tab.router_note].startswith("*This example is from t, a task no expert was trained on: arrow")
    notes = shown[tab.notes]
    assert links.restore_controls(tab, {}, notes)[tab.prompt] == "2 + 2?"  # a plain page opens on it
    from_link = links.restore_controls(tab, {"prompt": "mine", "tab": "route"}, notes)
    assert from_link[tab.prompt] == "mine"  # a link's own prompt wins
    plain = route.opened(tab, replace(info, demo=None), [])
    assert links.restore_controls(tab, {}, plain[tab.notes])[tab.prompt] == {"__type__": "update"}


# ---- results that go stale, the base router's figures, the difference, compare's timing, cancel ----------


class UniformToo(GroupedWorker):
    """`GroupedWorker`, with `uniform` over all four experts (the shared one too) and `base`."""

    def route(self, request):
        if request.router not in ("uniform", "base"):
            yield from super().route(request)
            return
        weights = np.full((2, 5, 4), 0.25 if request.router == "uniform" else 0.0)
        record = RoutingRecord(request.router, self.EXPERTS, self.MODULES, list("abcde"), weights, weights * np.nan)
        yield RouteUpdate("an", first_token_s=0.05)
        yield RouteUpdate("an answer", done=True, record=record, n_prompt_tokens=3, first_token_s=0.05, total_s=0.3)


def test_a_compare_then_a_changed_prompt_clears_the_comparison(worker, tiny_library):
    blocks, page = layout.build_page(worker, str(tiny_library.path))
    tab = page.route
    out = _compared(route.compare(UniformToo(), tab, "lib", "hi", "arrow@private", "uniform", 2, 1.0, 4))
    assert out[tab.compare_a] and out[tab.compare_box].visible
    cleared = route.stale(tab, None, "", out[tab.compare_a])  # the prompt changed: nothing of the old one stays
    assert cleared[tab.compare_a] == cleared[tab.compare_b] == cleared[tab.compare_timing] == ""
    assert cleared[tab.compare_plot_a] is None and cleared[tab.compare_plot_b] is None
    assert cleared[tab.compare_diff] is None and not cleared[tab.compare_box].visible
    assert cleared[tab.timing] == route.STALE and cleared[tab.record] is None
    assert route.stale_compare(tab, out[tab.compare_a])[tab.compare_diff] is None  # router B changed
    assert route.stale(tab, None, "", "") == gr.skip()  # nothing shown yet: the first keystroke leaves all as is
    # the prompt, however it changed (a deletion or a paste sends no `input`): compared with the routed one
    assert out[tab.routed_prompt] == "hi"
    assert route.stale_prompt(tab, "h", "hi", None, "", out[tab.compare_a])[tab.compare_a] == ""
    assert route.stale_prompt(tab, "hi ", "hi", None, "", out[tab.compare_a]) == gr.skip()
    prompt_changes = [f for f in blocks.fns.values() if (tab.prompt._id, "change") in f.targets]
    assert any(tab.compare_a in f.outputs for f in prompt_changes)
    clicks = [f for f in blocks.fns.values() if (tab.route_btn._id, "click") in f.targets]
    clears = [f for f in clicks if tab.compare_a in f.outputs]  # a new route first clears the comparison
    assert len(clears) == 1 and not clears[0].queue and clears[0].fn()[tab.compare_a] == ""


def test_the_base_routers_routing_figure_says_no_adapters(page):
    from lorlib_ui.app import routing_figures

    tab = page.route
    final = list(route.route(UniformToo(), tab, "lib", "hi", "base", 2, 1.0, 4))[-1]
    layer = final[tab.layer_plot]
    assert not layer.data and routing_figures.NO_ADAPTERS in layer.layout.annotations[0].text  # no empty heatmap
    detail = route.layer_detail(tab, final[tab.record], GroupedWorker.MODULES[0], 2, final[tab.shown])
    assert not detail[tab.token_plot].data and not detail[tab.logits_plot].data
    uniform = list(route.route(UniformToo(), tab, "lib", "hi", "uniform", 2, 1.0, 4))[-1][tab.layer_plot]
    assert "a static merge: the same weights at every token and layer" in uniform.layout.title.text
    assert uniform.data[0].zmax == 1.0  # 1/4 reads as a quarter, not as the darkest cell


def test_the_difference_is_over_the_experts_both_routers_can_use(page):
    tab = page.route
    out = _compared(route.compare(UniformToo(), tab, "lib", "hi", "arrow@private", "uniform", 2, 1.0, 4))
    diff = out[tab.compare_diff]
    assert list(diff.data[0].x) == ["p0", "p1", "p2"]  # not shared: only uniform can weight it
    assert "only B uses shared" in diff.layout.title.text and "only A" not in diff.layout.title.text
    a = next(GroupedWorker().route(SimpleNamespace(router="arrow@private"))).record
    assert np.allclose(diff.data[0].z, a.layer_expert_weights()[:, :3] - 0.25)
    against_base = _compared(route.compare(UniformToo(), tab, "lib", "hi", "arrow@private", "base", 2, 1.0, 4))
    from_base = against_base[tab.compare_diff]  # against no adapter: A's own routing, over A's experts
    assert list(from_base.data[0].x) == ["p0", "p1", "p2"] and "B uses no adapter" in from_base.layout.title.text


def test_compare_streams_both_routers_with_their_timing(page):
    tab = page.route
    updates = list(route.compare(UniformToo(), tab, "lib", "hi", "uniform", "base", 2, 1.0, 4))
    assert updates[0][tab.compare_b] == "" and updates[0][tab.compare_diff] is None  # the last one's go first
    streamed = [u for u in updates if u.get(tab.compare_b) == "an"]
    assert streamed and "**B** (base): first token after 0.05 s" in streamed[0][tab.compare_timing]
    timing = _compared(updates)[tab.compare_timing]
    assert "**A** (uniform): first token after 0.05 s, done in 0.30 s" in timing
    assert "**B** (base): first token after 0.05 s, done in 0.30 s" in timing


def test_cancel_with_nothing_running_says_so_at_once():
    from lorlib_ui.app.events import cancel_job
    from lorlib_ui.worker.api import JobStatus

    NOTHING_TO_CANCEL = "no job to cancel"  # what a fresh page's Cancel has always said (test_attacks)

    class Board:
        def __init__(self, state):
            self.state, self.cancelled = state, []

        def job(self, job_id):
            if self.state is None:
                raise LorlibError(f"no job {job_id!r}")  # ended long ago: forgotten
            return JobStatus(job_id, "build", self.state)

        def cancel(self, job_id):
            self.cancelled.append(job_id)
            self.state = "cancelled" if self.state == "queued" else self.state

    assert cancel_job(Board("running"), None) == NOTHING_TO_CANCEL
    for ended in ("done", "failed", "cancelled", None):
        board = Board(ended)
        assert cancel_job(board, "j").startswith(NOTHING_TO_CANCEL) and board.cancelled == []
    assert cancel_job(Board("queued"), "j") == "cancelled"
    assert cancel_job(Board("running"), "j") == "cancelling..."  # the poll that follows it says when it ends
