"""The Route tab's figures, from a `RoutingRecord` and the experts to show (`shown_experts`: those
the router could use): routing per layer, per token, one token's expert logits, the difference of
two routers, and the coloured text (the (token, label) pairs Gradio's HighlightedText shows).
Pure functions of plain data (no model, no torch), tested without a UI."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import plotly.graph_objects as go

from lorlib_ui.app.figures import LAYOUT, colour_of, short_module
from lorlib_ui.core.record import RoutingRecord

CHOSEN, OTHER = "#f58518", "#bab0ac"  # the bars of the experts a token was routed to, and the rest


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
