"""The Evaluate and Adapt tabs' figures: routers compared with their intervals, per task, and the
adaptation methods' loss curves, from the records `evaluate` and `adapt` store. Pure functions."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from lorlib_ui.app.figures import DASHES, LAYOUT, PALETTE, router_styles


def evaluation_bars(
    summary: list[dict], title: str = "Zero-shot, mean over tasks (%); error bars: 95% interval over tasks"
) -> go.Figure:
    """One group of bars per measure, one bar per router, with its 95% bootstrap interval where
    the evaluation kept its rows: over tasks (`*_task_ci`, what a claim about tasks like these
    rests on), or over rows for records stored before that interval was kept."""
    measures = [("exact_match", "exact match"), ("mc_accuracy", "multiple choice")]
    styles = router_styles([row["router"] for row in summary])
    fig = go.Figure()
    for row in summary:
        values = [np.nan if row[key] is None else 100 * row[key] for key, _ in measures]
        bar = go.Bar(x=[label for _, label in measures], y=values, name=row["router"], marker=styles[row["router"]])
        intervals = [row.get(f"{key}_task_ci") or row.get(f"{key}_ci") for key, _ in measures]
        if any(intervals):
            plus = [np.nan if ci is None else 100 * ci[1] - v for ci, v in zip(intervals, values)]
            minus = [np.nan if ci is None else v - 100 * ci[0] for ci, v in zip(intervals, values)]
            bar.update(error_y={"type": "data", "array": plus, "arrayminus": minus, "visible": True})
        fig.add_trace(bar)
    fig.update_layout(title=title, barmode="group", height=360, **LAYOUT)
    return fig


ROWS = {"exact_match": "exact_match", "loglik": "loglik", "mc_accuracy": "mc"}  # a measure's key in a score's rows


def row_interval(rows: list | None) -> tuple[int, float]:
    """(rows, half-width of the 95% interval of their mean): ±1.96·SE, SE = sd / √n, the normal
    approximation (the app computes no bootstrap: that lives in the analysis code, off limits to
    the UI); NaN with fewer than two rows. A proportion that is 0 or 1 on every row gets ±0."""
    values = np.array([np.nan if v is None else v for v in rows or []], dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return len(values), np.nan
    return len(values), 1.96 * float(values.std(ddof=1)) / np.sqrt(len(values))


def per_task_bars(scores: list[dict], routers: list[str], measure: str = "exact_match") -> go.Figure:
    """The evaluation task by task: one group of bars per task, one bar per router, each with the
    95% interval of its mean over the task's rows (`row_interval`) where the record kept its rows."""
    tasks = list(dict.fromkeys(s["task"] for s in scores))
    by = {(s["router"], s["task"]): s for s in scores}
    scale = 100 if measure != "loglik" else 1
    styles = router_styles(routers)
    fig = go.Figure()
    for router in routers:
        found = [by.get((router, t)) for t in tasks]
        values = [np.nan if s is None or s[measure] is None else scale * s[measure] for s in found]
        spread = [row_interval((s or {}).get("rows", {}).get(ROWS[measure])) for s in found]
        half = [scale * h for _, h in spread]
        bar = go.Bar(
            x=tasks,
            y=values,
            name=router,
            marker=styles[router],
            hovertext=[
                f" ± {h:.3g}<br>95% interval over its {n} rows: ±1.96·SE (normal approximation)"
                if np.isfinite(h)
                else ""
                for (n, _), h in zip(spread, half)
            ],
            hovertemplate=f"{router}<br>%{{x}}<br>%{{y:.3g}}%{{hovertext}}<extra></extra>",
        )
        if np.isfinite(half).any():
            bar.update(error_y={"type": "data", "array": half, "visible": True})
        fig.add_trace(bar)
    label = {"exact_match": "exact match (%)", "loglik": "answer log-likelihood", "mc_accuracy": "multiple choice (%)"}
    title = f"Per task: {label[measure]}; error bars: 95% interval over rows (±1.96·SE)"
    fig.update_layout(title=title, barmode="group", height=380, **LAYOUT)
    fig.update_xaxes(tickangle=30)
    return fig


# ---- one expert (the Library tab): its ΔW = s·B·A layer by layer, and its training ----------------


def loss_curves(curves: dict[str, list[float]], title: str = "Training loss by method") -> go.Figure:
    """Each method's loss at every step so far (LoraHub: the best objective after each evaluation
    of its search), one line per method, in the order they trained."""
    fig = go.Figure()
    for i, (name, losses) in enumerate(curves.items()):
        line = go.Scatter(x=list(range(1, len(losses) + 1)), y=losses, mode="lines", name=name)
        fig.add_trace(line.update(line={"color": PALETTE[i % len(PALETTE)], "dash": DASHES[i % len(DASHES)]}))
    fig.update_layout(title=title, height=340, **LAYOUT)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="answer loss")
    return fig
