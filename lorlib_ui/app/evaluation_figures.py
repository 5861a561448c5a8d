"""The Evaluate and Adapt tabs' figures: routers compared with their intervals, per task, and the
adaptation methods' loss curves, from the records `evaluate` and `adapt` store. Pure functions."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from lorlib_ui.app.figures import LAYOUT, PALETTE


def evaluation_bars(
    summary: list[dict], title: str = "Zero-shot, mean over tasks (%); error bars: 95% interval over tasks"
) -> go.Figure:
    """One group of bars per measure, one bar per router, with its 95% bootstrap interval where
    the evaluation kept its rows: over tasks (`*_task_ci`, what a claim about tasks like these
    rests on), or over rows for records stored before that interval was kept."""
    measures = [("exact_match", "exact match"), ("mc_accuracy", "multiple choice")]
    fig = go.Figure()
    for i, row in enumerate(summary):
        values = [np.nan if row[key] is None else 100 * row[key] for key, _ in measures]
        colour = PALETTE[i % len(PALETTE)]
        bar = go.Bar(x=[label for _, label in measures], y=values, name=row["router"], marker_color=colour)
        intervals = [row.get(f"{key}_task_ci") or row.get(f"{key}_ci") for key, _ in measures]
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
