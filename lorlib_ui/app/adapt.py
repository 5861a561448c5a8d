"""The Adapt tab: learn a new task from a few of its examples by reusing the library, as a job,
and see which way of reusing it learns the task best (the paper's supervised adaptation)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from lorlib_ui.app import estimates, evaluation_figures, tables
from lorlib_ui.app.evaluate import differences_frame, evaluation_frame
from lorlib_ui.app.events import bind, cancel_job, follow_job, session, shows_errors
from lorlib_ui.worker.api import ADAPT_METHODS, JobRequest, LibraryInfo, Worker

HELP = (
    "Learn a new task from a few of its examples, reusing the library, and compare the ways to do it: "
    "**scratch** (a new LoRA), **mu** (start from the mean of the private experts), **shared** (start from "
    "the multi-task expert), **poly-router** (learn how to mix the frozen experts, per layer), **poly-full** "
    "(mix and train the experts too) and **lorahub** (a gradient-free merge). Each is trained on the same "
    "examples, stored in the library (an *adapted* expert, or a learned router `poly:NAME` for the Route "
    "tab), and scored on the task's test rows beside zero-shot Arrow and the base model. Pick a held-out "
    "task of the library, or upload a file with the task's rows and type its name."
)
SHOTS = [8, 16, 32, 64, 128]
WHAT_ADAPT_DOES = (
    "**Adapt** trains each ticked method on the task's examples, stores what it learns in the library and "
    "scores it here on the task's test rows beside zero-shot Arrow and the base model."
)
NO_RESULTS = f"*This library holds no adaptation results yet.* {WHAT_ADAPT_DOES}"
NO_TASK_RESULTS = f"*No adaptation results for this task yet.* {WHAT_ADAPT_DOES}"
TRAINING_COLUMNS = ["method", "shots", "stored as", "training s", "first loss", "final loss"]


@dataclass
class AdaptTab:
    task: gr.Dropdown
    data_file: gr.File
    shots: gr.CheckboxGroup
    methods: gr.CheckboxGroup
    steps: gr.Number
    limit: gr.Slider
    adapt_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.Markdown
    losses: gr.Plot
    plot: gr.Plot
    table: gr.Dataframe
    differences: gr.Dataframe
    training: gr.Dataframe
    job: gr.State
    note: gr.Markdown  # with no results to show: says so, and what running it does
    confirmed: gr.State  # the settings a first press estimated: a second press with them starts a long run

    def result_outputs(self) -> list:
        return [self.plot, self.table, self.differences, self.training, self.losses, self.note]


def build_tab() -> AdaptTab:
    with gr.Tab("Adapt", id="adapt"):
        gr.Markdown(HELP)
        with gr.Row():
            task = gr.Dropdown([], label="Task", allow_custom_value=True, info="a held-out task, or one of your file")
            data_file = gr.File(
                label="or the task's rows (a data file)", file_types=[".jsonl", ".gz", ".csv", ".parquet"]
            )
        with gr.Row():
            shots = gr.CheckboxGroup(
                SHOTS, value=[32], label="Shots (several: a learning curve)", elem_id="adapt-shots"
            )
            methods = gr.CheckboxGroup(
                list(ADAPT_METHODS), value=list(ADAPT_METHODS), label="Methods", elem_id="adapt-methods"
            )
        with gr.Row():
            steps = gr.Number(0, precision=0, label="training steps (0: as the library's experts)")
            limit = gr.Slider(1, 200, value=40, step=1, label="test rows scored (at most)")
        with gr.Row():
            adapt_btn = gr.Button("Adapt", variant="primary")
            cancel_btn = gr.Button("Cancel")
        status = gr.Markdown()
        note = gr.Markdown(NO_RESULTS, elem_id="adapt-note")
        # no empty axes: each plot shows once there is something to draw in it
        losses = gr.Plot(show_label=False, elem_id="adapt-losses", visible=False)
        plot = gr.Plot(show_label=False, elem_id="adapt-scores", visible=False)
        table = gr.Dataframe(interactive=False, label="Test scores, 95% intervals over test rows")
        differences = gr.Dataframe(
            interactive=False, label="Paired differences, 95% intervals over rows and over tasks"
        )
        training = gr.Dataframe(interactive=False, label="Training")
        tables.csv_download(
            {"scores": table, "differences": differences, "training": training}, "adaptation", "download_adaptation"
        )
        job = gr.State()
        confirmed = gr.State()
    return AdaptTab(
        task, data_file, shots, methods, steps, limit, adapt_btn, cancel_btn, status, losses, plot, table,
        differences, training, job, note, confirmed,
    )  # fmt: skip


def training_frame(record: dict | None) -> pd.DataFrame:
    def rounded(value, digits):
        return "" if value is None else round(value, digits)

    rows = [
        {
            "method": run["method"],
            "shots": run["shots"],
            "stored as": run["router"],
            "training s": rounded(run.get("training_seconds"), 0),
            "first loss": rounded(run.get("first_loss"), 3),
            "final loss": rounded(run.get("final_loss"), 3),
        }
        for run in (record or {}).get("runs", [])
    ]
    return pd.DataFrame(rows, columns=TRAINING_COLUMNS)


def stored_curves(record: dict | None) -> dict[str, list[float]]:
    """Each run's loss curve as stored (LoraHub keeps no curve)."""
    runs = (record or {}).get("runs", [])
    return {f"{run['method']}/{run['shots']}": run["loss_curve"] for run in runs if run.get("loss_curve")}


def losses_plot(curves: dict[str, list[float]]) -> dict:
    """The loss curves, shown once there is one (never empty axes)."""
    return gr.update(value=evaluation_figures.loss_curves(curves) if curves else None, visible=bool(curves))


def results(
    tab: AdaptTab, record: dict | None, curves: dict[str, list[float]] | None = None, empty: str = NO_TASK_RESULTS
) -> dict:
    """The tab's figures and tables for one task's adaptation record; without one, empty tables,
    no plots, and the line `empty`."""
    task = (record or {}).get("task", "")
    title = f"{task}: test scores (%), 95% intervals over rows" if task else "Test scores (%)"
    summary = (record or {}).get("summary", [])
    return {
        tab.plot: gr.update(
            value=evaluation_figures.evaluation_bars(summary, title) if summary else None, visible=bool(summary)
        ),
        tab.table: evaluation_frame(record),
        tab.differences: differences_frame(record),
        tab.training: training_frame(record),
        tab.losses: losses_plot(stored_curves(record) if curves is None else curves),
        tab.note: "" if record else empty,
    }


def _empty_line(info: LibraryInfo) -> str:
    return NO_TASK_RESULTS if info.adaptation else NO_RESULTS


def opened(tab: AdaptTab, info: LibraryInfo, current: str | None = None) -> dict:
    """The held-out tasks (and those adapted to before) to pick from, keeping the `current` pick
    when the library still offers it, and that task's last record."""
    choices = list(dict.fromkeys([*info.held_out, *info.adaptation]))
    task = current if current in choices else (choices[0] if choices else None)
    shown = results(tab, info.adaptation.get(task), empty=_empty_line(info))
    return {tab.task: gr.Dropdown(choices=choices, value=task), **shown}


@shows_errors
def refresh(worker: Worker, tab: AdaptTab, folder: str, current: str | None) -> dict:
    return opened(tab, worker.library(folder), current)


@shows_errors
def show_task(worker: Worker, tab: AdaptTab, folder: str, task: str | None) -> dict:
    info = worker.library(folder)
    return results(tab, info.adaptation.get(task or ""), empty=_empty_line(info))


@shows_errors
def adapt(
    worker: Worker,
    tab: AdaptTab,
    folder,
    task,
    upload,
    shots,
    methods,
    steps,
    limit,
    confirmed: str | None = None,
    progress=gr.Progress(),  # noqa: B008 (Gradio fills it in)
    request: gr.Request | None = None,  # Gradio fills it in too: its session owns the job
):
    """Adapt to the task as a job; a run estimated long (`estimates`) starts only on a second
    press with the same settings, the first one saying how long it will take."""
    if not task or not str(task).strip():
        raise gr.Error("pick a task, or type the name of one in your file")
    if not shots:
        raise gr.Error("pick at least one number of shots")
    if not methods:
        raise gr.Error("pick at least one method")
    options = {"task": str(task).strip(), "shots": sorted(int(n) for n in shots), "methods": list(methods)}
    options["limit"] = int(limit)
    if steps:
        if int(steps) < 0:
            raise gr.Error("training steps must be 0 (as the library's experts) or more")
        options["steps"] = int(steps)
    if upload:
        options["data"] = upload
    key = estimates.request_key(folder, options)
    info = worker.library(folder)
    estimate = estimates.adaptation(info, options["methods"], options["shots"], options.get("steps"), int(limit))
    if ask := estimates.confirmation(estimate, key, confirmed, "Adapt"):
        yield {tab.status: ask, tab.confirmed: key}
        return
    job = JobRequest("adapt", folder, options, owner=session(request))
    for job_id, line, state in follow_job(worker, job, progress):
        update = {tab.job: job_id, tab.status: line + estimates.in_all(estimate), tab.confirmed: None}
        if state is not None and state.detail:
            update[tab.losses] = losses_plot(state.detail.get("curves", {}))
        if state is not None and state.state == "done":
            update |= results(tab, state.result["adaptation"], state.result.get("curves"))
        yield update


def wire(tab: AdaptTab, worker: Worker, path: gr.State):
    """This tab's events. Returns the adapt event (after which the layout reopens the library, so
    that the new experts show in the Library tab) and `redraw(event)`, which refreshes this tab
    after `event` (opening or changing the library), keeping the picked task."""
    adapted = tab.adapt_btn.click(
        bind(adapt, worker, tab),
        [path, tab.task, tab.data_file, tab.shots, tab.methods, tab.steps, tab.limit, tab.confirmed],
        [tab.job, tab.status, tab.confirmed, *tab.result_outputs()],
        api_name="adapt",
    )
    tab.task.input(partial(show_task, worker, tab), [path, tab.task], tab.result_outputs(), api_name="adaptation")
    tab.cancel_btn.click(partial(cancel_job, worker), tab.job, tab.status, api_name="cancel_adapt", queue=False)

    def redraw(event):
        again = partial(refresh, worker, tab)
        return event.success(again, [path, tab.task], [tab.task, *tab.result_outputs()], api_visibility="private")

    return adapted, redraw
