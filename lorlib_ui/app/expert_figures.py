"""The Library tab's view of one expert: ‖ΔW‖ per layer, the singular values of ΔW = s·B·A
layer by layer, and its training loss. Pure functions of plain data."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from lorlib_ui.app.figures import LAYOUT, PALETTE, short_module


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
