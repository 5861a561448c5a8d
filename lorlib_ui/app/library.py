"""The Library tab: the experts of the open library, one expert up close (click its row, or pick
it), downloads, and import of PEFT adapters (zip, or the Hub) below.

The picked expert's view shows, per adapted layer, ‖ΔW‖ and the singular values of ΔW = s·B·A
(the spectrum whose top right singular vector is Arrow's prototype), its nearest experts by the
cosine of their MBC embeddings (the Clusters tab's), and its training loss curve."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from lorlib_ui.app import expert_figures
from lorlib_ui.app.events import bind, shows_errors
from lorlib_ui.worker.api import ExpertDetail, LibraryInfo, Worker

HELP = (
    "The experts of the open library. *private* experts learned one task each; *cluster* experts "
    "learned the tasks of one MBC cluster; the *shared* expert learned all tasks at once; *adapted* and "
    "*lorahub* experts learned a new task from a few of its examples (the Adapt tab)."
)
COLUMNS = ["name", "kind", "family", "cluster", "tasks", "rank", "targets", "steps", "final loss"]
LEARNED_COLUMNS = ["router", "method", "task", "shots", "experts mixed", "final loss"]
PICK_INFO = "or click its row: shown below, its weight update layer by layer, its nearest experts and training loss"
NEAREST_LABEL = "Nearest experts (cosine of their MBC embeddings)"
HUB_INFO = "owner/repo, owner/repo:subfolder (an adapter inside a repo), optionally @revision; one per line"
LOADING = "*Computing the expert's spectrum per layer and its nearest experts…*"
NO_CURVE_IMPORTED = "no loss curve recorded (an imported adapter, not trained here)"


@dataclass
class LibraryTab:
    table: gr.Dataframe
    learned: gr.Dataframe  # routers learned by `adapt` (poly:NAME), shown when there are any
    upload: gr.File
    import_btn: gr.Button
    hub_ids: gr.Textbox  # adapters on the Hugging Face Hub, by id
    hub_btn: gr.Button
    expert_pick: gr.Dropdown
    export_btn: gr.Button
    export_lib_btn: gr.Button
    remove_btn: gr.Button
    download: gr.File
    summary: gr.Markdown  # the picked expert: what it is, how it was trained, what is missing
    norms_plot: gr.Plot
    loss_plot: gr.Plot
    spectrum_plot: gr.Plot
    nearest: gr.Dataframe
    inspecting: gr.State  # whether the user has picked an expert to see: a reopened library shows it again

    def detail_outputs(self) -> list:
        return [self.summary, self.norms_plot, self.loss_plot, self.spectrum_plot, self.nearest]


def build_tab() -> LibraryTab:
    with gr.Tab("Library", id="library"):
        gr.Markdown(HELP)
        table = gr.Dataframe(  # short: the picked expert's view shows right below it
            interactive=False, wrap=True, max_height=360, label="Experts (click a row to see the expert)"
        )
        with gr.Row():
            expert_pick = gr.Dropdown([], label="Expert", allow_custom_value=False, info=PICK_INFO)
            export_btn = gr.Button("Download expert")
            export_lib_btn = gr.Button("Download library")
            remove_btn = gr.Button("Remove expert", variant="stop")
            download = gr.File(label="Download", interactive=False)
        # the expert view: nothing of it shows before an expert is picked
        summary = gr.Markdown(visible=False, elem_id="expert-summary")
        with gr.Row():
            norms_plot = gr.Plot(visible=False, show_label=False, elem_id="expert-norms")
            loss_plot = gr.Plot(visible=False, show_label=False, elem_id="expert-loss")
        with gr.Row():
            spectrum_plot = gr.Plot(visible=False, show_label=False, elem_id="expert-spectrum")
            nearest = gr.Dataframe(visible=False, interactive=False, label=NEAREST_LABEL, elem_id="expert-nearest")
        learned = gr.Dataframe(interactive=False, visible=False, label="Learned routers (route with poly:NAME)")
        with gr.Row():  # below the expert view: the tall upload box no longer pushes the view off the screen
            upload = gr.File(label="Import PEFT adapters (zip)", file_types=[".zip"], type="filepath")
            import_btn = gr.Button("Import")
            hub_ids = gr.Textbox(label="Import from the Hugging Face Hub", info=HUB_INFO, lines=2, max_lines=8)
            hub_btn = gr.Button("Import from the Hub")
        inspecting = gr.State(False)
    return LibraryTab(
        table,
        learned,
        upload,
        import_btn,
        hub_ids,
        hub_btn,
        expert_pick,
        export_btn,
        export_lib_btn,
        remove_btn,
        download,
        summary,
        norms_plot,
        loss_plot,
        spectrum_plot,
        nearest,
        inspecting,
    )


def experts_frame(info: LibraryInfo) -> pd.DataFrame:
    rows = []
    for e in info.experts:
        metrics = e.get("metrics") or {}
        rows.append(
            {
                "name": e["name"],
                "kind": e["kind"],
                "family": e.get("family") or "",
                "cluster": e.get("cluster") or "",
                "tasks": ", ".join(e.get("tasks") or []),
                "rank": e["rank"],
                "targets": ", ".join(e["target_modules"]),
                "steps": metrics.get("steps", ""),
                "final loss": round(metrics["final_loss"], 3) if "final_loss" in metrics else "",
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def learned_frame(info: LibraryInfo) -> pd.DataFrame:
    rows = [
        {
            "router": f"poly:{r['name']}",
            "method": r["method"],
            "task": r.get("task") or "",
            "shots": r.get("training", {}).get("shots", ""),
            "experts mixed": len(r["experts"]),
            "final loss": round(r["metrics"]["final_loss"], 3) if "final_loss" in r.get("metrics", {}) else "",
        }
        for r in info.learned_routers
    ]
    return pd.DataFrame(rows, columns=LEARNED_COLUMNS)


def opened(tab: LibraryTab, info: LibraryInfo) -> dict:
    """What this tab shows for a newly opened library."""
    names = [e["name"] for e in info.experts]
    return {
        tab.table: experts_frame(info),
        tab.learned: gr.Dataframe(learned_frame(info), visible=bool(info.learned_routers)),
        tab.expert_pick: gr.Dropdown(choices=names, value=names[0] if names else None),
    }


def describe(detail: ExpertDetail) -> str:
    """The expert view's heading: what the expert is, how it was trained, and what is not shown."""
    about = [f"{detail.kind} expert"]
    about += [f"family {detail.family}"] if detail.family else []
    about += [f"tasks: {', '.join(detail.tasks)}"] if detail.tasks else []
    ranks = sorted({len(values) for values in detail.singular_values})
    lines = [
        f"### {detail.name}",
        f"{'; '.join(about)}. Adapts {len(detail.modules)} linear layers at rank {'/'.join(map(str, ranks))}.",
    ]
    steps, final = detail.metrics.get("steps"), detail.metrics.get("final_loss")
    if steps:
        lines.append(f"Trained {steps} steps" + (f", final loss {final:.3f}." if final is not None else "."))
    if detail.loss_curve is None and not steps:  # trained here, with no curve kept: its steps say enough
        lines.append(NO_CURVE_IMPORTED)
    if detail.nearest_note:
        lines.append(detail.nearest_note)
    return "\n\n".join(lines)


@shows_errors
def expert_detail(worker: Worker, tab: LibraryTab, folder: str, name: str | None) -> dict:
    """One expert up close, from now on shown again when the library reopens; with no expert
    (an empty library) the view hides."""
    if not name:
        return {component: gr.update(value=None, visible=False) for component in tab.detail_outputs()}
    detail = worker.expert_detail(folder, name)
    nearest = pd.DataFrame(
        [(other, round(cosine, 3)) for other, cosine in detail.nearest], columns=["expert", "cosine"]
    )
    curve = detail.loss_curve
    return {
        tab.summary: gr.update(value=describe(detail), visible=True),
        tab.norms_plot: gr.update(value=expert_figures.delta_norms(name, detail.modules, detail.norms), visible=True),
        tab.loss_plot: gr.update(value=expert_figures.loss_curve(name, curve) if curve else None, visible=bool(curve)),
        tab.spectrum_plot: gr.update(
            value=expert_figures.singular_value_heatmap(name, detail.modules, detail.singular_values), visible=True
        ),
        tab.nearest: gr.update(value=nearest, visible=bool(detail.nearest)),
        tab.inspecting: True,
    }


def pick_row(tab: LibraryTab, event: gr.SelectData) -> dict:
    """A click on a row of the experts table picks that expert (the detail follows, `wire`)."""
    name = (event.row_value or [None])[0]
    if not name:
        return {tab.expert_pick: gr.update(), tab.summary: gr.update()}
    return {tab.expert_pick: gr.update(value=name), tab.summary: gr.update(value=LOADING, visible=True)}


def reshow(worker: Worker, tab: LibraryTab, folder: str, name: str | None, inspecting: bool) -> dict:
    """After the library (re)opens: the picked expert again (new neighbours, a new curve) if the
    view was showing one; else nothing, so that no plot appears before the user picks an expert."""
    if not inspecting:
        return {component: gr.update() for component in tab.detail_outputs()}
    return expert_detail(worker, tab, folder, name)


@shows_errors
def import_zip(worker: Worker, folder: str, archive: str | None) -> list[str]:
    """Import every adapter of an uploaded zip; the caller reopens the library to show them."""
    if not archive:
        raise gr.Error("choose a zip file of PEFT adapter folders first")
    names = worker.import_archive(folder, archive)
    gr.Info(f"imported {', '.join(names)}")
    return names


def hub_ids(text: str | None) -> list[str]:
    """The hub ids typed in the box: one per line, or separated by commas or spaces."""
    return [part for part in (text or "").replace(",", " ").split() if part]


@shows_errors
def import_hub(worker: Worker, folder: str, text: str | None) -> list[str]:
    """Import the adapters named by hub id (all checked before any is stored); the caller reopens
    the library to show them."""
    ids = hub_ids(text)
    if not ids:
        raise gr.Error("type one or more hub ids: owner/repo, owner/repo:subfolder, each optionally @revision")
    names = worker.import_hub(folder, ids)
    gr.Info(f"imported {', '.join(names)}")
    return names


@shows_errors
def remove(worker: Worker, folder: str, name: str | None) -> None:
    """Remove the picked expert from the library; the caller reopens the library."""
    if not name:
        raise gr.Error("pick an expert to remove")
    worker.remove_expert(folder, name)
    gr.Info(f"removed {name}")


@shows_errors
def export(worker: Worker, folder: str, expert: str | None = None) -> str:
    """A zip of one expert, or of the whole library (expert None), for download."""
    return worker.export(folder, expert)


def wire(tab: LibraryTab, worker: Worker, path: gr.State):
    """This tab's own events (the import is wired by the layout: it reopens the library); returns
    `redraw(event)`, which shows the picked expert again after `event` (opening or changing the
    library) if the user had picked one."""
    tab.export_btn.click(partial(export, worker), [path, tab.expert_pick], tab.download, api_name="export_expert")
    tab.export_lib_btn.click(partial(export, worker), path, tab.download, api_name="export_library")
    inputs, outputs = [path, tab.expert_pick], [*tab.detail_outputs(), tab.inspecting]
    # select: once per pick, the same expert again included (input fires twice per pick in Gradio 6)
    loading = gr.update(value=LOADING, visible=True)  # the figures take seconds: say so at once
    tab.expert_pick.select(lambda: loading, None, tab.summary, queue=False, api_visibility="private").then(
        partial(expert_detail, worker, tab), inputs, outputs, api_name="expert_detail"
    )
    picked = tab.table.select(
        bind(pick_row, tab), None, [tab.expert_pick, tab.summary], queue=False, api_visibility="private"
    )
    picked.then(partial(expert_detail, worker, tab), inputs, outputs, api_visibility="private")

    def redraw(event):
        again = partial(reshow, worker, tab)
        return event.success(again, [*inputs, tab.inspecting], outputs, api_visibility="private")

    return redraw
