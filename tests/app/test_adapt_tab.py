"""The Adapt tab's handlers with an in-process worker: a tiny adaptation job, its live curves, its
results, and the learned router reaching the Route tab; no plot before there are results, and the
second press a long run needs."""

import os

import gradio as gr
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from lorlib_ui.app import adapt, estimates, layout, route  # noqa: E402
from lorlib_ui.core.library import Library  # noqa: E402
from lorlib_ui.worker.api import JobStatus, LibraryInfo  # noqa: E402
from lorlib_ui.worker.local import LocalWorker  # noqa: E402


class Progress:
    """Stands in for gr.Progress: records what the job reported."""

    def __init__(self):
        self.calls = []

    def __call__(self, fraction, desc=None):
        self.calls.append((fraction, desc))


@pytest.fixture(scope="module")
def worker():
    return LocalWorker(device="cpu")


def test_a_tiny_adaptation_trains_stores_scores_and_offers_its_router(worker, built):
    path = str(built)
    page = layout.build_page(worker, path)[1]
    tab = page.adapt
    info = worker.library(path)
    opened = adapt.opened(tab, info)
    task = opened[tab.task].value
    assert task == info.held_out[0] and opened[tab.task].choices == [(t, t) for t in info.held_out]
    progress = Progress()
    updates = list(adapt.adapt(worker, tab, path, task, None, [4], ["scratch", "poly-router"], 2, 3, progress=progress))
    final = updates[-1]
    assert "**done**" in final[tab.status]
    labels = list(final[tab.table]["router"])
    assert labels == ["arrow", "base", "scratch/4", "poly-router/4"]
    for column in ("EM 95% CI, rows", "EM 95% CI, tasks"):  # every row with both intervals
        assert final[tab.table][column].str.startswith("[").all()
    assert {"scratch/4 − arrow", "poly-router/4 − scratch/4"} <= set(final[tab.differences]["difference"])
    assert final[tab.losses]["visible"] and final[tab.plot]["visible"] and final[tab.note] == ""
    curves = final[tab.losses]["value"]
    assert [trace.name for trace in curves.data] == ["scratch/4", "poly-router/4"]
    assert all(len(trace.y) == 2 for trace in curves.data)  # one loss per training step
    job = worker.job(final[tab.job])
    assert job.detail["curves"] == {"scratch/4": list(curves.data[0].y), "poly-router/4": list(curves.data[1].y)}
    assert progress.calls and all(0 <= f <= 1 for f, _ in progress.calls)

    # stored in the library: an adapted expert and a learned router, which the Route tab offers and routes
    library = Library.open(path)
    assert [e.kind for e in library.experts if e.tasks == [task] and e.name.startswith("adapt-scratch")] == ["adapted"]
    info = worker.library(path)
    learned = [r["name"] for r in info.learned_routers]
    assert len(learned) == 1 and f"poly:{learned[0]}" in info.routers
    assert info.router_notes[f"poly:{learned[0]}"].startswith("poly-router: a router over the frozen experts")
    done = list(route.route(worker, page.route, path, "repeat fox", f"poly:{learned[0]}", 2, 1.0, 2))[-1]
    record = done[page.route.record]
    assert record.router == f"poly:{learned[0]}" and record.weights.shape[1] == len(record.tokens)
    private = [i for i, name in enumerate(record.experts) if library.expert(name).kind == "private"]
    assert abs(record.weights[:, :, private].sum(-1) - 1).max() < 1e-5  # a softmax over the private experts

    # the Library tab lists the adapted expert and the learned router
    shown = layout.open_library(worker, page, path)
    assert any(name.startswith("adapt-scratch") for name in shown[page.library.table]["name"])
    learned_table = shown[page.library.learned]
    assert learned_table.visible and list(learned_table.value["data"][0][:2]) == [f"poly:{learned[0]}", "poly-router"]

    # reopening keeps the picked task and shows its stored record
    again = adapt.refresh(worker, tab, path, task)
    assert again[tab.task].value == task and list(again[tab.table]["router"]) == labels


@pytest.mark.parametrize(
    "task, shots, methods, message",
    [
        ("", [8], ["scratch"], "pick a task"),
        ("copy0", [], ["scratch"], "pick at least one number of shots"),
        ("copy0", [8], [], "pick at least one method"),
    ],
)
def test_missing_choices_show_one_line(worker, built, task, shots, methods, message):
    page = layout.build_page(worker, str(built))[1]
    with pytest.raises(gr.Error, match=message):
        list(adapt.adapt(worker, page.adapt, str(built), task, None, shots, methods, 0, 5, progress=Progress()))


def test_a_refused_job_shows_its_line_and_changes_nothing(worker, built):
    from conftest import library_snapshot

    page = layout.build_page(worker, str(built))[1]
    before = library_snapshot(built)
    with pytest.raises(gr.Error, match="more than the"):
        list(adapt.adapt(worker, page.adapt, str(built), "copy1", None, [128], ["scratch"], 0, 5, progress=Progress()))
    assert library_snapshot(built) == before


class TimedWorker:
    """A worker over a library with no adaptation results, whose last evaluation scored 100 rows in
    100 s (1 s a row) and whose experts trained 10 steps at 2 s a step; it records the jobs it is
    asked to run, and each is done at once."""

    def __init__(self):
        self.submitted = []

    def comparisons(self):
        return {"arrow": True}

    def library(self, path):
        evaluation = {"seconds": 100.0, "scores": [{"examples": 100}]}
        expert = {"name": "e", "kind": "private", "tasks": ["seen"], "metrics": {"seconds": 20.0, "steps": 10}}
        return LibraryInfo(path, "base", [expert], [], [], 4, ["t0"], {}, evaluation, [])

    def submit(self, job):
        self.submitted.append(job)
        return f"job{len(self.submitted)}"

    def job(self, job_id):
        return JobStatus(job_id, "adapt", "done", 1.0, "adapted", result={"adaptation": None})


@pytest.fixture
def timed():
    worker = TimedWorker()
    return worker, layout.build_page(worker, "lib")[1].adapt


def test_no_results_no_axes_and_a_line_on_what_adapting_does(timed):
    worker, tab = timed
    shown = adapt.opened(tab, worker.library("lib"))
    assert not shown[tab.plot]["visible"] and not shown[tab.losses]["visible"]  # never empty axes
    assert shown[tab.note] == adapt.NO_RESULTS and "holds no adaptation results yet" in adapt.NO_RESULTS
    assert not tab.plot.visible and not tab.losses.visible  # nor before the library opens


def test_a_long_adaptation_starts_on_the_second_press_and_a_short_one_at_once(timed):
    worker, tab = timed
    info = worker.library("lib")
    # two methods, 10 steps each at 2 s, then 4 results x 40 rows at 1 s: 200 s
    assert estimates.adaptation(info, ["scratch", "mu"], [8], 0, 40).seconds == 2 * 10 * 2.0 + 4 * 40
    lorahub = estimates.adaptation(info, ["lorahub"], [8, 16], 5, 10)  # its search: a step per evaluation
    assert lorahub.seconds == 2 * estimates.LORAHUB_BUDGET * 2.0 + 4 * 10
    press = [worker, tab, "lib", "t0", None, [8], ["scratch", "mu"], 0, 40]
    first = list(adapt.adapt(*press, None, progress=Progress()))
    assert worker.submitted == [] and "press **Adapt** again" in first[0][tab.status]
    list(adapt.adapt(*press, first[0][tab.confirmed], progress=Progress()))
    assert [job.options["methods"] for job in worker.submitted] == [["scratch", "mu"]]
    list(adapt.adapt(worker, tab, "lib", "t0", None, [8], ["scratch"], 0, 5, progress=Progress()))
    assert len(worker.submitted) == 2  # 45 s: started at once
