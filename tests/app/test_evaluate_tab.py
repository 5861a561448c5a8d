"""The Evaluate tab: means with intervals, paired differences, and the per-task breakdown."""

import os
import re

import numpy as np

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from test_insight import _finish  # noqa: E402

from lorlib_ui.app import evaluate, layout  # noqa: E402
from lorlib_ui.worker.api import JobRequest  # noqa: E402
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
