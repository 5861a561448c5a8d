"""The Clusters tab's figures, from a `ClusterView`: the UMAP of the MBC embedding, the similarity
ordered by cluster (expert by expert, or cluster by cluster past `EXPERT_CELLS` experts) and the
silhouette by k. Pure functions of plain data.

A cluster's number means one group in every tab: MBC recomputed at some k is numbered after the
library's stored clustering (`numbered_as_stored`), whose "cluster3" the Library table shows."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import count

import numpy as np
import plotly.graph_objects as go
from scipy.optimize import linear_sum_assignment

from lorlib_ui.app.figures import INK, LAYOUT, NO_FAMILY, cluster_style, family_colours
from lorlib_ui.worker.api import ClusterView

WEBGL_POINTS = 200  # SVG scatter plots slow down past a few hundred points; WebGL draws thousands

EXPERT_CELLS = 80  # experts a similarity heatmap shows one by one; beyond, clusters (then drill down)

ALL_CLUSTERS = "all clusters"


def align_labels(labels: Sequence[int], reference: Sequence[int]) -> list[int]:
    """`labels` renumbered to agree with `reference` (-1: no cluster, in either): each cluster takes
    the number of the reference cluster it shares most experts with, by a maximum-weight matching
    on the overlap (the Hungarian method, Kuhn 1955), so that no two share a number. A cluster that
    overlaps none takes the smallest number the reference does not use."""
    new = sorted({label for label in labels if label >= 0})
    old = sorted({label for label in reference if label >= 0})
    overlap = np.zeros((len(new), len(old)))
    for label, ref in zip(labels, reference):
        if label >= 0 and ref >= 0:
            overlap[new.index(label), old.index(ref)] += 1
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    number = {new[r]: old[c] for r, c in zip(rows, cols) if overlap[r, c] > 0}
    free = (n for n in count() if n not in old)
    number |= {label: next(free) for label in new if label not in number}
    return [number[label] if label >= 0 else -1 for label in labels]


def numbered_as_stored(view: ClusterView, clusters: dict | None) -> tuple[ClusterView, str]:
    """The view with its clusters numbered as the library's stored clustering (`clusters`, the
    manifest's: "assignment" expert -> cluster expert "clusterN", and "k"), and a line that says so.
    At the stored k the stored clusters themselves (what the cluster experts learned); at another
    k, MBC's clusters numbered by `align_labels`. The experts are reordered by their new numbers."""
    stored = {}
    for name, cluster in ((clusters or {}).get("assignment") or {}).items():
        number = str(cluster).removeprefix("cluster")
        if number.isdigit():
            stored[name] = int(number)
    reference = [stored.get(name, -1) if label >= 0 else -1 for name, label in zip(view.names, view.labels)]
    if not any(ref >= 0 for ref in reference):
        return view, ""
    aligned = align_labels(view.labels, reference)
    stored_k, ari = clusters.get("k"), view.ari
    if view.k == stored_k and all(ref >= 0 for ref, label in zip(reference, view.labels) if label >= 0):
        note = f"k = {stored_k} shows the library's stored clustering: cluster N is the cluster expert clusterN."
        if aligned != reference:
            note += " (MBC recomputed now groups some experts differently; its adjusted Rand index is left out.)"
            ari = None
        aligned = reference
    else:
        note = (
            f"Clusters are numbered after the stored clustering (k = {stored_k}): each takes the number of the "
            "stored cluster it shares most experts with; a cluster like none of them, a new number."
        )
    label_of = dict(zip(view.names, aligned))
    position = {name: i for i, name in enumerate(view.clustered)}
    clustered = sorted(view.clustered, key=lambda name: (label_of[name], position[name]))
    order = [position[name] for name in clustered]
    similarity = np.asarray(view.similarity)[np.ix_(order, order)]
    return dataclasses.replace(view, labels=aligned, clustered=clustered, similarity=similarity, ari=ari), note


def cluster_scatter(
    view: ClusterView, colour_by: str = "cluster", families: Iterable[str | None] | None = None
) -> go.Figure:
    """The UMAP of the experts' MBC embedding, one point per expert (drawn with WebGL past
    WEBGL_POINTS experts): by cluster, each in its own colour and shape, none of them a family's
    colour; or by family, in the family's colour of every view (`family_colours` over `families`,
    the library's, or else the view's)."""
    by_cluster = colour_by == "cluster"
    groups = [f"cluster {c}" for c in view.labels] if by_cluster else [f or "-" for f in view.families]
    colours = family_colours(view.families if families is None else families)
    many = len(view.names) > WEBGL_POINTS
    trace = go.Scattergl if many else go.Scatter
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    fig = go.Figure()
    for group in sorted(members, key=lambda g: (len(g), g)):
        idx = members[group]
        fig.add_trace(
            trace(
                x=view.coords[idx, 0],
                y=view.coords[idx, 1],
                mode="markers",
                name=group,
                marker={
                    "size": 6 if many else 11,
                    "line": {"width": 0.5, "color": INK},
                    **(cluster_style(view.labels[idx[0]]) if by_cluster else {"color": colours.get(group, NO_FAMILY)}),
                },
                text=[view.names[i] for i in idx],
                customdata=[[", ".join(view.tasks[i]), view.families[i] or "-", view.labels[i]] for i in idx],
                hovertemplate="<b>%{text}</b><br>tasks: %{customdata[0]}<br>family: %{customdata[1]}"
                "<br>cluster: %{customdata[2]}<extra></extra>",
            )
        )
    fig.update_layout(title=f"Experts (UMAP of the MBC embedding), coloured by {colour_by}", height=480, **LAYOUT)
    fig.update_xaxes(showticklabels=False, title="UMAP 1")
    fig.update_yaxes(showticklabels=False, title="UMAP 2")
    return fig


def similarity_focus(view: ClusterView) -> list[str]:
    """What the similarity heatmap can show: every expert when they are few; otherwise the
    clusters, and each cluster's experts."""
    if len(view.clustered) <= EXPERT_CELLS:
        return [ALL_CLUSTERS]
    sizes = Counter(label for label in view.labels if label >= 0)
    return [ALL_CLUSTERS] + [f"cluster {c} ({sizes[c]} experts)" for c in sorted(sizes)]


def focus_info(view: ClusterView) -> str:
    """The "Similarity of" menu's note: what to pick, or why there is nothing to pick."""
    if len(similarity_focus(view)) > 1:
        return "with many experts, the clusters; pick one to see its experts"
    return f"nothing to pick: all {len(view.clustered)} experts fit one heatmap (up to {EXPERT_CELLS} do)"


def similarity_heatmap(view: ClusterView, focus: str = ALL_CLUSTERS) -> go.Figure:
    """Cosine similarity between the clustered experts, ordered by cluster: expert by expert when
    there are at most EXPERT_CELLS of them (or for the one cluster `focus` names), else cluster by
    cluster, as the mean cosine between their experts (a million cells say nothing on a screen)."""
    label_of = dict(zip(view.names, view.labels))
    labels = np.array([label_of[name] for name in view.clustered])
    similarity = np.asarray(view.similarity, dtype=float)
    if focus != ALL_CLUSTERS:
        chosen = np.flatnonzero(labels == int(focus.split()[1]))
        names = [view.clustered[i] for i in chosen]
        return _expert_heatmap(similarity[np.ix_(chosen, chosen)], names, f"{focus.split(' (')[0]}: ")
    if len(view.clustered) <= EXPERT_CELLS:
        return _expert_heatmap(similarity, view.clustered, "", labels)
    numbers = sorted(set(labels.tolist()))
    return _cluster_heatmap(similarity, np.searchsorted(numbers, labels), len(numbers), numbers)


def _expert_heatmap(similarity: np.ndarray, names: list[str], scope: str, labels=None) -> go.Figure:
    """The colours span the off-diagonal cells' range: the diagonal (each expert with itself, 1)
    is left blank, as it would otherwise stretch the scale and leave every other cell the same colour.
    With `labels` (each expert's cluster, in `names`' order), each cluster's block is outlined."""
    z = similarity.copy()
    np.fill_diagonal(z, np.nan)
    off = z[np.isfinite(z)]
    low, high = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    fig = go.Figure(_similarity_trace(z, names, "cosine", zmin=low, zmax=max(high, low + 1e-9)))
    n, labelled = len(names), len(names) <= 40  # a name per row while they fit
    fig.update_layout(
        title=f"{scope}expert similarity, ordered by cluster (cosine {low:.2f} to {high:.2f} off the diagonal)",
        height=max(520, 300 + 16 * n) if labelled else 520,
        **LAYOUT,
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(showticklabels=labelled, dtick=1)
    fig.update_yaxes(showticklabels=labelled, dtick=1)
    starts = [] if labels is None else [i for i in range(n) if i == 0 or labels[i] != labels[i - 1]]
    for start, stop in zip(starts, [*starts[1:], n]):
        for width, colour in ((3, "black"), (1.5, "white")):  # seen on the dark cells and on the light
            box = {"x0": start - 0.5, "x1": stop - 0.5, "y0": start - 0.5, "y1": stop - 0.5}
            fig.add_shape(type="rect", **box, line={"width": width, "color": colour}, name=f"cluster {labels[start]}")
    return fig


def _similarity_trace(z: np.ndarray, names: list[str], what: str, **scale) -> go.Heatmap:
    return go.Heatmap(
        z=z,
        x=names,
        y=names,
        colorscale="Viridis",
        hovertemplate=f"%{{x}}<br>%{{y}}<br>{what} %{{z:.3f}}<extra></extra>",
        colorbar={"title": what},
        **scale,
    )


def _cluster_heatmap(similarity: np.ndarray, labels: np.ndarray, k: int, numbers: list[int] | None = None) -> go.Figure:
    """Mean cosine between the experts of each pair of clusters (`labels`: 0 to k-1, the clusters
    numbered `numbers`, by default 0 to k-1); within a cluster, between its distinct experts (the
    diagonal of ones left out)."""
    onehot = np.eye(k)[labels]  # (experts, k)
    sizes = onehot.sum(axis=0)
    totals = onehot.T @ similarity @ onehot
    pairs = np.outer(sizes, sizes) - np.diag(sizes)  # distinct pairs: no expert with itself
    z = (totals - np.diag(np.diag(similarity) @ onehot)) / np.where(pairs > 0, pairs, np.nan)
    names = [f"cluster {c} ({int(sizes[i])})" for i, c in enumerate(range(k) if numbers is None else numbers)]
    fig = go.Figure(_similarity_trace(z, names, "mean cosine"))
    fig.update_layout(
        title=f"Mean similarity between clusters ({len(labels)} experts; pick a cluster to see its experts)",
        height=520,
        **LAYOUT,
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def silhouette_curve(view: ClusterView) -> go.Figure:
    ks = sorted(view.silhouette)
    fig = go.Figure(go.Scatter(x=ks, y=[view.silhouette[k] for k in ks], mode="lines+markers", name="silhouette"))
    if view.k in view.silhouette:
        chosen = go.Scatter(x=[view.k], y=[view.silhouette[view.k]], mode="markers", name=f"k = {view.k}")
        fig.add_trace(chosen.update(marker={"size": 14}))
    fig.update_layout(title="Silhouette by k (higher: better separated)", height=300, **LAYOUT)
    fig.update_xaxes(title="k", dtick=1)
    return fig
