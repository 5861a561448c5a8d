"""The Evaluate tab: means with intervals, paired differences, the per-task breakdown, the main
comparison in one sentence, and the estimate and second press before a long run."""

import os
import re
from dataclasses import replace

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from test_insight import _finish  # noqa: E402

from lorlib_ui.app import estimates, evaluate, layout  # noqa: E402
from lorlib_ui.worker.api import JobRequest, JobStatus, LibraryInfo, duration  # noqa: E402
from lorlib_ui.worker.local import LocalWorker  # noqa: E402


def test_an_evaluation_shows_intervals_differences_and_each_task(built):
    worker = LocalWorker(device="cpu")
    tab = layout.build_page(worker, str(built))[1].evaluate
    options = {"routers": ["base", "arrow", "shared"], "tasks": "all", "limit": 2}
    _finish(worker, JobRequest("evaluate", str(built), options))
    info = worker.library(str(built))
    out = evaluate.opened(tab, info)
    table = out[tab.table]
    assert list(table["router"]) == ["base", "arrow", "shared"]
    for value, rows, tasks in zip(table["answer log-lik."], table["LL 95% CI, rows"], table["LL 95% CI, tasks"]):
        low, high = map(float, re.fullmatch(r"\[(-?[\d.]+), (-?[\d.]+)\]", rows).groups())
        assert low - 1e-3 <= value <= high + 1e-3
        wide_low, wide_high = map(float, re.fullmatch(r"\[(-?[\d.]+), (-?[\d.]+)\]", tasks).groups())
        assert wide_low - 1e-3 <= value <= wide_high + 1e-3  # over tasks: about tasks like these
    differences = out[tab.differences]
    assert list(differences["difference"]) == ["arrow − shared"]  # the pairs that matter, where both ran
    interval = r"\[-?[\d.]+, -?[\d.]+\]"
    assert re.fullmatch(rf"[+-][\d.]+ {interval} tasks {interval}", differences["answer log-lik."][0])
    up, tied, down = map(int, differences["LL tasks up/tied/down"][0].split("/"))
    assert up + tied + down == differences["tasks"][0]
    bars = out[tab.task_plot].data
    tasks = info.evaluation["tasks"]
    assert [b.name for b in bars] == ["base", "arrow", "shared"] and all(list(b.x) == tasks for b in bars)
    scores = {(s["router"], s["task"]): s for s in info.evaluation["scores"]}
    assert np.allclose(bars[1].y, [100 * scores["arrow", t]["exact_match"] for t in tasks])
    loglik = evaluate.draw_per_task(worker, str(built), "loglik").data[2]
    assert np.allclose(loglik.y, [scores["shared", t]["loglik"] for t in tasks])
    error = out[tab.plot].data[0].error_y
    assert error.visible and len(error.array) == 2


# ---- the estimate before a run, the second press that starts a long one, the main comparison -------


class TimedWorker:
    """A worker over a library whose last evaluation scored 100 rows in 100 s (1 s a row) and
    whose expert trained 10 steps in 20 s, with three held-out tasks; it records the jobs it is
    asked to run, and each is done at once."""

    def __init__(self):
        self.submitted = []

    def comparisons(self):
        return {"base": True, "arrow": True}

    def library(self, path):
        evaluation = {"seconds": 100.0, "scores": [{"examples": 60}, {"examples": 40}]}
        expert = {"name": "e", "kind": "private", "tasks": ["seen"], "metrics": {"seconds": 20.0, "steps": 10}}
        return LibraryInfo(path, "base", [expert], [], [], 4, ["t0", "t1", "t2"], {}, evaluation, [])

    def submit(self, job):
        self.submitted.append(job)
        return f"job{len(self.submitted)}"

    def job(self, job_id):
        return JobStatus(job_id, "evaluate", "done", 1.0, "evaluated")


def _progress(fraction, desc=None):
    pass


@pytest.fixture
def timed():
    worker = TimedWorker()
    return worker, layout.build_page(worker, "lib")[1].evaluate


def test_the_estimate_is_the_librarys_pace_times_the_rows_asked_for():
    info = TimedWorker().library("lib")
    pace = estimates.pace(info)
    assert (pace.row_s, pace.step_s) == (1.0, 2.0)
    estimate = estimates.evaluation(info, ["base", "arrow"], "held-out", 40)
    assert (estimate.seconds, estimate.rows) == (2 * 3 * 40, 240) and estimate.long  # 4 min: above 3
    assert estimates.evaluation(info, ["base", "arrow"], "seen", 40).seconds == 2 * 1 * 40
    with_lorahub = estimates.evaluation(info, ["arrow", "lorahub"], "held-out", 10)
    assert with_lorahub.seconds == 2 * 3 * 10 + 3 * estimates.LORAHUB_BUDGET * 2.0  # its search: a step each
    unused = estimates.evaluation(info, ["arrow"], "unused", 10)
    assert unused.seconds is None and unused.long and "counted when the job starts" in unused.line()
    assert estimates.evaluation(replace(info, evaluation=None, experts=[]), ["arrow"], "held-out", 5).seconds is None
    assert [duration(s) for s in (30, 3300, 7800, 3600)] == [
        "under a minute",
        "about 55 min",
        "about 2 h 10 min",
        "about 1 h",
    ]


def test_a_long_evaluation_starts_on_the_second_press_and_a_short_one_at_once(timed):
    worker, tab = timed
    first = list(evaluate.evaluate(worker, tab, "lib", ["base", "arrow"], "held-out", 40, None, _progress))
    assert worker.submitted == [] and len(first) == 1  # nothing runs yet: it says how long it would take
    assert first[0][tab.status].startswith("**about 4 min at the pace of this library's last evaluation**")
    assert "press **Evaluate** again" in first[0][tab.status]
    key = first[0][tab.confirmed]
    changed = list(evaluate.evaluate(worker, tab, "lib", ["base", "arrow"], "held-out", 41, key, _progress))
    assert worker.submitted == [] and changed[0][tab.confirmed] != key  # other settings: asked again
    second = list(evaluate.evaluate(worker, tab, "lib", ["base", "arrow"], "held-out", 40, key, _progress))
    assert [job.options["limit"] for job in worker.submitted] == [40]
    assert second[-1][tab.confirmed] is None and second[-1][tab.status].endswith("(estimated: about 4 min in all)")
    list(evaluate.evaluate(worker, tab, "lib", ["base", "arrow"], "held-out", 10, None, _progress))
    assert [job.options["limit"] for job in worker.submitted] == [40, 10]  # 1 min: no question asked


def _difference(a, b, difference, task_ci=None, ci=(-0.5, 0.5)):
    return {"a": a, "b": b, "tasks": 7, "exact_match": {"difference": difference, "ci": list(ci), "task_ci": task_ci}}


def _evaluation(*differences):
    means = {"arrow": 0.29, "shared": 0.39, "uniform": 0.17, "arrow-cluster": 0.23}
    return {"summary": [{"router": r, "exact_match": m} for r, m in means.items()], "differences": list(differences)}


EM = "on exact match over 7 tasks, 95% interval"
UNSETTLED = "it includes 0, so these tasks do not show which is better."


@pytest.mark.parametrize(
    "differences, sentence",
    [
        (  # Arrow behind: said as the other's lead, the interval turned with it
            [_difference("arrow", "uniform", 0.1, [0.01, 0.2]), _difference("arrow", "shared", -0.1, [-0.2, -0.01])],
            f"The shared expert beats Arrow by 10.0 points {EM} [1.0, 20.0] over tasks.",
        ),
        (  # Arrow ahead, the interval clear of 0
            [_difference("arrow", "uniform", 0.115, [0.015, 0.225])],
            f"Arrow beats the uniform merge by 11.5 points {EM} [1.5, 22.5] over tasks.",
        ),
        (  # an interval that includes 0 settles nothing
            [_difference("arrow-cluster", "arrow", -0.06, [-0.13, 0.02])],
            f"Arrow beats Arrow over cluster experts by 6.0 points {EM} [-2.0, 13.0] over tasks: {UNSETTLED}",
        ),
        (  # a record without intervals over tasks: over rows, said so
            [_difference("arrow", "shared", 0.0, None, (-0.02, 0.03))],
            f"Arrow and the shared expert tie {EM} [-2.0, 3.0] over rows: {UNSETTLED}",
        ),
    ],
)
def test_the_main_comparison_is_one_sentence_true_whichever_way_it_goes(differences, sentence):
    assert evaluate.main_comparison(_evaluation(*differences)) == f"**Main comparison**: {sentence}"


def test_no_difference_with_arrow_says_nothing():
    assert evaluate.main_comparison(None) == ""
    assert evaluate.main_comparison(_evaluation(_difference("shared", "uniform", 0.2, [0.1, 0.3]))) == ""
