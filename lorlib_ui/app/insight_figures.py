"""Figures that judge routing, from an `InsightView` (plain data: no model, no torch).

The transfer matrix and a router's routing matrix are drawn tasks down and experts across, in the
view's one order for both (tasks by family, experts by MBC cluster), so a column of the one lines
up with the same column of the other: where routing mass sits against where the gain over the
base model is. Transfer is coloured on a diverging scale centred on "no gain"; routing mass on a
sequential scale from 0.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lorlib_ui.app.figures import LAYOUT, short_module
from lorlib_ui.worker.api import InsightView

ALL_LAYERS = "all layers"


LABEL = 26  # characters of an expert's name on an axis; the whole name is in the hover


def _height(rows: int) -> int:
    return max(480, 260 + 22 * rows)  # room below for the experts' names, written at an angle


def _short(name: str) -> str:
    return name if len(name) <= LABEL else name[: LABEL - 1] + "…"


def _cell(x) -> float:
    return np.nan if x is None else float(x)


def _reordered(values: list[list], rows: list[str], cols: list[str], want_rows: list[str], want_cols: list[str]):
    """values (rows x cols) in the view's order (want_rows x want_cols); NaN where absent."""
    out = np.full((len(want_rows), len(want_cols)), np.nan)
    r = {name: i for i, name in enumerate(rows)}
    c = {name: j for j, name in enumerate(cols)}
    for i, task in enumerate(want_rows):
        for j, expert in enumerate(want_cols):
            if task in r and expert in c:
                out[i, j] = _cell(values[r[task]][c[expert]])
    return out


def _labels(view: InsightView) -> list[str]:
    """Axis labels: the name, shortened (two long names may shorten alike: the index keeps them apart)."""
    return [f"{_short(e)} ·{i}" if _short(e) != e else e for i, e in enumerate(view.experts)]


def _hover(view: InsightView) -> np.ndarray:
    return np.array([f"{e} ({g})" for e, g in zip(view.experts, view.groups)])


def transfer_heatmap(view: InsightView) -> go.Figure:
    """Each expert alone: its gain in answer log-likelihood over the base model, per task."""
    t = view.transfer
    gain = _reordered(t["gain"], t["tasks"], t["columns"], view.tasks, view.experts)
    loglik = _reordered(t["loglik"], t["tasks"], t["columns"], view.tasks, view.experts)
    base = _reordered(t["loglik"], t["tasks"], t["columns"], view.tasks, ["base"])[:, 0]
    limit = float(np.nanmax(np.abs(gain))) if np.isfinite(gain).any() else 1.0
    names = np.broadcast_to(_hover(view), gain.shape)
    custom = np.dstack([loglik, np.repeat(base[:, None], len(view.experts), axis=1)]).astype(object)
    custom = np.dstack([custom, names])
    fig = go.Figure(
        go.Heatmap(
            z=gain,
            x=_labels(view),
            y=view.tasks,
            customdata=custom,
            colorscale="RdBu",
            zmid=0,
            zmin=-limit,
            zmax=limit,
            colorbar={"title": "gain"},
            hovertemplate="task %{y}<br>expert %{customdata[2]}<br>gain over base %{z:+.3f}"
            "<br>log-lik. %{customdata[0]:.3f} (base %{customdata[1]:.3f})<extra></extra>",
        )
    )
    fig.update_layout(title="Transfer: each expert alone, gain over base (blue helps)", height=_height(len(view.tasks)))
    fig.update_layout(**LAYOUT)
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_xaxes(showticklabels=len(view.experts) <= 60, tickangle=60)
    return fig


def routing_matrix(view: InsightView, spec: str, tokens: str = "content", layer: str = ALL_LAYERS) -> np.ndarray:
    """(tasks, experts) mean routing weight in the view's order; NaN for experts the router cannot use."""
    stats = view.routing[spec][tokens]
    if layer == ALL_LAYERS:
        values = stats["mass"]
    else:
        at = stats["layers"].index(layer)
        values = [per_layer[at] for per_layer in stats["mass_by_layer"]]
    return _reordered(values, stats["tasks"], stats["experts"], view.tasks, view.experts)


def routing_heatmap(view: InsightView, spec: str, tokens: str = "content", layer: str = ALL_LAYERS) -> go.Figure:
    mass = routing_matrix(view, spec, tokens, layer)
    where = "over all layers" if layer == ALL_LAYERS else f"at {short_module(layer)}"
    fig = go.Figure(
        go.Heatmap(
            z=mass,
            x=_labels(view),
            y=view.tasks,
            colorscale="Viridis",
            zmin=0,
            colorbar={"title": "weight"},
            customdata=np.broadcast_to(_hover(view), mass.shape),
            hovertemplate="task %{y}<br>expert %{customdata}<br>mean routing weight %{z:.3f}<extra></extra>",
        )
    )
    what = "content tokens" if tokens == "content" else "all prompt tokens"
    fig.update_layout(title=f"Routing: {spec}, mean weight {where} ({what})", height=_height(len(view.tasks)))
    fig.update_layout(**LAYOUT)
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_xaxes(showticklabels=len(view.experts) <= 60, tickangle=60)
    return fig


def accuracy_by_layer(view: InsightView, spec: str, tokens: str = "content") -> go.Figure:
    """How often the top-1 expert is the task's own, or of its family, per layer, beside chance."""
    by = view.routing[spec][tokens]["by_layer"]
    layers = [short_module(m) for m in view.routing[spec][tokens]["layers"]]
    fig = go.Figure()
    for key, name, dash in (
        ("own_accuracy", "own expert", None),
        ("own_chance", "own: chance", "dot"),
        ("family_accuracy", "family expert", None),
        ("family_chance", "family: chance", "dot"),
    ):
        values = [np.nan if v is None else 100 * v for v in by[key]]
        measured = by[key.replace("chance", "accuracy")]
        if not np.isfinite(values).any() or all(v is None for v in measured):  # no accuracy: no chance line
            continue
        fig.add_trace(go.Scatter(x=layers, y=values, mode="lines", name=name, line={"dash": dash}))
    fig.update_layout(title="Top-1 expert per token: right expert (%)", height=320, **LAYOUT)
    fig.update_xaxes(showticklabels=False, title="layer")
    return fig


def entropy_by_layer(view: InsightView, spec: str, tokens: str = "content") -> go.Figure:
    by = view.routing[spec][tokens]["by_layer"]
    layers = [short_module(m) for m in view.routing[spec][tokens]["layers"]]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=[_cell(v) for v in by["entropy"]], mode="lines", name="routing"))
    fig.add_trace(go.Scatter(x=layers, y=by["uniform_entropy"], mode="lines", name="uniform", line={"dash": "dot"}))
    fig.update_layout(title="Routing entropy per layer (nats)", height=320, **LAYOUT)
    fig.update_xaxes(showticklabels=False, title="layer")
    return fig


TABLE_COLUMNS = [
    "task",
    "family",
    "own expert %",
    "family %",
    "family chance %",
    "Spearman",
    "most routed",
    "its gain",
    "best gain",
]


def per_task_table(view: InsightView, spec: str, tokens: str = "content") -> pd.DataFrame:
    """One row per task: routing accuracy, and agreement with transfer (sortable in the page)."""

    def pct(x):
        return None if x is None or not math.isfinite(x) else round(100 * x, 1)

    def num(x):
        return None if x is None or not math.isfinite(x) else round(x, 3)

    rows = []
    for row in view.routing[spec][tokens]["per_task"]:
        rows.append(
            {
                "task": row["task"],
                "family": row["family"],
                "own expert %": pct(row["own_accuracy"]),
                "family %": pct(row["family_accuracy"]),
                "family chance %": pct(row["family_chance"]),
                "Spearman": num(row.get("spearman")),
                "most routed": row["most_routed"],
                "its gain": num(row.get("most_routed_gain")),
                "best gain": num(row.get("best_gain")),
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def summary_text(view: InsightView, spec: str, tokens: str = "content") -> str:
    s = view.routing[spec][tokens]["summary"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x):
        return "-" if x is None else f"{x:.2f}"

    def ci(pair, tasks=None):  # absent from statistics stored before intervals were added
        text = "" if not pair else f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"
        return text + ("" if not tasks else f" (over tasks [{100 * tasks[0]:.1f}, {100 * tasks[1]:.1f}])")

    what = "content tokens (chat template left out)" if tokens == "content" else "all prompt tokens"
    own = (
        f"the task's own expert in **{pct(s['own_accuracy'])}**"
        f"{ci(s.get('own_accuracy_ci'), s.get('own_accuracy_task_ci'))} "
        f"(chance {pct(s['own_chance'])}, "
        f"{s['own_tasks']} tasks have one), "
        if s["own_tasks"]
        else ""
    )
    return (
        f"**{spec}** over {len(view.routing[spec][tokens]['tasks'])} tasks, {what}: of all tokens x layers, "
        f"the top-1 expert is {own}an expert of the task's family in **{pct(s['family_accuracy'])}**"
        f"{ci(s.get('family_accuracy_ci'), s.get('family_accuracy_task_ci'))} (chance "
        f"{pct(s['family_chance'])}). Entropy {num(s['entropy'])} nats against {num(s['uniform_entropy'])} "
        f"for uniform weights (intervals: 95% bootstrap over prompts, and over tasks as well). "
        f"Spearman(routing mass, transfer gain), mean over tasks: **{num(s['spearman'])}**."
    )
