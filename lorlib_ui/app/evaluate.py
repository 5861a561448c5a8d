"""The Evaluate tab: routers compared zero-shot on the library's held-out tasks, as a job."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from lorlib_ui.app import estimates, evaluation_figures, tables
from lorlib_ui.app.events import bind, cancel_job, run_job, session, shows_errors
from lorlib_ui.worker.api import TASK_SETS, JobRequest, LibraryInfo, Worker

HELP = (
    "Compare routers zero-shot on the library's held-out tasks (no expert saw them), on the tasks it was "
    "trained on (seen), or on the tasks of its data that no expert is near (unused: families without an "
    "expert): exact match of the answer, the answer's log-likelihood, and multiple-choice accuracy where the "
    "task has options. Means are over tasks, each with two 95% bootstrap intervals: over test rows (how sure "
    "we are about these tasks) and over tasks (about tasks like these). Differences between routers are "
    "paired (the same rows resampled for both), with the tasks where each is up/tied/down. Routers the library "
    "cannot run yet (PhatGoose without gates, say) are skipped with a note. LoraHub is few-shot: it searches "
    "merge weights on 10 training rows of each task first, minutes per task, so it starts unticked."
)
# Two 95% intervals per measure: over test rows (the tasks fixed), and over tasks (tasks and rows
# resampled: about tasks like these), as `lorlib_ui.analysis.stats` computes them.
COLUMNS = [
    "router",
    "tasks",
    "exact match %",
    "EM 95% CI, rows",
    "EM 95% CI, tasks",
    "answer log-lik.",
    "LL 95% CI, rows",
    "LL 95% CI, tasks",
    "multiple choice %",
]
DIFFERENCE_COLUMNS = [
    "difference",
    "tasks",
    "exact match (points)",
    "EM tasks up/tied/down",
    "answer log-lik.",
    "LL tasks up/tied/down",
    "multiple choice (points)",
]
MEASURES = [("exact match", "exact_match"), ("answer log-likelihood", "loglik"), ("multiple choice", "mc_accuracy")]
# How the main comparison's sentence names a router (others by their name).
SPOKEN = {
    "arrow": "Arrow",
    "shared": "the shared expert",
    "uniform": "the uniform merge",
    "arrow-cluster": "Arrow over cluster experts",
    "base": "the base model",
    "oracle": "the oracle (its family's cluster expert)",
}


@dataclass
class EvaluateTab:
    routers: gr.CheckboxGroup
    tasks: gr.Radio
    limit: gr.Slider
    evaluate_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.Markdown
    plot: gr.Plot
    table: gr.Dataframe
    differences: gr.Dataframe
    measure: gr.Radio
    task_plot: gr.Plot
    job: gr.State
    verdict: gr.Markdown  # the main comparison in one sentence, with its interval
    confirmed: gr.State  # the settings a first press estimated: a second press with them starts a long run


def build_tab(comparisons: dict[str, bool]) -> EvaluateTab:
    """`comparisons`: what the worker can compare (API calls are checked against them), and
    whether each starts ticked."""
    with gr.Tab("Evaluate", id="evaluate"):
        gr.Markdown(HELP)
        ticked = [name for name, on in comparisons.items() if on]
        routers = gr.CheckboxGroup(list(comparisons), value=ticked, label="Routers")
        with gr.Row():
            tasks = gr.Radio(list(TASK_SETS), value="held-out", label="Tasks")
            limit = gr.Slider(1, 200, value=40, step=1, label="test rows per task (at most)")
        with gr.Row():
            evaluate_btn = gr.Button("Evaluate", variant="primary")
            cancel_btn = gr.Button("Cancel")
        status = gr.Markdown()
        verdict = gr.Markdown(elem_id="evaluate-verdict")
        plot = gr.Plot(show_label=False)
        table = gr.Dataframe(interactive=False, label="Means over tasks")
        differences = gr.Dataframe(
            interactive=False, label="Paired differences, 95% intervals over rows and over tasks"
        )
        tables.csv_download({"means": table, "differences": differences}, "evaluation", "download_evaluation")
        measure = gr.Radio(MEASURES, value="exact_match", label="Per task")
        task_plot = gr.Plot(show_label=False, elem_id="evaluate-per-task")
        job = gr.State()  # inside the tab: a Tabs block holds only tabs
        confirmed = gr.State()
    return EvaluateTab(
        routers, tasks, limit, evaluate_btn, cancel_btn, status, plot, table, differences, measure, task_plot, job,
        verdict, confirmed,
    )  # fmt: skip


def _interval(ci: list[float] | None, scale: float, digits: int) -> str:
    return "" if ci is None else f"[{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def evaluation_frame(evaluation: dict | None) -> pd.DataFrame:
    rows = []
    for r in (evaluation or {}).get("summary", []):
        rows.append(
            {
                "router": r["router"],
                "tasks": r["tasks"],
                "exact match %": round(100 * r["exact_match"], 1),
                "EM 95% CI, rows": _interval(r.get("exact_match_ci"), 100, 1),
                "EM 95% CI, tasks": _interval(r.get("exact_match_task_ci"), 100, 1),
                "answer log-lik.": round(r["loglik"], 3),
                "LL 95% CI, rows": _interval(r.get("loglik_ci"), 1, 3),
                "LL 95% CI, tasks": _interval(r.get("loglik_task_ci"), 1, 3),
                "multiple choice %": "" if r["mc_accuracy"] is None else round(100 * r["mc_accuracy"], 1),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def differences_frame(evaluation: dict | None) -> pd.DataFrame:
    def cell(row, key, scale, digits):
        if key not in row:
            return ""
        d = row[key]
        text = f"{scale * d['difference']:+.{digits}f} {_interval(d['ci'], scale, digits)}"
        return text + (f" tasks {_interval(d['task_ci'], scale, digits)}" if d.get("task_ci") else "")

    def signs(row, key):
        counts = row[key].get("signs") if key in row else None
        return f"{counts['up']}/{counts['tied']}/{counts['down']}" if counts else ""

    rows = [
        {
            "difference": f"{r['a']} − {r['b']}",
            "tasks": r["tasks"],
            "exact match (points)": cell(r, "exact_match", 100, 1),
            "EM tasks up/tied/down": signs(r, "exact_match"),
            "answer log-lik.": cell(r, "loglik", 1, 3),
            "LL tasks up/tied/down": signs(r, "loglik"),
            "multiple choice (points)": cell(r, "mc", 100, 1),
        }
        for r in (evaluation or {}).get("differences", [])
    ]
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


def _spoken(router: str) -> str:
    return SPOKEN.get(router, f"`{router}`")


def main_comparison(evaluation: dict | None) -> str:
    """The evaluation's main comparison in one sentence: Arrow against the best other router it
    has a paired difference with (by exact match), the gap in points with its 95% interval over
    tasks (over rows for a record without it), worded by the sign, and said unsettled when the
    interval includes 0. Empty without such a difference."""
    evaluation = evaluation or {}
    mean = {r["router"]: r["exact_match"] for r in evaluation.get("summary", [])}
    pairs = [r for r in evaluation.get("differences", []) if "arrow" in (r["a"], r["b"]) and "exact_match" in r]
    if not pairs:
        return ""
    row = max(pairs, key=lambda r: mean.get(r["b"] if r["a"] == "arrow" else r["a"], -1.0))
    d = row["exact_match"]
    over = "tasks" if d.get("task_ci") else "rows"
    gap, (low, high) = 100 * d["difference"], (100 * v for v in d.get("task_ci") or d["ci"])
    a, b = _spoken(row["a"]), _spoken(row["b"])
    if gap < 0:  # said as the winner's lead: the interval turns with it
        a, b, gap, low, high = b, a, -gap, -high, -low
    lead = f"{a} and {b} tie" if round(gap, 1) == 0 else f"{a} beats {b} by {gap:.1f} points"
    interval = f"95% interval [{low:.1f}, {high:.1f}] over {over}"
    text = f"{lead[0].upper()}{lead[1:]} on exact match over {row['tasks']} tasks, {interval}"
    if low <= 0 <= high:
        return f"**Main comparison**: {text}: it includes 0, so these tasks do not show which is better."
    return f"**Main comparison**: {text}."


def per_task(evaluation: dict | None, measure: str):
    evaluation = evaluation or {}
    routers = [r["router"] for r in evaluation.get("summary", [])]
    return evaluation_figures.per_task_bars(evaluation.get("scores", []), routers, measure)


def opened(tab: EvaluateTab, info: LibraryInfo) -> dict:
    """The library's last evaluation. (The comparisons on offer are the worker's, the same for
    every library, and the user's ticks stay as they are.)"""
    return {
        tab.table: evaluation_frame(info.evaluation),
        tab.differences: differences_frame(info.evaluation),
        tab.verdict: main_comparison(info.evaluation),
        tab.plot: evaluation_figures.evaluation_bars((info.evaluation or {}).get("summary", [])),
        tab.task_plot: per_task(info.evaluation, "exact_match"),
    }


@shows_errors
def draw_per_task(worker: Worker, folder: str, measure: str):
    return per_task(worker.library(folder).evaluation, measure)


@shows_errors
def evaluate(
    worker: Worker,
    tab: EvaluateTab,
    folder,
    names,
    tasks,
    limit,
    confirmed: str | None = None,
    progress=gr.Progress(),  # noqa: B008 (Gradio fills it in)
    request: gr.Request | None = None,  # Gradio fills it in too: its session owns the job
):
    """Evaluate the ticked routers as a job; a run estimated long (`estimates`) starts only on a
    second press with the same settings, the first one saying how long it will take."""
    if not names:
        raise gr.Error("pick at least one router")
    options = {"routers": list(names), "tasks": tasks, "limit": int(limit)}
    key = estimates.request_key(folder, options)
    estimate = estimates.evaluation(worker.library(folder), list(names), tasks, int(limit))
    if ask := estimates.confirmation(estimate, key, confirmed, "Evaluate"):
        yield {tab.status: ask, tab.confirmed: key}
        return
    request = JobRequest("evaluate", folder, options, owner=session(request))
    for job_id, line in run_job(worker, request, progress):
        yield {tab.job: job_id, tab.status: line + estimates.in_all(estimate), tab.confirmed: None}


def wire(tab: EvaluateTab, worker: Worker, path: gr.State):
    """This tab's events; returns the evaluate event, after which the layout reopens the library."""
    evaluated = tab.evaluate_btn.click(
        bind(evaluate, worker, tab),
        [path, tab.routers, tab.tasks, tab.limit, tab.confirmed],
        [tab.job, tab.status, tab.confirmed],
        api_name="evaluate",
    )
    tab.measure.input(partial(draw_per_task, worker), [path, tab.measure], tab.task_plot, api_name="per_task")
    tab.cancel_btn.click(partial(cancel_job, worker), tab.job, tab.status, api_name="cancel_evaluate", queue=False)
    return evaluated
