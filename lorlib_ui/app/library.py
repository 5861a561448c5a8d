"""The Library tab: the experts of the open library, import of PEFT adapters (zip), downloads."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from lorlib_ui.app.events import shows_errors
from lorlib_ui.worker.api import LibraryInfo, Worker

HELP = (
    "The experts of the open library. *private* experts learned one task each; *cluster* experts "
    "learned the tasks of one MBC cluster; the *shared* expert learned all tasks at once."
)
COLUMNS = ["name", "kind", "family", "cluster", "tasks", "rank", "targets", "steps", "final loss"]


@dataclass
class LibraryTab:
    table: gr.Dataframe
    upload: gr.File
    import_btn: gr.Button
    expert_pick: gr.Dropdown
    export_btn: gr.Button
    export_lib_btn: gr.Button
    download: gr.File


def build_tab() -> LibraryTab:
    with gr.Tab("Library", id="library"):
        gr.Markdown(HELP)
        table = gr.Dataframe(interactive=False, wrap=True, label="Experts")
        with gr.Row():
            upload = gr.File(label="Import PEFT adapters (zip)", file_types=[".zip"], type="filepath")
            import_btn = gr.Button("Import")
        with gr.Row():
            expert_pick = gr.Dropdown([], label="Expert", allow_custom_value=False)
            export_btn = gr.Button("Download expert")
            export_lib_btn = gr.Button("Download library")
            download = gr.File(label="Download", interactive=False)
    return LibraryTab(table, upload, import_btn, expert_pick, export_btn, export_lib_btn, download)


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


def opened(tab: LibraryTab, info: LibraryInfo) -> dict:
    """What this tab shows for a newly opened library."""
    names = [e["name"] for e in info.experts]
    return {
        tab.table: experts_frame(info),
        tab.expert_pick: gr.Dropdown(choices=names, value=names[0] if names else None),
    }


@shows_errors
def import_zip(worker: Worker, folder: str, archive: str | None) -> list[str]:
    """Import every adapter of an uploaded zip; the caller reopens the library to show them."""
    if not archive:
        raise gr.Error("choose a zip file of PEFT adapter folders first")
    names = worker.import_archive(folder, archive)
    gr.Info(f"imported {', '.join(names)}")
    return names


@shows_errors
def export(worker: Worker, folder: str, expert: str | None = None) -> str:
    """A zip of one expert, or of the whole library (expert None), for download."""
    return worker.export(folder, expert)


def wire(tab: LibraryTab, worker: Worker, path: gr.State) -> None:
    """This tab's own events (the import is wired by the layout: it reopens the library)."""
    tab.export_btn.click(partial(export, worker), [path, tab.expert_pick], tab.download, api_name="export_expert")
    tab.export_lib_btn.click(partial(export, worker), path, tab.download, api_name="export_library")
