"""The Clusters tab's figures, from a `ClusterView`: the UMAP of the MBC embedding, the similarity
ordered by cluster (expert by expert, or cluster by cluster past `EXPERT_CELLS` experts) and the
silhouette by k. Pure functions of plain data."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from lorlib_ui.app.figures import LAYOUT
from lorlib_ui.worker.api import ClusterView

WEBGL_POINTS = 200  # SVG scatter plots slow down past a few hundred points; WebGL draws thousands

EXPERT_CELLS = 80  # experts a similarity heatmap shows one by one; beyond, clusters (then drill down)

ALL_CLUSTERS = "all clusters"


def cluster_scatter(view: ClusterView, colour_by: str = "cluster") -> go.Figure:
    """The UMAP of the experts' MBC embedding, one point per expert, coloured by cluster or family
    (drawn with WebGL past WEBGL_POINTS experts)."""
    groups = [f"cluster {c}" for c in view.labels] if colour_by == "cluster" else [f or "-" for f in view.families]
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
                marker={"size": 6 if many else 11},
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
    sizes = np.bincount([label for label in view.labels if label >= 0], minlength=view.k)
    return [ALL_CLUSTERS] + [f"cluster {c} ({sizes[c]} experts)" for c in range(view.k)]


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
        return _expert_heatmap(similarity, view.clustered, "")
    return _cluster_heatmap(similarity, labels, view.k)


def _expert_heatmap(similarity: np.ndarray, names: list[str], scope: str) -> go.Figure:
    """The colours span the off-diagonal cells' range: the diagonal (each expert with itself, 1)
    is left blank, as it would otherwise stretch the scale and leave every other cell the same colour."""
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


def _cluster_heatmap(similarity: np.ndarray, labels: np.ndarray, k: int) -> go.Figure:
    """Mean cosine between the experts of each pair of clusters; within a cluster, between its
    distinct experts (the diagonal of ones left out)."""
    onehot = np.eye(k)[labels]  # (experts, k)
    sizes = onehot.sum(axis=0)
    totals = onehot.T @ similarity @ onehot
    pairs = np.outer(sizes, sizes) - np.diag(sizes)  # distinct pairs: no expert with itself
    z = (totals - np.diag(np.diag(similarity) @ onehot)) / np.where(pairs > 0, pairs, np.nan)
    names = [f"cluster {c} ({int(sizes[c])})" for c in range(k)]
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
