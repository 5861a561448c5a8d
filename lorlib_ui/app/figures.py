"""What every figure of the explorer shares: the palette, the layout, how an expert gets its
colour and how a module's name is shortened. The figures themselves live beside their tabs:
`routing_figures`, `cluster_figures`, `expert_figures`, `evaluation_figures`, `insight_figures`."""

from __future__ import annotations

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


def short_module(name: str) -> str:
    """model.layers.12.self_attn.q_proj -> L12 q_proj"""
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    return f"L{layer} {parts[-1]}" if layer is not None else parts[-1]


def colour_of(names: list[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
