"""The Build tab: train one expert per task (embedded BIG-bench data or an uploaded file) into the
open library, as a job with a progress bar and cancel."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from lorlib_ui.app.events import bind, cancel_job, run_job, session, shows_errors
from lorlib_ui.worker.api import JobRequest, LibraryInfo, Worker

HELP = (
    "Train one expert per task of the embedded BIG-bench data (or your own file) into the open "
    "library. Experts already there are skipped; each finished expert is saved at once."
)


@dataclass
class BuildTab:
    families: gr.Dropdown
    tasks: gr.Dropdown
    data_file: gr.File
    steps: gr.Slider
    rank: gr.Slider
    shared: gr.Checkbox
    detach: gr.Checkbox
    targets: gr.Dropdown
    build_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.Markdown
    job: gr.State


def build_tab(tasks_by_family: dict[str, list[str]]) -> BuildTab:
    with gr.Tab("Build", id="build"):
        gr.Markdown(HELP)
        families = gr.Dropdown(sorted(tasks_by_family), multiselect=True, label="Families (embedded data)")
        tasks = gr.Dropdown(
            sorted(t for ts in tasks_by_family.values() for t in ts), multiselect=True, label="or tasks"
        )
        data_file = gr.File(label="or your own data file", file_types=[".jsonl", ".gz", ".csv", ".parquet"])
        with gr.Row():
            steps = gr.Slider(1, 500, value=60, step=1, label="steps per expert")
            rank = gr.Slider(1, 32, value=4, step=1, label="rank")
            shared = gr.Checkbox(value=False, label="also train the shared expert")
            detach = gr.Checkbox(value=False, label="finish in the background if I leave the page")
        targets = gr.Dropdown(  # choices follow the open library; the worker checks the names
            [],
            multiselect=True,
            allow_custom_value=True,
            label="adapted modules (MBC clusters only experts that adapt the same modules at the same rank)",
            elem_id="build-targets",
        )
        with gr.Row():
            build_btn = gr.Button("Build", variant="primary")
            cancel_btn = gr.Button("Cancel")
        status = gr.Markdown()
        job = gr.State()  # inside the tab: a Tabs block holds only tabs
    return BuildTab(
        families, tasks, data_file, steps, rank, shared, detach, targets, build_btn, cancel_btn, status, job
    )


def opened(tab: BuildTab, info: LibraryInfo) -> dict:
    """New experts adapt what the library's task experts adapt, at their rank, so MBC can compare them."""
    return {
        tab.targets: gr.Dropdown(choices=info.modules, value=info.new_targets),
        tab.rank: gr.Slider(value=info.new_rank),
    }


@shows_errors
def build(
    worker: Worker,
    tab: BuildTab,
    folder,
    families,
    tasks,
    upload,
    steps,
    rank,
    targets,
    with_shared,
    detach=False,
    progress=gr.Progress(),  # noqa: B008 (Gradio fills it in)
    request: gr.Request | None = None,  # Gradio fills it in too: its session owns the job
):
    """Train experts into the open library as a job, which ends with the page's session unless
    `detach` (a build the user asked to finish in the background)."""
    if not targets:
        raise gr.Error("pick at least one module to adapt")
    options = {"steps": int(steps), "rank": int(rank), "targets": list(targets), "shared": bool(with_shared)}
    if upload:
        options["data"] = upload
    if tasks:
        options["tasks"] = list(tasks)
    elif families:
        options["families"] = list(families)
    elif not upload:
        raise gr.Error("pick families or tasks, or upload a data file")
    job = JobRequest("build", folder, options, owner=session(request), detached=bool(detach))
    for job_id, line in run_job(worker, job, progress):
        yield {tab.job: job_id, tab.status: line}


def wire(tab: BuildTab, worker: Worker, path: gr.State):
    """This tab's events; returns the build event, after which the layout reopens the library."""
    built = tab.build_btn.click(
        bind(build, worker, tab),
        [path, tab.families, tab.tasks, tab.data_file, tab.steps, tab.rank, tab.targets, tab.shared, tab.detach],
        [tab.job, tab.status],
        api_name="build",
    )
    tab.cancel_btn.click(partial(cancel_job, worker), tab.job, tab.status, api_name="cancel_build", queue=False)
    return built
