"""Figures of the explorer, built by pure functions from plain data (no model, no torch).

Routing figures take a `RoutingRecord` and the experts to show (`shown_experts`: those the
router could use); cluster figures a `ClusterView`; the evaluation chart the summary rows that
`evaluate` stores. Each returns a plotly figure (or, for the coloured text, the (token, label)
pairs that Gradio's HighlightedText shows), so they are tested without a UI.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import plotly.graph_objects as go

from lorlib_ui.core.record import RoutingRecord
from lorlib_ui.worker.api import ClusterView

PALETTE = [
    "#4c78a8",
    "#f58518",
    "#54a24b",
    "#e45756",
    "#72b7b2",
    "#eeca3b",
    "#b279a2",
    "#ff9da6",
    "#9d755d",
    "#bab0ac",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
LAYOUT = {"margin": {"l": 10, "r": 10, "t": 40, "b": 10}, "template": "plotly_white"}
CHOSEN, OTHER = "#f58518", "#bab0ac"  # the bars of the experts a token was routed to, and the rest


def short_module(name: str) -> str:
    """model.layers.12.self_attn.q_proj -> L12 q_proj"""
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    return f"L{layer} {parts[-1]}" if layer is not None else parts[-1]


def colour_of(names: list[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def shown_experts(record: RoutingRecord, members: Collection[str] | None = None) -> list[str]:
    """The experts a figure of `record` shows: those the router could use. An expert is shown if it
    got weight somewhere or the router scored it somewhere (a finite logit), and, where the router
    was limited to a group (`members`, e.g. the private experts of `arrow@private`), if it is in
    the group: Arrow scores every expert, in the group or not. Where none qualifies (the base
    router uses no expert), the group, or else every expert, so that a figure is never empty."""
    used = (record.weights != 0).any(axis=(0, 1)) | np.isfinite(record.logits).any(axis=(0, 1))
    allowed = [members is None or name in members for name in record.experts]
    shown = [name for name, u, a in zip(record.experts, used, allowed) if u and a]
    return shown or [name for name, a in zip(record.experts, allowed) if a] or list(record.experts)


def _columns(record: RoutingRecord, shown: list[str] | None) -> tuple[list[str], list[int]]:
    names = shown_experts(record) if shown is None else shown
    return names, [record.experts.index(name) for name in names]


def layer_heatmap(record: RoutingRecord, shown: list[str] | None = None) -> go.Figure:
    """Layers x experts: each expert's mean routing weight over all tokens at each LoRA'd layer."""
    names, columns = _columns(record, shown)
    z = record.layer_expert_weights()[:, columns]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=[short_module(m) for m in record.modules],
            colorscale="Blues",
            zmin=0,
            zmax=max(float(z.max(initial=0.0)), 1e-9),
            hovertemplate="%{y}<br>%{x}<br>mean weight %{z:.3f}<extra></extra>",
            colorbar={"title": "weight"},
        )
    )
    fig.update_layout(title=f"Routing per layer ({record.router})", height=max(320, 14 * len(record.modules)), **LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def difference_heatmap(a: RoutingRecord, b: RoutingRecord, shown: list[str] | None = None) -> go.Figure:
    """Layers x experts: router A's mean weight minus router B's, on a diverging scale centred on 0
    (red: A gives the expert more weight; blue: B does), over the experts either router shows."""
    if a.modules != b.modules or a.experts != b.experts:
        raise ValueError("the two records are not over the same layers and experts")
    if shown is None:
        either = set(shown_experts(a)) | set(shown_experts(b))
        shown = [name for name in a.experts if name in either]
    names, columns = _columns(a, shown)
    z = (a.layer_expert_weights() - b.layer_expert_weights())[:, columns]
    reach = max(float(np.abs(z).max(initial=0.0)), 1e-9)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=[short_module(m) for m in a.modules],
            colorscale="RdBu_r",
            zmid=0,
            zmin=-reach,
            zmax=reach,
            hovertemplate="%{y}<br>%{x}<br>A − B %{z:+.3f}<extra></extra>",
            colorbar={"title": "A − B"},
        )
    )
    fig.update_layout(
        title=f"Mean weight, A − B: {a.router} minus {b.router}", height=max(320, 14 * len(a.modules)), **LAYOUT
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def token_heatmap(record: RoutingRecord, module: str, shown: list[str] | None = None) -> go.Figure:
    """Tokens x experts at one layer: each token's routing weights."""
    m = record.modules.index(module)
    names, columns = _columns(record, shown)
    labels = token_labels(record)
    fig = go.Figure(
        go.Heatmap(
            z=record.weights[m][:, columns],
            x=names,
            y=labels,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            hovertemplate="%{y}<br>%{x}<br>weight %{z:.3f}<extra></extra>",
            colorbar={"title": "weight"},
        )
    )
    fig.update_layout(title=f"Tokens at {short_module(module)}", height=max(320, 16 * len(labels)), **LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def token_labels(record: RoutingRecord) -> list[str]:
    """'3: ' cat'': each routed token with its position, as the heatmap rows and token menu name it."""
    return [f"{i}: {t!r}" for i, t in enumerate(record.tokens)]


def expert_logits(record: RoutingRecord, module: str, token: int, shown: list[str] | None = None) -> go.Figure:
    """Why these experts: every shown expert's routing logit for one token at one layer (for Arrow,
    |h·v_e|), tallest first, with the experts the token was routed to in their own colour and
    labelled with their weights. A router that scores nothing (a static merge: logits all NaN) is
    drawn by its weights instead, and the title says so."""
    m = record.modules.index(module)
    names, columns = _columns(record, shown)
    logits, weights = record.logits[m, token, columns], record.weights[m, token, columns]
    scored = bool(np.isfinite(logits).any())
    values = logits if scored else weights
    order = sorted(range(len(names)), key=lambda i: -values[i] if np.isfinite(values[i]) else np.inf)
    chosen = [i for i in order if weights[i] > 0]
    others = [i for i in order if weights[i] <= 0]
    fig = go.Figure()
    for idx, label, colour in ((others, "not chosen", OTHER), (chosen, f"chosen ({len(chosen)})", CHOSEN)):
        fig.add_trace(
            go.Bar(
                x=[names[i] for i in idx],
                y=values[idx],
                name=label,
                marker_color=colour,
                text=[f"w {weights[i]:.2f}" if weights[i] > 0 else "" for i in idx],
                textposition="outside",
                customdata=weights[idx],
                hovertemplate="%{x}<br>%{y:.3f}<br>weight %{customdata:.3f}<extra></extra>",
            )
        )
    where = f"token {token_labels(record)[token]} at {short_module(module)}"
    if scored:
        title = f"Routing logits of {where}"
    else:
        title = f"{record.router} computes no routing logits: its weights for {where}"
    fig.update_layout(title=title, barmode="overlay", height=360, **LAYOUT)
    fig.update_xaxes(categoryorder="array", categoryarray=[names[i] for i in order])
    fig.update_yaxes(title="routing logit (Arrow: |h·v|)" if scored else "weight")
    return fig


def token_colours(record: RoutingRecord, module: str) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """(token, its top expert at `module`) for each token, None where no expert is used; and the
    colour of each expert that tops some token (only those: a legend of every expert in a library
    of hundreds says nothing). An expert keeps its colour across layers and prompts."""
    m = record.modules.index(module)
    top = record.top_expert()[:, m]
    pairs = [(token, record.experts[i] if i >= 0 else None) for token, i in zip(record.tokens, top)]
    used = {expert for _, expert in pairs if expert}
    return pairs, {e: c for e, c in colour_of(record.experts).items() if e in used}


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


def evaluation_bars(summary: list[dict], title: str = "Zero-shot, mean over tasks (%), 95% intervals") -> go.Figure:
    """One group of bars per measure, one bar per router, with its 95% bootstrap interval where
    the evaluation kept its rows."""
    measures = [("exact_match", "exact match"), ("mc_accuracy", "multiple choice")]
    fig = go.Figure()
    for i, row in enumerate(summary):
        values = [np.nan if row[key] is None else 100 * row[key] for key, _ in measures]
        colour = PALETTE[i % len(PALETTE)]
        bar = go.Bar(x=[label for _, label in measures], y=values, name=row["router"], marker_color=colour)
        intervals = [row.get(f"{key}_ci") for key, _ in measures]
        if any(intervals):
            plus = [np.nan if ci is None else 100 * ci[1] - v for ci, v in zip(intervals, values)]
            minus = [np.nan if ci is None else v - 100 * ci[0] for ci, v in zip(intervals, values)]
            bar.update(error_y={"type": "data", "array": plus, "arrayminus": minus, "visible": True})
        fig.add_trace(bar)
    fig.update_layout(title=title, barmode="group", height=360, **LAYOUT)
    return fig


def per_task_bars(scores: list[dict], routers: list[str], measure: str = "exact_match") -> go.Figure:
    """The evaluation task by task: one group of bars per task, one bar per router."""
    tasks = list(dict.fromkeys(s["task"] for s in scores))
    by = {(s["router"], s["task"]): s[measure] for s in scores}
    scale = 100 if measure != "loglik" else 1
    fig = go.Figure()
    for i, router in enumerate(routers):
        values = [np.nan if by.get((router, t)) is None else scale * by[router, t] for t in tasks]
        fig.add_trace(go.Bar(x=tasks, y=values, name=router, marker_color=PALETTE[i % len(PALETTE)]))
    label = {"exact_match": "exact match (%)", "loglik": "answer log-likelihood", "mc_accuracy": "multiple choice (%)"}
    fig.update_layout(title=f"Per task: {label[measure]}", barmode="group", height=380, **LAYOUT)
    fig.update_xaxes(tickangle=30)
    return fig


# ---- one expert (the Library tab): its ΔW = s·B·A layer by layer, and its training ----------------


def _layers_and_kinds(modules: list[str]) -> tuple[list[int], list[str]] | None:
    """model.layers.12.self_attn.q_proj -> layer 12, kind q_proj, for every module; None unless
    each module sits in a numbered layer and no two share a (layer, kind)."""
    layers, kinds = [], []
    for module in modules:
        parts = module.split(".")
        layers.append(next((int(p) for p in parts if p.isdigit()), None))
        kinds.append(parts[-1])
    if None in layers or len(set(zip(layers, kinds))) < len(modules):
        return None
    return layers, kinds


def delta_norms(expert: str, modules: list[str], norms: list[float]) -> go.Figure:
    """‖ΔW‖_F at each adapted layer, one line per kind of module (q_proj, v_proj, ...); x is the
    layer number (or, for modules outside numbered layers, the module's position)."""
    placed = _layers_and_kinds(modules)
    layers, kinds = placed or (list(range(len(modules))), ["module"] * len(modules))
    fig = go.Figure()
    for i, kind in enumerate(dict.fromkeys(kinds)):
        idx = [j for j, k in enumerate(kinds) if k == kind]
        fig.add_trace(
            go.Scatter(
                x=[layers[j] for j in idx],
                y=[norms[j] for j in idx],
                mode="lines+markers",
                name=kind,
                marker_color=PALETTE[i % len(PALETTE)],
                text=[short_module(modules[j]) for j in idx],
                hovertemplate="%{text}<br>‖ΔW‖ %{y:.4f}<extra></extra>",
            )
        )
    fig.update_layout(title=f"‖ΔW‖ per layer ({expert})", height=340, **LAYOUT)
    fig.update_xaxes(title="layer" if placed else "module")
    fig.update_yaxes(title="Frobenius norm", rangemode="tozero")
    return fig


def singular_value_heatmap(expert: str, modules: list[str], singular_values: list[list[float]]) -> go.Figure:
    """The singular values of each ΔW: one column per layer (as in `delta_norms`), one row per kind
    of module and singular-value index (q_proj σ1, q_proj σ2, ...). A layer the expert does not
    adapt, or adapts at a lower rank, leaves blank cells."""
    placed = _layers_and_kinds(modules)
    layers, kinds = placed or (list(range(len(modules))), ["module"] * len(modules))
    columns, kinds_seen = sorted(set(layers)), list(dict.fromkeys(kinds))
    width = max((len(v) for v in singular_values), default=0)
    z = np.full((len(kinds_seen) * width, len(columns)), np.nan)
    for layer, kind, values in zip(layers, kinds, singular_values):
        top = kinds_seen.index(kind) * width
        z[top : top + len(values), columns.index(layer)] = values
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=columns,
            y=[f"{kind} σ{i + 1}" for kind in kinds_seen for i in range(width)],
            colorscale="Viridis",
            zmin=0,
            hovertemplate="layer %{x}<br>%{y} = %{z:.4f}<extra></extra>",
            colorbar={"title": "σ"},
        )
    )
    fig.update_layout(title=f"Singular values of ΔW ({expert})", height=max(300, 120 + 20 * len(z)), **LAYOUT)
    fig.update_xaxes(title="layer" if placed else "module")
    fig.update_yaxes(autorange="reversed", dtick=1)
    return fig


def loss_curve(expert: str, losses: list[float]) -> go.Figure:
    """The training loss at each optimizer step (answer tokens only), as recorded at build time."""
    steps = list(range(1, len(losses) + 1))
    fig = go.Figure(go.Scatter(x=steps, y=losses, mode="lines", name="loss"))
    fig.update_layout(title=f"Training loss ({expert})", height=340, **LAYOUT)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss")
    return fig


def loss_curves(curves: dict[str, list[float]], title: str = "Training loss by method") -> go.Figure:
    """Each method's loss at every step so far (LoraHub: the best objective after each evaluation
    of its search), one line per method, in the order they trained."""
    fig = go.Figure()
    for i, (name, losses) in enumerate(curves.items()):
        line = go.Scatter(x=list(range(1, len(losses) + 1)), y=losses, mode="lines", name=name)
        fig.add_trace(line.update(line={"color": PALETTE[i % len(PALETTE)]}))
    fig.update_layout(title=title, height=340, **LAYOUT)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="answer loss")
    return fig
