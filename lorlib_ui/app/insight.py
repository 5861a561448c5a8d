"""The Insight tab: is the routing right? The transfer matrix (each expert alone on each task)
beside a router's routing matrix over the same tasks, routing accuracy and entropy per layer, and
per task the agreement between where routing goes and where the gain is. Both are computed by
worker jobs and stored in the library, so the tab shows them as soon as a library opens."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from lorlib_ui.app import insight_figures as figs
from lorlib_ui.app import tables
from lorlib_ui.app.events import bind, cancel_job, run_job, session, shows_errors
from lorlib_ui.worker.api import TASK_SETS, InsightView, JobRequest, Worker

HELP = (
    "Does routing pick the experts that help? **Transfer** scores every expert alone on every task's test "
    "rows (gain in answer log-likelihood over the base model: blue helps, red hurts). **Routing** shows where "
    "a router sends each task's prompt tokens, in the same order. Both are computed once and kept in the "
    "library; a re-run computes only what is missing."
)
TOKENS = [("content tokens (template left out)", "content"), ("all prompt tokens", "all")]
DEFAULT_ROUTER = "arrow@private"
TABLE_LABEL = "Per task (click a header to sort)"


@dataclass
class InsightTab:
    router: gr.Dropdown
    tokens: gr.Radio
    layer: gr.Dropdown
    tasks: gr.Radio
    limit: gr.Slider
    transfer_btn: gr.Button
    routing_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.Markdown
    notes: gr.Markdown
    matrices: gr.Column
    transfer_plot: gr.Plot
    routing_plot: gr.Plot
    per_layer: gr.Column
    accuracy_plot: gr.Plot
    entropy_plot: gr.Plot
    summary: gr.Markdown
    table: gr.Dataframe
    job: gr.State
    download_btn: gr.Button | None = None  # the transfer and routing matrices, and the table, as CSV
    download_file: gr.File | None = None

    def shown(self) -> list:
        """What `show` updates."""
        return [
            self.router,
            self.layer,
            self.tasks,
            self.notes,
            self.matrices,
            self.transfer_plot,
            self.routing_plot,
            self.per_layer,
            self.accuracy_plot,
            self.entropy_plot,
            self.summary,
            self.table,
        ]


def build_tab() -> InsightTab:
    with gr.Tab("Insight", id="insight"):
        gr.Markdown(HELP)
        with gr.Row():
            router = gr.Dropdown([], label="Router", allow_custom_value=True)
            tokens = gr.Radio(TOKENS, value="content", label="Tokens")
            layer = gr.Dropdown([figs.ALL_LAYERS], value=figs.ALL_LAYERS, label="Layer")
        with gr.Row():
            tasks = gr.Radio(list(TASK_SETS), value="held-out", label="Tasks")
            limit = gr.Slider(1, 40, value=20, step=1, label="test rows per task")
        with gr.Row():
            transfer_btn = gr.Button("Compute transfer")
            routing_btn = gr.Button("Route the tasks", variant="primary")
            cancel_btn = gr.Button("Cancel")
        status = gr.Markdown()
        notes = gr.Markdown(elem_id="insight-notes")
        with gr.Column(visible=False) as matrices, gr.Row():  # hidden until there is something to draw
            transfer_plot = gr.Plot(show_label=False, elem_id="insight-transfer")
            routing_plot = gr.Plot(show_label=False, elem_id="insight-routing")
        with gr.Column(visible=False) as per_layer:
            summary = gr.Markdown()
            with gr.Row():
                accuracy_plot = gr.Plot(show_label=False, elem_id="insight-accuracy")
                entropy_plot = gr.Plot(show_label=False, elem_id="insight-entropy")
        # outside the hidden column: a table first drawn inside a hidden block keeps zero height
        table = gr.Dataframe(interactive=False, label=TABLE_LABEL, elem_id="insight-table", visible=False)
        with gr.Row():
            download_btn = gr.Button("Download the matrices and the table (CSV)", size="sm")
            download_file = gr.File(label="Matrices", interactive=False, visible=False)
        job = gr.State()  # inside the tab: a Tabs block holds only tabs
    return InsightTab(
        router=router,
        tokens=tokens,
        layer=layer,
        tasks=tasks,
        limit=limit,
        transfer_btn=transfer_btn,
        routing_btn=routing_btn,
        cancel_btn=cancel_btn,
        status=status,
        notes=notes,
        matrices=matrices,
        transfer_plot=transfer_plot,
        routing_plot=routing_plot,
        per_layer=per_layer,
        accuracy_plot=accuracy_plot,
        entropy_plot=entropy_plot,
        summary=summary,
        table=table,
        job=job,
        download_btn=download_btn,
        download_file=download_file,
    )


@shows_errors
def download(worker: Worker, folder: str, spec: str | None, tokens: str, table) -> dict:
    """What the tab shows as CSV: the transfer matrix (a row per task and expert), the router's
    routing matrix (its share of each task's tokens per expert) and the per-task table."""
    view = worker.insight(folder)
    frames = {}
    if view.transfer:
        t = view.transfer
        rows = [
            (task, family, column, t["loglik"][i][j], t["exact_match"][i][j], t["gain"][i][j])
            for i, (task, family) in enumerate(zip(t["tasks"], t["families"]))
            for j, column in enumerate(t["columns"])
        ]
        frames["transfer"] = pd.DataFrame(rows, columns=["task", "family", "expert", "loglik", "exact_match", "gain"])
        if stale := view.stale.get("transfer"):  # never written out unmarked either
            frames["transfer"]["stale"] = stale
    stats = (view.routing.get(spec or "") or {}).get("content" if tokens == "content" else "all")
    if stats:
        mass = stats["mass"]
        rows = [
            (task, expert, mass[i][j])
            for i, task in enumerate(stats["tasks"])
            for j, expert in enumerate(stats["experts"])
        ]
        frames[f"routing-{tables.slug(spec)}"] = pd.DataFrame(rows, columns=["task", "expert", "share"])
        if stale := view.stale.get(spec):
            frames[f"routing-{tables.slug(spec)}"]["stale"] = stale
    if (shown := tables.frame(table)) is not None:
        frames["per-task"] = shown.assign(stale=view.stale[spec]) if view.stale.get(spec or "") else shown
    if not frames:
        raise gr.Error("nothing to download yet: compute the transfer matrix or routing statistics first")
    return gr.update(value=tables.write_csv(frames, "insight"), visible=True)


def table_label(stale: str | None) -> str:
    return TABLE_LABEL if not stale else f"Per task — stale: {stale} (click a header to sort)"


def notes(view: InsightView, spec: str | None) -> str:
    """What is missing or stale of what the tab shows, each with the button that computes it again."""
    lines = []
    if view.transfer is None:
        lines.append("No transfer matrix yet: press **Compute transfer** (held-out tasks: minutes on a CPU).")
    elif stale := view.stale.get("transfer"):
        lines.append(
            f"Transfer matrix **stale: {stale}** — press **Compute transfer** to recompute "
            f"({view.recompute.get('transfer', 'time unknown')})."
        )
    if view.transfer is not None and view.unscored:
        shown = ", ".join(view.unscored[:3]) + (" ..." if len(view.unscored) > 3 else "")
        lines.append(
            f"No transfer column yet for {len(view.unscored)} expert{'s' if len(view.unscored) > 1 else ''} "
            f"added since ({shown}): press **Compute transfer** ({view.recompute.get('transfer', 'time unknown')})."
        )
    if spec not in view.routing:
        lines.append(f"No routing statistics for **{spec}** yet: press **Route the tasks**.")
    elif stale := view.stale.get(spec):
        lines.append(
            f"Routing statistics of **{spec}** **stale: {stale}** — press **Route the tasks** to recompute "
            f"({view.recompute.get(spec, 'time unknown')})."
        )
    return " ".join(lines)


@shows_errors
def show(worker: Worker, tab: InsightTab, folder: str, spec: str | None, tokens: str, layer: str | None) -> dict:
    """Draw what the library holds for the router `spec` (its stored statistics, if any)."""
    view = worker.insight(folder)
    choices = list(dict.fromkeys(list(view.routing) + view.routers))  # stored ones first
    if spec not in choices:
        spec = DEFAULT_ROUTER if DEFAULT_ROUTER in choices else (choices or [None])[0]
    stats = view.routing.get(spec)
    layers = [figs.ALL_LAYERS] + (stats[tokens]["layers"] if stats else [])
    layer = layer if layer in layers else figs.ALL_LAYERS
    out = {
        tab.router: gr.Dropdown(choices=choices, value=spec),
        tab.layer: gr.Dropdown(
            choices=[(figs.short_module(m), m) if m != figs.ALL_LAYERS else (m, m) for m in layers], value=layer
        ),
        tab.tasks: gr.Radio(value=view.task_set) if view.task_set else gr.update(),  # as the matrices show
        tab.notes: notes(view, spec),
        tab.matrices: gr.Column(visible=view.transfer is not None or stats is not None),
        tab.transfer_plot: figs.transfer_heatmap(view) if view.transfer is not None else None,
        tab.routing_plot: figs.routing_heatmap(view, spec, tokens, layer) if stats else None,
        tab.per_layer: gr.Column(visible=stats is not None),
    }
    if stats is not None:
        out |= {
            tab.accuracy_plot: figs.accuracy_by_layer(view, spec, tokens),
            tab.entropy_plot: figs.entropy_by_layer(view, spec, tokens),
            tab.summary: figs.verdict(view, spec, tokens) + "\n\n" + figs.summary_text(view, spec, tokens),
            tab.table: gr.Dataframe(
                figs.per_task_table(view, spec, tokens), visible=True, label=table_label(view.stale.get(spec))
            ),
        }
    else:
        out |= {
            tab.accuracy_plot: None,
            tab.entropy_plot: None,
            tab.summary: "",
            tab.table: gr.Dataframe(visible=False),
        }
    return out


@shows_errors
def compute_transfer(
    worker: Worker,
    tab: InsightTab,
    folder,
    tasks,
    limit,
    progress=gr.Progress(),  # noqa: B008 (Gradio fills it in)
    request: gr.Request | None = None,  # Gradio fills it in too: its session owns the job
):
    request = JobRequest("transfer", folder, {"tasks": tasks, "limit": int(limit)}, owner=session(request))
    for job_id, line in run_job(worker, request, progress):
        yield {tab.job: job_id, tab.status: line}


@shows_errors
def route_tasks(
    worker: Worker,
    tab: InsightTab,
    folder,
    spec,
    tasks,
    limit,
    progress=gr.Progress(),  # noqa: B008 (Gradio fills it in)
    request: gr.Request | None = None,  # Gradio fills it in too: its session owns the job
):
    if not spec:
        raise gr.Error("pick a router")
    options = {"router": spec, "tasks": tasks, "limit": int(limit)}
    request = JobRequest("routing", folder, options, owner=session(request))
    for job_id, line in run_job(worker, request, progress):
        yield {tab.job: job_id, tab.status: line}


def wire(tab: InsightTab, worker: Worker, path: gr.State):
    """This tab's events; returns `redraw(event)`, which shows the stored results after `event`."""
    inputs = [path, tab.router, tab.tokens, tab.layer]
    draw = partial(show, worker, tab)
    tab.download_btn.click(
        partial(download, worker),
        [path, tab.router, tab.tokens, tab.table],
        tab.download_file,
        api_name="download_insight",
    )

    def redraw(event):
        return event.then(draw, inputs, tab.shown(), api_visibility="private")

    tab.router.input(draw, inputs, tab.shown(), api_name="insight")
    tab.tokens.input(draw, inputs, tab.shown(), api_visibility="private")
    tab.layer.input(draw, inputs, tab.shown(), api_visibility="private")
    transferred = tab.transfer_btn.click(
        bind(compute_transfer, worker, tab),
        [path, tab.tasks, tab.limit],
        [tab.job, tab.status],
        api_name="transfer",
    )
    routed = tab.routing_btn.click(
        bind(route_tasks, worker, tab),
        [path, tab.router, tab.tasks, tab.limit],
        [tab.job, tab.status],
        api_name="routing_stats",
    )
    tab.cancel_btn.click(partial(cancel_job, worker), tab.job, tab.status, api_name="cancel_insight", queue=False)
    redraw(transferred)
    redraw(routed)
    return redraw
