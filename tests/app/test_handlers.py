"""The explorer's event handlers, called directly with a worker: no server, no browser."""

import os

import gradio as gr
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from lorlib_ui.app import evaluate, layout, route  # noqa: E402
from lorlib_ui.app.events import shows_errors  # noqa: E402
from lorlib_ui.core.errors import LorlibError  # noqa: E402
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
    assert final[page.route.record].weights.shape[0] == len(final[page.route.record].modules)
    assert "done in" in final[page.route.timing] and final[page.route.layer_plot].data[0].type == "heatmap"
    detail = route.layer_detail(page.route, final[page.route.record], final[page.route.module_pick].value)
    assert detail[page.route.token_plot].data[0].type == "heatmap"


def test_errors_become_one_visible_line(worker, page, tiny_library):
    with pytest.raises(gr.Error, match="the prompt is empty"):
        list(route.route(worker, page.route, str(tiny_library.path), "  ", "arrow", 2, 1.0, 4))
    with pytest.raises(gr.Error, match="pick at least one router"):
        list(evaluate.evaluate(worker, page.evaluate, str(tiny_library.path), [], 5))
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
