"""The Route tab's figures, from a `RoutingRecord` and the experts to show (`shown_experts`: those
the router could use): routing per layer, per token, one token's expert logits, the difference of
two routers, and the coloured text (the (token, label) pairs Gradio's HighlightedText shows).
Pure functions of plain data (no model, no torch), tested without a UI. They are shown on a
projector: every row labelled, text of 14 px, experts named on the axes by short aliases
(`figures.expert_aliases`) and in full in the hover, a layer heatmap per kind of module.

A record says what kind of router made it: the base router weights no expert anywhere (its
figures say "no adapters" in words, not as an empty heatmap), and a static merge (uniform, TIES,
one expert) scores nothing and weights every token alike (its titles say so)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lorlib_ui.app.figures import (
    LAYOUT,
    colour_of,
    expert_aliases,
    layer_and_kind,
    short_module,
)
from lorlib_ui.core.record import RoutingRecord

# the bars of the experts a token was routed to, and the rest: two greys that no expert, family or
# cluster takes anywhere, so that a bar's colour never reads as an expert's
CHOSEN, OTHER = "#4D4D4D", "#CCCCCC"
NO_ADAPTERS = "no adapters: the base model routes nothing"
LISTED = 8  # experts named in a note before "and n more"
TOP = 10  # the bars of the logits figure: the highest scoring experts
# sizes legible from the back of a lecture room: tick labels, a heatmap row, a bar
TICKS = {"size": 14}
ROW, BAR = 17, 34
_LAYOUT = {**LAYOUT, "font": {**LAYOUT["font"], "size": 14}}


def usable_experts(record: RoutingRecord, members: Collection[str] | None = None) -> list[str]:
    """The experts the router of `record` could put weight on: those it gave weight somewhere or
    scored somewhere (a finite logit), and, where the router was limited to a group (`members`,
    e.g. the private experts of `arrow@private`), in the group: Arrow scores every expert, in the
    group or not. None at all for the base router."""
    used = (record.weights != 0).any(axis=(0, 1)) | np.isfinite(record.logits).any(axis=(0, 1))
    return [name for name, u in zip(record.experts, used) if u and (members is None or name in members)]


def shown_experts(record: RoutingRecord, members: Collection[str] | None = None) -> list[str]:
    """The experts a figure of `record` shows: those the router could use (`usable_experts`).
    Where none qualifies (the base router uses no expert), the group, or else every expert, so
    that a figure's columns are never empty."""
    allowed = [name for name in record.experts if members is None or name in members]
    return usable_experts(record, members) or allowed or list(record.experts)


def routes_nothing(record: RoutingRecord) -> bool:
    """Whether no expert got weight anywhere: the base router's record."""
    return not record.weights.any()


def static_note(record: RoutingRecord) -> str | None:
    """One line on a static merge's record (no routing logits, every token weighted alike at each
    layer): what its figures show is no routing. None for a router that routes per token."""
    w = record.weights
    if not record.tokens or routes_nothing(record) or np.isfinite(record.logits).any():
        return None
    if not np.allclose(w, w[:, :1]):
        return None
    every = "token and layer" if np.allclose(w, w[:1, :1]) else "token"
    return f"a static merge: the same weights at every {every}"


def _noted(fig: go.Figure, title: str, note: str | None) -> go.Figure:
    """`title`, with `note` on a smaller second line where there is one."""
    if not note:
        fig.update_layout(title=title)
        return fig
    fig.update_layout(title=f"{title}<br><sup>{note}</sup>", margin_t=(fig.layout.margin.t or 40) + 30)
    return fig


def _message(title: str, text: str, note: str | None = None) -> go.Figure:
    """A figure with no data that says, in words, why there is none to draw."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 15})
    fig.update_layout(height=200, **LAYOUT)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _noted(fig, title, note)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def _columns(record: RoutingRecord, shown: list[str] | None) -> tuple[list[str], list[int]]:
    names = shown_experts(record) if shown is None else shown
    return names, [record.experts.index(name) for name in names]


def _expert_axis(names: list[str], aliases: Mapping[str, str]) -> dict:
    """An axis of experts labelled by their aliases; the data keep the full names, for the hover."""
    return {"tickmode": "array", "tickvals": names, "ticktext": [aliases[n] for n in names], "tickfont": TICKS}


def _every_row(labels: list[str]) -> dict:
    """A heatmap's row axis, top to bottom, every row labelled (plotly would skip some)."""
    return {"tickmode": "array", "tickvals": labels, "ticktext": labels, "tickfont": TICKS, "autorange": "reversed"}


def _panels(modules: list[str]) -> list[tuple[str, list[int], list[str]]]:
    """One panel per kind of module (q_proj, v_proj, ...), in order of first appearance:
    (kind, the rows of its modules, their labels: the layer, "L12")."""
    panels: dict[str, tuple[list[int], list[str]]] = {}
    for i, module in enumerate(modules):
        layer, kind = layer_and_kind(module)
        rows, labels = panels.setdefault(kind, ([], []))
        rows.append(i)
        labels.append(kind if layer is None else f"L{layer}")
    return [(kind, rows, labels) for kind, (rows, labels) in panels.items()]


def _layer_panels(
    z: np.ndarray, names: list[str], aliases: Mapping[str, str], modules: list[str], heat: dict, hover: str
) -> go.Figure:
    """Layers x experts, `z` (modules, experts), as a heatmap per kind of module side by side,
    each over the same experts with every layer's row labelled: 30 layers of q_proj and v_proj
    read as two panels of 30 labelled rows, not one of 60 with every other label. `heat`: the
    colour scale, the same in every panel (one colour bar); `hover`: the value's line."""
    panels = _panels(modules)
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[kind for kind, _, _ in panels])
    for col, (_, rows, labels) in enumerate(panels, start=1):
        fig.add_trace(
            go.Heatmap(
                z=z[rows],
                x=names,
                y=labels,
                text=[[short_module(modules[r])] * len(names) for r in rows],
                hovertemplate=f"%{{text}}<br>%{{x}}<br>{hover}<extra></extra>",
                showscale=col == len(panels),
                **heat,
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(_expert_axis(names, aliases), row=1, col=col)
        fig.update_yaxes(_every_row(labels), row=1, col=col)
    fig.update_annotations(font_size=15)
    tall = max(len(rows) for _, rows, _ in panels)
    longest = max((len(aliases[n]) for n in names), default=0)  # the experts' labels, turned upright
    fig.update_layout(height=max(320, ROW * tall + 8 * longest + 110), **_LAYOUT)
    fig.update_layout(margin_t=80)
    return fig


def layer_heatmap(record: RoutingRecord, shown: list[str] | None = None) -> go.Figure:
    """Layers x experts, a panel per kind of module: each expert's mean routing weight over all
    tokens at each LoRA'd layer.
    The base router's says "no adapters"; a static merge's is drawn on the full scale 0 to 1 (its
    1/n would otherwise read as the darkest cell) under a note that it routes nothing."""
    title = f"Routing per layer ({record.router})"
    if routes_nothing(record):
        return _message(title, NO_ADAPTERS)
    static = static_note(record)
    names, columns = _columns(record, shown)
    z = record.layer_expert_weights()[:, columns]
    heat = {
        "colorscale": "Blues",
        "zmin": 0,
        "zmax": 1.0 if static else max(float(z.max(initial=0.0)), 1e-9),
        "colorbar": {"title": "weight"},
    }
    fig = _layer_panels(z, names, expert_aliases(record.experts), record.modules, heat, "mean weight %{z:.3f}")
    return _noted(fig, title, static)


def difference_heatmap(
    a: RoutingRecord,
    b: RoutingRecord,
    shown: list[str] | None = None,
    members_a: Collection[str] | None = None,
    members_b: Collection[str] | None = None,
) -> go.Figure:
    """Layers x experts: router A's mean weight minus router B's, on a diverging scale centred on 0
    (red: A gives the expert more weight; blue: B does), over the experts both routers could use
    (`usable_experts`, within each one's group, `members_a` and `members_b`), or `shown`. An expert
    only one router can use would show that router's whole weight there and swamp the scale (the
    shared expert of `expert:shared` at -1): those are named apart, under the title. Against a
    router that uses no expert (the base router), A − B is the other's own routing, over its experts."""
    if a.modules != b.modules or a.experts != b.experts:
        raise ValueError("the two records are not over the same layers and experts")
    can_a, can_b = set(usable_experts(a, members_a)), set(usable_experts(b, members_b))
    idle = [f"{side} uses no adapter" for side, can in (("A", can_a), ("B", can_b)) if not can]
    if shown is None:
        columns = (can_a | can_b) if idle else (can_a & can_b)
        shown = [name for name in a.experts if name in columns]
    only_a = [name for name in a.experts if name in can_a and name not in shown]
    only_b = [name for name in a.experts if name in can_b and name not in shown]
    apart = [f"only {side} uses {_listed(names)}" for side, names in (("A", only_a), ("B", only_b)) if names]
    note = "; ".join(idle + apart) or None
    title = f"Mean weight, A − B: {a.router} minus {b.router}"
    if not shown:
        why = "no expert that both routers can use" if not idle else "neither router uses an adapter"
        return _message(title, why + ": nothing to subtract", note)
    names, columns = _columns(a, shown)
    z = (a.layer_expert_weights() - b.layer_expert_weights())[:, columns]
    reach = max(float(np.abs(z).max(initial=0.0)), 1e-9)
    heat = {"colorscale": "RdBu_r", "zmid": 0, "zmin": -reach, "zmax": reach, "colorbar": {"title": "A − B"}}
    fig = _layer_panels(z, names, expert_aliases(a.experts), a.modules, heat, "A − B %{z:+.3f}")
    return _noted(fig, title, note)


def token_heatmap(
    record: RoutingRecord, module: str, shown: list[str] | None = None, tokens: list[int] | None = None
) -> go.Figure:
    """Tokens x experts at one layer: each token's routing weights (the base router's: "no adapters");
    only the rows of `tokens` (positions in the record) when given, as the coloured text shows them."""
    m = record.modules.index(module)
    title = f"Tokens at {short_module(module)}"
    if routes_nothing(record):
        return _message(title, NO_ADAPTERS)
    names, columns = _columns(record, shown)
    rows = list(range(len(record.tokens))) if tokens is None else list(tokens)
    every = token_labels(record)
    labels = [every[i] for i in rows]
    aliases = expert_aliases(record.experts)
    fig = go.Figure(
        go.Heatmap(
            z=record.weights[m][rows][:, columns],
            x=names,
            y=labels,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            hovertemplate="%{y}<br>%{x}<br>weight %{z:.3f}<extra></extra>",
            colorbar={"title": "weight"},
        )
    )
    longest = max((len(aliases[n]) for n in names), default=0)  # the experts' labels, turned upright
    fig.update_layout(height=max(320, ROW * len(labels) + 8 * longest + 90), **_LAYOUT)
    fig.update_xaxes(_expert_axis(names, aliases))
    fig.update_yaxes(_every_row(labels))
    return _noted(fig, title, static_note(record))


def token_labels(record: RoutingRecord) -> list[str]:
    """'3: ' cat'': each routed token with its position, as the heatmap rows and token menu name it."""
    return [f"{i}: {t!r}" for i, t in enumerate(record.tokens)]


def expert_logits(record: RoutingRecord, module: str, token: int, shown: list[str] | None = None) -> go.Figure:
    """Why these experts: the routing logits (for Arrow, |h·v_e|) of one token at one layer, for
    the TOP shown experts that score highest, as horizontal bars, highest on top. The experts the
    token was routed to are in their own colour, labelled with their weights, and kept among the
    bars even where they score lower. The value axis starts a little below the smallest logit
    shown (2.2 and 2.5 would look alike from 0), and its title says so. A router that scores
    nothing (a static merge: logits all NaN) is drawn by its weights instead, from 0, and the
    title says so; the base router's says "no adapters"."""
    m = record.modules.index(module)
    where = f"token {token_labels(record)[token]} at {short_module(module)}"
    if routes_nothing(record):
        return _message(f"Token {token_labels(record)[token]} at {short_module(module)}", NO_ADAPTERS)
    names, columns = _columns(record, shown)
    logits, weights = record.logits[m, token, columns], record.weights[m, token, columns]
    scored = bool(np.isfinite(logits).any())
    values = logits if scored else weights
    ranked = sorted(range(len(names)), key=lambda i: -values[i] if np.isfinite(values[i]) else np.inf)
    routed = [i for i in ranked if weights[i] > 0]
    kept = set(routed[:TOP])
    kept |= set([i for i in ranked if i not in kept][: TOP - len(kept)])
    bars = [i for i in ranked if i in kept]
    start, end = _value_range(values[bars], zoom=scored)
    aliases = expert_aliases(record.experts)
    fig = go.Figure()
    chosen = [i for i in bars if weights[i] > 0]
    others = [i for i in bars if weights[i] <= 0]
    for idx, label, colour in ((others, "not chosen", OTHER), (chosen, f"chosen ({len(routed)})", CHOSEN)):
        fig.add_trace(
            go.Bar(
                y=[names[i] for i in idx],
                x=values[idx] - start,  # drawn from where the axis starts
                base=start,
                orientation="h",
                name=label,
                marker_color=colour,
                text=[f"w={weights[i]:.2f}" if weights[i] > 0 else "" for i in idx],
                textposition="outside",
                textfont={"size": 15},
                constraintext="none",
                cliponaxis=False,
                customdata=np.stack([values[idx], weights[idx]], axis=-1),
                hovertemplate=f"%{{y}}<br>{'logit' if scored else 'weight'} %{{customdata[0]:.3f}}"
                "<br>weight %{customdata[1]:.3f}<extra></extra>",
            )
        )
    if len(bars) == len(names):
        count = ""
    elif bars == ranked[: len(bars)]:
        count = f" (top {len(bars)} of {len(names)})"
    else:
        count = f" ({len(bars)} of {len(names)}: those chosen, then the top)"
    if scored:
        title = f"Routing logits of {where}{count}"
        axis = "routing logit (Arrow: |h·v|)" + (f"; the axis starts at {start:.2f}, not 0" if start else "")
    else:
        title = f"{record.router} computes no routing logits: its weights for {where}{count}"
        axis = "weight"
    order = [names[i] for i in bars]
    ticks = [f"<b>{aliases[names[i]]}</b>" if weights[i] > 0 else aliases[names[i]] for i in bars]
    fig.update_layout(barmode="overlay", showlegend=False, height=BAR * len(bars) + 150, **_LAYOUT)
    fig.update_layout(margin_r=80)  # room for the largest bar's weight
    fig.update_yaxes(
        categoryorder="array", categoryarray=order, tickmode="array", tickvals=order, ticktext=ticks, tickfont=TICKS
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(range=[start, end], title=axis, tickfont=TICKS)
    shown_chosen = f" ({len(chosen)} shown)" if len(chosen) < len(routed) else ""
    return _noted(fig, title, f"in colour, in bold: the {len(routed)} chosen{shown_chosen}, w = routing weight")


def _value_range(values: np.ndarray, zoom: bool) -> tuple[float, float]:
    """Where the logits figure's value axis starts and ends. From 0, unless `zoom` and the values
    lie far from 0 against their spread (2.2 and 2.5; or below 0): then from a little below the
    smallest, so that the bars differ as the values do."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    spread = high - low or abs(high)
    start = low - 0.15 * spread if zoom and (low < 0 or low > spread) else 0.0
    end = high + 0.1 * (high - start)
    return start, end if end > start else start + 1.0


def token_colours(
    record: RoutingRecord, module: str, families: Mapping[str, str | None] | None = None
) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """(token, its top expert at `module`) for each token, None where no expert is used; and the
    colour of each expert that tops some token (only those: a legend of every expert in a library
    of hundreds says nothing). An expert has its family's colour (`families`: expert -> family,
    over the whole library) in a shade no other expert has, and keeps it across layers and prompts."""
    m = record.modules.index(module)
    top = record.top_expert()[:, m]
    pairs = [(token, record.experts[i] if i >= 0 else None) for token, i in zip(record.tokens, top)]
    used = {expert for _, expert in pairs if expert}
    return pairs, {e: c for e, c in colour_of(record.experts, families).items() if e in used}
