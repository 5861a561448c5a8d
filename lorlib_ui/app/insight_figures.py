"""Figures that judge routing, from an `InsightView` (plain data: no model, no torch).

The transfer matrix and a router's routing matrix are drawn tasks down and experts across, in the
view's one order for both (tasks by family, experts by MBC cluster), so a column of the one lines
up with the same column of the other: where routing mass sits against where the gain over the
base model is, each task's best expert (by transfer) starred on both. Transfer is coloured on a
diverging scale centred on "no gain"; routing mass on a sequential scale from 0. What is stale
(computed before the library's experts changed) is drawn faded, its title saying why.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lorlib_ui.app.figures import DASHES, LAYOUT, PALETTE, layer_and_kind, short_module
from lorlib_ui.worker.api import InsightView

ALL_LAYERS = "all layers"


LABEL = 26  # characters of an expert's name on an axis; the whole name is in the hover
STALE_OPACITY = 0.45  # a stale matrix is drawn faded


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


def _marked(fig: go.Figure, title: str, stale: str | None, subtitle: str = "") -> go.Figure:
    """Title a figure, with a first line saying why it is stale where it is, and fade its heatmaps.
    What reads the figure (colours, stars, tokens) goes in a smaller second line, `subtitle`, so
    that the title fits a half-width panel."""
    if stale:
        title = f"<b>stale: {stale}</b><br>{title}"
        fig.update_traces(opacity=STALE_OPACITY, selector={"type": "heatmap"})
    fig.update_layout(title={"text": title, "subtitle": {"text": subtitle}}, **LAYOUT)
    lines = 1 + bool(stale) + bool(subtitle)
    if lines > 1:
        fig.update_layout(margin={**LAYOUT["margin"], "t": 20 + 25 * lines})
    return fig


def best_experts(view: InsightView) -> dict[str, str]:
    """Task -> the expert with the largest gain over base on it in the transfer matrix (among the
    view's experts), for the tasks with one."""
    t = view.transfer
    if t is None:
        return {}
    gain = _reordered(t["gain"], t["tasks"], t["columns"], view.tasks, view.experts)
    return {task: view.experts[int(np.nanargmax(row))] for task, row in zip(view.tasks, gain) if np.isfinite(row).any()}


def _star_best(fig: go.Figure, view: InsightView) -> None:
    """A star on each task's best expert (by transfer), on either matrix."""
    best = best_experts(view)
    if not best:
        return
    labels = dict(zip(view.experts, _labels(view)))
    fig.add_trace(
        go.Scatter(
            x=[labels[e] for e in best.values()],
            y=list(best),
            mode="markers",
            name="best expert (transfer" + (", stale)" if view.stale.get("transfer") else ")"),
            showlegend=False,  # the subtitle says what a star is: a legend would sit on the tick labels
            marker={"symbol": "star", "size": 11, "color": "#F0E442", "line": {"color": "#000000", "width": 1}},
            customdata=list(best.values()),
            hovertemplate="task %{y}<br>best expert alone: %{customdata}<extra></extra>",
        )
    )


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
    _star_best(fig, view)
    fig.update_layout(height=_height(len(view.tasks)))
    _marked(fig, "Transfer: each expert alone", view.stale.get("transfer"), "gain over base (blue helps; ★ best)")
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
    _star_best(fig, view)
    fig.update_layout(height=_height(len(view.tasks)))
    _marked(fig, f"Routing: {spec}", view.stale.get(spec), f"mean weight {where}, {what} (★ best by transfer)")
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_xaxes(showticklabels=len(view.experts) <= 60, tickangle=60)
    return fig


def _by_kind(modules: list[str], values: list, scale: float = 1.0) -> dict[str, tuple[list[int], list[float]]]:
    """Per kind of module (q_proj, v_proj, ...), in the model's order: its layers' numbers and its
    values there. Kinds alternate along the modules, so each is drawn as a line of its own."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, (module, value) in enumerate(zip(modules, values)):
        layer, kind = layer_and_kind(module)
        xs, ys = out.setdefault(kind, ([], []))
        xs.append(int(layer) if layer is not None else i)
        ys.append(scale * _cell(value))
    return out


def _lines(fig: go.Figure, modules: list[str], values: list, name: str, colour: str, scale: float = 1.0) -> None:
    """One line per kind of module, told apart by dash and marker (the colour is the measure's)."""
    kinds = _by_kind(modules, values, scale)
    for k, (kind, (xs, ys)) in enumerate(kinds.items()):
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=name if len(kinds) == 1 else f"{name} · {kind}",
                line={"color": colour, "dash": DASHES[k % len(DASHES)]},
                marker={"symbol": ["circle", "square", "diamond", "triangle-up"][k % 4], "size": 5},
            )
        )


def _reference(fig: go.Figure, modules: list[str], values: list, name: str, colour: str, scale: float = 1.0) -> None:
    """A dotted reference line (chance, uniform): one line where every kind of module has the same."""
    kinds = _by_kind(modules, values, scale)
    curves = list(kinds.values())
    same = all(c[0] == curves[0][0] and np.allclose(c[1], curves[0][1], equal_nan=True) for c in curves)
    for kind, (xs, ys) in list(kinds.items())[: 1 if same else None]:
        label = name if same else f"{name} · {kind}"
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=label, line={"color": colour, "dash": "dot"}))


def _layer_axis(fig: go.Figure, title: str, stale: str | None) -> go.Figure:
    """A per-layer figure: its legend in rows under the axis, so that a half-width panel keeps
    the whole plot and every name."""
    fig.update_layout(height=400)
    _marked(fig, title, stale)
    fig.update_layout(legend={"orientation": "h", "y": -0.25, "yanchor": "top", "x": 0})
    fig.update_xaxes(title="layer (0: nearest the input)", showticklabels=True, tickmode="auto")
    return fig


def accuracy_by_layer(view: InsightView, spec: str, tokens: str = "content") -> go.Figure:
    """How often the top-1 expert is the task's own, or of its family, per layer and kind of module
    (q_proj and v_proj alternate along the model: a line each), beside chance."""
    stats = view.routing[spec][tokens]
    by, modules = stats["by_layer"], stats["layers"]
    fig = go.Figure()
    for measure, name, colour in (("own", "own expert", PALETTE[4]), ("family", "family expert", PALETTE[0])):
        measured = by[f"{measure}_accuracy"]
        if all(v is None for v in measured):  # no accuracy: no chance line
            continue
        _lines(fig, modules, measured, name, colour, 100)
        _reference(fig, modules, by[f"{measure}_chance"], f"{measure}: chance", colour, 100)
    return _layer_axis(fig, "Top-1 expert per token: right expert (%)", view.stale.get(spec))


def entropy_by_layer(view: InsightView, spec: str, tokens: str = "content") -> go.Figure:
    stats = view.routing[spec][tokens]
    by, modules = stats["by_layer"], stats["layers"]
    fig = go.Figure()
    _lines(fig, modules, by["entropy"], "routing", PALETTE[2])
    _reference(fig, modules, by["uniform_entropy"], "uniform", PALETTE[2])
    return _layer_axis(fig, "Routing entropy per layer (nats)", view.stale.get(spec))


# What carries the lesson first: where routing went, what that expert gains, and what the best one would
TABLE_COLUMNS = [
    "task",
    "most routed",
    "its gain",
    "best gain",
    "Spearman",
    "family %",
    "family chance %",
    "own expert %",
    "family",
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


def _times(ratio: float) -> str:
    """3.0 -> '3×', 3.16 -> '3.2×'."""
    return f"{ratio:.1f}".removesuffix(".0") + "×"


def _against_chance(s: dict) -> tuple[str, bool] | None:
    """How often routing finds the task's family against chance, in words, and whether that is
    above chance: by the interval over tasks where the statistics carry one, else by the means."""
    accuracy, chance = s.get("family_accuracy"), s.get("family_chance")
    if accuracy is None or not chance:
        return None
    interval = s.get("family_accuracy_task_ci")
    counts = s.get("family_above_chance")
    numbers = f"{100 * accuracy:.1f}%"
    numbers += f", 95% interval over tasks {100 * interval[0]:.1f}–{100 * interval[1]:.1f}%" if interval else ""
    numbers += f", against {100 * chance:.1f}% by chance"
    if counts:
        numbers += f"; above chance on {counts['up']} of {sum(counts.values())} tasks"
    low, high = interval if interval else (accuracy, accuracy)
    if low > chance + 1e-9:
        times = _times(accuracy / chance)
        return f"routes to an expert of the task's family {times} as often as chance ({numbers})", True
    if high < chance - 1e-9:
        return f"routes to the task's family less often than chance ({numbers})", False
    if interval and accuracy > chance + 1e-9:
        return f"routes to the task's family not clearly more often than chance ({numbers})", False
    return f"routes to the task's family no more often than chance ({numbers})", False


# |ρ| below each bound, in words (ρ of -0.1 or less: "runs against")
_AGREEMENT = [(0.1, "does not follow"), (0.3, "barely follows"), (0.5, "loosely follows"), (0.7, "follows")]


def _follows(rho: float | None, tasks: int) -> tuple[str, bool] | None:
    """Whether how much a router routes to an expert follows how much that expert helps, in words."""
    if rho is None:
        return None
    if rho <= -0.1:
        verb, strong = "runs against", False
    else:
        verb = next((v for bound, v in _AGREEMENT if abs(rho) < bound), "closely follows")
        strong = rho >= 0.3
    text = f"how much it routes to an expert {verb} how much that expert helps (ρ = {rho:.2f}, mean over {tasks} tasks)"
    return text, strong


def verdict(view: InsightView, spec: str, tokens: str = "content") -> str:
    """One sentence that follows from the summary's numbers: how often routing finds the task's
    family against chance (with its interval over tasks, where stored), and whether routing mass
    follows transfer gain (Spearman's ρ, mean over tasks)."""
    stats = view.routing[spec][tokens]
    s = stats["summary"]
    rhos = sum(1 for row in stats.get("per_task", []) if row.get("spearman") is not None)
    family, agreement = _against_chance(s), _follows(s.get("spearman"), rhos)
    stale = f"*Stale ({view.stale[spec]}):* " if view.stale.get(spec) else ""
    if family is None and agreement is None:
        return f"{stale}**{spec}**: no family accuracy or transfer agreement to judge by."
    if agreement is None:
        return f"{stale}**{spec}** {family[0]}; compute transfer to see whether it routes to the experts that help."
    if family is None:
        return f"{stale}**{spec}**: {agreement[0]}."
    joint = "and" if family[1] == agreement[1] else "but"
    return f"{stale}**{spec}** {family[0]}, {joint} {agreement[0]}."
