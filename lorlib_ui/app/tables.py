"""Downloads of the tables a tab shows, as CSV: what is on screen, in a file for a notebook."""

from __future__ import annotations

import re
import tempfile
import zipfile
from pathlib import Path

import gradio as gr
import pandas as pd

from lorlib_ui.app.events import shows_errors


def frame(value) -> pd.DataFrame | None:
    """A shown table as pandas (Gradio hands a Dataframe's value over as one), or None if empty."""
    if isinstance(value, pd.DataFrame):
        return None if value.empty else value
    if isinstance(value, dict) and value.get("data"):
        return pd.DataFrame(value["data"], columns=value.get("headers"))
    return None


def write_csv(frames: dict[str, pd.DataFrame], name: str) -> str:
    """One CSV, or a zip of several, in a fresh temporary folder; returns its path."""
    folder = Path(tempfile.mkdtemp(prefix="lorlib-tables-"))
    if len(frames) == 1:
        ((title, frame),) = frames.items()
        path = folder / f"{title}.csv"
        frame.to_csv(path, index=False)
        return str(path)
    path = folder / f"{name}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for title, frame in frames.items():
            zf.writestr(f"{title}.csv", frame.to_csv(index=False))
    return str(path)


def csv_download(tables: dict[str, gr.Dataframe], name: str, api_name: str) -> None:
    """A "Download (CSV)" button under the tables (one file per table, zipped if several), wired here."""
    button = gr.Button("Download the tables (CSV)", size="sm")
    out = gr.File(label="Tables", interactive=False, visible=False)
    titles = list(tables)

    @shows_errors
    def download(*values):
        frames = {t: f for t, v in zip(titles, values) if (f := frame(v)) is not None}
        if not frames:
            raise gr.Error("nothing to download yet: the tables are empty")
        return gr.update(value=write_csv(frames, name), visible=True)

    button.click(download, list(tables.values()), out, api_name=api_name)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "table"
