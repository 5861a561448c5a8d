"""The Evaluate tab: routers compared zero-shot on the library's held-out tasks, as a job."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from lorlib_ui.app import figures
from lorlib_ui.app.events import cancel_job, run_job, shows_errors
from lorlib_ui.worker.api import JobRequest, LibraryInfo, Worker

HELP = (
    "Compare routers zero-shot on the library's held-out tasks (no expert saw them): exact "
    "match of the answer, and multiple-choice accuracy where the task has options."
)
COLUMNS = ["router", "tasks", "exact match %", "answer log-lik.", "multiple choice %"]


@dataclass
class EvaluateTab:
    routers: gr.CheckboxGroup
    limit: gr.Slider
    evaluate_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.Markdown
    plot: gr.Plot
    table: gr.Dataframe
    job: gr.State


def build_tab(comparisons: list[str]) -> EvaluateTab:
    """`comparisons`: what the worker can compare, all ticked (API calls are checked against them)."""
    with gr.Tab("Evaluate", id="evaluate"):
        gr.Markdown(HELP)
        routers = gr.CheckboxGroup(comparisons, value=comparisons, label="Routers")
        limit = gr.Slider(1, 200, value=20, step=1, label="test rows per task")
        with gr.Row():
            evaluate_btn = gr.Button("Evaluate", variant="primary")
            cancel_btn = gr.Button("Cancel")
        status = gr.Markdown()
        plot = gr.Plot(show_label=False)
        table = gr.Dataframe(interactive=False, label="Results")
        job = gr.State()  # inside the tab: a Tabs block holds only tabs
    return EvaluateTab(routers, limit, evaluate_btn, cancel_btn, status, plot, table, job)


def evaluation_frame(evaluation: dict | None) -> pd.DataFrame:
    rows = []
    for r in (evaluation or {}).get("summary", []):
        rows.append(
            {
                "router": r["router"],
                "tasks": r["tasks"],
                "exact match %": round(100 * r["exact_match"], 1),
                "answer log-lik.": round(r["loglik"], 3),
                "multiple choice %": "" if r["mc_accuracy"] is None else round(100 * r["mc_accuracy"], 1),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def opened(tab: EvaluateTab, info: LibraryInfo) -> dict:
    """The library's last evaluation. (The comparisons on offer are the worker's, the same for
    every library, and the user's ticks stay as they are.)"""
    return {
        tab.table: evaluation_frame(info.evaluation),
        tab.plot: figures.evaluation_bars((info.evaluation or {}).get("summary", [])),
    }


@shows_errors
def evaluate(worker: Worker, tab: EvaluateTab, folder, names, limit, progress=gr.Progress()):  # noqa: B008 (Gradio fills it in)
    if not names:
        raise gr.Error("pick at least one router")
    request = JobRequest("evaluate", folder, {"routers": list(names), "limit": int(limit)})
    for job_id, line in run_job(worker, request, progress):
        yield {tab.job: job_id, tab.status: line}


def wire(tab: EvaluateTab, worker: Worker, path: gr.State):
    """This tab's events; returns the evaluate event, after which the layout reopens the library."""
    evaluated = tab.evaluate_btn.click(
        partial(evaluate, worker, tab), [path, tab.routers, tab.limit], [tab.job, tab.status], api_name="evaluate"
    )
    tab.cancel_btn.click(partial(cancel_job, worker), tab.job, tab.status, api_name="cancel_evaluate", queue=False)
    return evaluated
