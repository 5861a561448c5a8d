"""The Clusters tab: MBC over the library's task experts, on a UMAP of their weights."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from lorlib_ui.app import cluster_figures
from lorlib_ui.app.events import shows_errors
from lorlib_ui.worker.api import LibraryInfo, Worker

HELP = (
    "Each point is an expert, placed by UMAP so that experts with similar weights sit close. "
    "MBC groups experts by the cosine similarity of their weights; move k to regroup them. The silhouette "
    "curve suggests a k; the adjusted Rand index says how well clusters match the known task families."
)


@dataclass
class ClustersTab:
    k: gr.Slider
    colour: gr.Radio
    ari: gr.Markdown
    scatter: gr.Plot
    focus: gr.Dropdown
    similarity: gr.Plot
    silhouette: gr.Plot

    def outputs(self) -> list:
        return [self.scatter, self.focus, self.similarity, self.silhouette, self.ari]


def build_tab() -> ClustersTab:
    with gr.Tab("Clusters", id="clusters"):
        gr.Markdown(HELP)
        with gr.Row():
            k = gr.Slider(1, 16, value=4, step=1, label="k (number of clusters)")
            colour = gr.Radio(["cluster", "family"], value="cluster", label="Colour by")
        ari = gr.Markdown()
        scatter = gr.Plot(label="UMAP of experts", show_label=False, elem_id="cluster-umap")
        with gr.Row():
            with gr.Column():
                focus = gr.Dropdown(
                    [cluster_figures.ALL_CLUSTERS],
                    value=cluster_figures.ALL_CLUSTERS,
                    label="Similarity of",
                    info="with many experts, the clusters; pick one to see its experts",
                    elem_id="cluster-focus",
                )
                similarity = gr.Plot(label="Similarity", show_label=False, elem_id="cluster-similarity")
            silhouette = gr.Plot(label="Silhouette", show_label=False)
    return ClustersTab(k, colour, ari, scatter, focus, similarity, silhouette)


def opened(tab: ClustersTab, info: LibraryInfo) -> dict:
    """The k slider fits the library's task experts; it starts at the number of held-out families."""
    n_task = sum(e["kind"] in ("private", "imported") for e in info.experts)
    # a slider needs max > min: with fewer than 2 experts, the worker explains the refusal
    k = min(max(len(info.held_out), 2), max(n_task, 1))
    return {tab.k: gr.Slider(1, max(n_task, 2), value=k, step=1)}


@shows_errors
def clusters(worker: Worker, tab: ClustersTab, folder: str, k: int, colour_by: str, focus: str | None) -> dict:
    """The view at k, its clusters numbered as the library's stored clustering (as the Library
    table shows it); the similarity heatmap keeps the cluster it showed while that cluster still
    exists (a new k regroups the experts, so it may then show all of them again)."""
    view = worker.clusters(folder, int(k))
    info = worker.library(folder)
    view, numbering = cluster_figures.numbered_as_stored(view, info.clusters)
    note = "" if view.ari is None else f"Adjusted Rand index against the task families: **{view.ari:.2f}**"
    note = "\n\n".join(line for line in (note, numbering) if line)
    choices = cluster_figures.similarity_focus(view)
    focus = focus if focus in choices else cluster_figures.ALL_CLUSTERS
    families = [e.get("family") for e in info.experts]  # the library's: a family's colour in every view
    return {
        tab.scatter: cluster_figures.cluster_scatter(view, colour_by, families),
        tab.focus: gr.Dropdown(
            choices, value=focus, interactive=len(choices) > 1, info=cluster_figures.focus_info(view)
        ),
        tab.similarity: cluster_figures.similarity_heatmap(view, focus),
        tab.silhouette: cluster_figures.silhouette_curve(view),
        tab.ari: note,
    }


def wire(tab: ClustersTab, worker: Worker, path: gr.State):
    """This tab's events; returns `redraw(event)`, which redraws the view after `event` (opening
    or changing the library) has drawn the rest."""
    handler, inputs = partial(clusters, worker, tab), [path, tab.k, tab.colour, tab.focus]
    # Any change of k: a drag, a number typed into the box (clamped when it leaves), a new library.
    tab.k.change(handler, inputs, tab.outputs(), api_name="clusters", trigger_mode="always_last")
    tab.colour.input(handler, inputs, tab.outputs(), api_visibility="private")
    tab.focus.input(handler, inputs, tab.outputs(), api_visibility="private")

    def redraw(event):
        # k may not have changed; when it did, the worker computes the embedding only once
        return event.success(handler, inputs, tab.outputs(), api_visibility="private")

    return redraw
