"""What every figure of the explorer shares: the palette, the layout, how an expert gets its
colour and how a module's name is shortened. The figures themselves live beside their tabs:
`routing_figures`, `cluster_figures`, `expert_figures`, `evaluation_figures`, `insight_figures`."""

from __future__ import annotations

import colorsys
import re
from collections import Counter
from collections.abc import Iterable, Mapping

import plotly.graph_objects as go
import plotly.io as pio

# Okabe & Ito (2008), "Color Universal Design": eight colours told apart with every common colour
# vision deficiency. Black is left out: it vanishes on a dark page. The one categorical palette:
# families, routers, methods and kinds of module all draw from it.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"]
NO_FAMILY = "#999999"  # Okabe-Ito's grey, for experts without a family (shared, ...)

# Clusters are numbered, not named, and their numbers must not read as families: Paul Tol's "muted"
# scheme (Tol 2021, also safe for colour-blind readers), always with a marker shape per cluster.
CLUSTER_PALETTE = ["#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499"]
CLUSTER_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x", "triangle-down", "star", "pentagon"]

# A bar's pattern tells routers apart where colours cannot (grey print, a colour-blind reader).
PATTERNS = ["", "/", ".", "x", "\\", "+", "-", "|"]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]

TRANSPARENT = "rgba(0,0,0,0)"
INK = "#808080"  # a mid grey: legible on Gradio's light and dark pages alike
_GRID = "rgba(128,128,128,0.25)"

# plotly_white, with the page showing through, so that figures follow Gradio's light or dark theme
# (Gradio's Plot sets only the margins and size of a figure, not its colours).
TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.update(
    paper_bgcolor=TRANSPARENT,
    plot_bgcolor=TRANSPARENT,
    font_color=INK,
    colorway=PALETTE,
    xaxis={"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID},
    yaxis={"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID},
)

LAYOUT = {
    "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
    "template": TEMPLATE,
    "paper_bgcolor": TRANSPARENT,
    "plot_bgcolor": TRANSPARENT,
    "font": {"color": INK},
}


def short_module(name: str) -> str:
    """model.layers.12.self_attn.q_proj -> L12 q_proj"""
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    return f"L{layer} {parts[-1]}" if layer is not None else parts[-1]


def layer_and_kind(name: str) -> tuple[str | None, str]:
    """model.layers.12.self_attn.q_proj -> ("12", "q_proj"); a module of no layer: (None, its name)"""
    parts = name.split(".")
    return next((p for p in parts if p.isdigit()), None), parts[-1]


ALIAS_LENGTH = 14  # an expert's name up to this long is its own alias


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[_.\-\s]+", text) if w]


def _group_abbreviation(group: str) -> str:
    words = _words(group)
    return "".join(w[0] for w in words) if len(words) > 1 else group[:5]


def expert_aliases(names: list[str]) -> dict[str, str]:
    """A short label per expert, unique among `names`, for a figure's axis (the full name goes in
    its hover). A name of up to ALIAS_LENGTH characters is its own alias. A longer one is its group
    (what comes before the first ".", BIG-bench's task group), abbreviated to its words' initials
    or, for one word, its first five letters; then its task's words, less any that every task of
    the group has (a name of no group: all its words), the longest cut to three letters until the
    alias fits:
    linguistic_mappings.past_tense_regular_json -> lm.pas_ten_reg,
    multiemo.medicine_sentence_en -> multi.medicine, entailed_polarity -> ent_polarity.
    Two groups of one abbreviation keep their names; two experts that would read alike, theirs.
    Give it the whole library (`record.experts`), so that an expert reads alike in every figure."""
    split = {name: name.split(".", 1) if "." in name else ["", name] for name in names}
    abbreviated = {group: _group_abbreviation(group) for group, _ in split.values() if group}
    taken = Counter(abbreviated.values())
    prefix = {group: (a if taken[a] == 1 else group) + "." for group, a in abbreviated.items()} | {"": ""}
    tasks: dict[str, list[list[str]]] = {}
    for group, task in split.values():
        tasks.setdefault(group, []).append(_words(task))
    common = {group: set.intersection(*map(set, ws)) if group and len(ws) > 1 else set() for group, ws in tasks.items()}
    for group, ws in tasks.items():
        if any(set(w) <= common[group] for w in ws):  # a task with nothing of its own: drop nothing
            common[group] = set()
    aliases = {}
    for name, (group, task) in split.items():
        if len(name) <= ALIAS_LENGTH:
            aliases[name] = name
            continue
        words = [w for w in _words(task) if w not in common[group]]
        while len(prefix[group] + "_".join(words)) > ALIAS_LENGTH:
            long = [i for i, w in enumerate(words) if len(w) > 3 and not w.isdigit()]
            if not long:
                break
            i = max(long, key=lambda i: len(words[i]))
            words[i] = words[i][:3]
        aliases[name] = prefix[group] + "_".join(words)
    while True:
        counts = Counter(aliases.values())
        alike = [name for name, alias in aliases.items() if alias != name and counts[alias] > 1]
        if not alike:
            return aliases
        for name in alike:
            aliases[name] = name


def family_colours(families: Iterable[str | None]) -> dict[str, str]:
    """One colour per family: the library's families in sorted order take PALETTE's colours in
    turn. Give it every family of the library, not only those a view shows, so that a family has
    the same colour in every view. Beyond len(PALETTE) families colours repeat across families;
    the names (in hovers and legends) and, in the Clusters tab, the marker shapes tell them apart."""
    named = sorted({f for f in families if f})
    return {family: PALETTE[i % len(PALETTE)] for i, family in enumerate(named)}


def cluster_style(cluster: int) -> dict:
    """The marker of MBC cluster number `cluster`: a colour and a shape that read as no family."""
    return {
        "color": CLUSTER_PALETTE[cluster % len(CLUSTER_PALETTE)],
        "symbol": CLUSTER_SYMBOLS[cluster % len(CLUSTER_SYMBOLS)],
    }


def router_styles(routers: list[str]) -> dict[str, dict]:
    """A bar marker per router: a PALETTE colour and a pattern, both different for any two of the
    first len(PALETTE) routers, so that two routers never look alike, in colour or in grey."""
    return {
        router: {"color": PALETTE[i % len(PALETTE)], "pattern": {"shape": PATTERNS[i % len(PATTERNS)]}}
        for i, router in enumerate(routers)
    }


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(255 * min(max(c, 0.0), 1.0)):02x}" for c in rgb)


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))


def shades(colour: str, n: int) -> list[str]:
    """n shades of `colour`, dark to light, keeping its hue and saturation (HLS); one: the colour."""
    if n == 1:
        return [colour.lower()]
    h, _, s = colorsys.rgb_to_hls(*_rgb(colour))
    return [_hex(colorsys.hls_to_rgb(h, 0.32 + 0.40 * i / (n - 1), s)) for i in range(n)]


def colour_of(names: list[str], families: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """A colour per expert, no two alike: its family's colour (`family_colours` over every family
    in `families`, name -> family), in a shade of its own within the family, the shades handed out
    in the order of `names` (the library's order, so an expert keeps its colour across prompts).
    Experts without a family share grey's shades. Without any family known, each run of
    len(PALETTE) experts takes the palette's colours, each again a step darker or lighter."""
    families = families or {}
    if not any(families.get(name) for name in names):
        families = {name: f"#{i % len(PALETTE)}" for i, name in enumerate(names)}
    base = family_colours(families.values())
    members: dict[str | None, list[str]] = {}
    for name in names:
        members.setdefault(families.get(name) or None, []).append(name)
    colours, taken = {}, set()
    for family, group in members.items():
        for name, shade in zip(group, shades(base.get(family, NO_FAMILY), len(group))):
            while shade in taken:  # shades of hundreds of experts round alike: nudge to the next free one
                shade = _hex(tuple(min(c + 1 / 255, 1.0) if c < 1.0 else 0.0 for c in _rgb(shade)))
            colours[name] = shade
            taken.add(shade)
    return colours
