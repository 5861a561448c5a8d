"""Links that reopen a view: the page URL carries the Route tab's view, and opening it runs it again.

    http://host:7860/?library=PATH&tab=route&prompt=...&router=arrow&compare=base&k=4&t=1.0&n=16
                     &layer=model.layers.0.self_attn.q_proj&token=3

"Copy link" on the Route tab writes that URL (in the browser, from the controls as they are).
Opening it opens the library, selects the tab, sets the controls and routes: greedy decoding makes
the answer and the heatmap those of when the link was made. Everything in a link is untrusted
input: it only fills controls a user could fill, so a bad value gets the control's own visible
error, and the library goes through the same checks as the library box (a served app opens only
what it serves).
"""

from __future__ import annotations

import math

import gradio as gr

from lorlib_ui.worker.api import MAX_NEW_TOKENS

KEYS = ("library", "tab", "prompt", "router", "compare", "k", "t", "n", "layer", "token")
TABS = ("library", "clusters", "route", "build", "evaluate", "adapt", "insight")
MAX_FIELD = 20_000  # characters of one parameter: a prompt fits, a flood does not

# Run in the browser by "Copy link": the URL of this page with the view's controls as its query.
COPY_JS = """
(library, prompt, router, compare, k, t, n, layer, token) => {
    const url = new URL(window.location.href);
    url.search = "";
    const values = {library, tab: "route", prompt, router, compare, k, t, n, layer, token};
    for (const [key, value] of Object.entries(values)) {
        if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, String(value));
    }
    const link = url.toString();
    if (navigator.clipboard) navigator.clipboard.writeText(link).catch(() => {});
    return link;
}
"""


def read_link(request: gr.Request | None) -> dict:
    """The view a page's URL asks for (known keys only, each a string), or {} for a plain URL."""
    params = dict(getattr(request, "query_params", None) or {}) if request is not None else {}
    link = {key: str(params[key])[:MAX_FIELD] for key in KEYS if key in params}
    if link.get("tab", "route") not in TABS:
        link["tab"] = "route"
    return link


def _number(link: dict, key: str, kind, what: str, low: float, high: float):
    if key not in link:
        return None
    try:
        value = kind(link[key])
    except ValueError:
        raise gr.Error(
            f"the link's {what} must be a {'whole ' if kind is int else ''}number, not {link[key][:40]!r}"
        ) from None
    if not (math.isfinite(value) and low <= value <= high):
        raise gr.Error(f"the link's {what} must be between {low:g} and {high:g}, got {value:g}")
    return value


def settings(link: dict) -> dict:
    """The link's route settings, checked as the controls check them (a visible error if not)."""
    return {
        "k": _number(link, "k", int, "top-k", 1, 1024),
        "t": _number(link, "t", float, "temperature", 0.1, 5.0),
        "n": _number(link, "n", int, "number of new tokens", 1, MAX_NEW_TOKENS),
        "token": _number(link, "token", int, "token", 0, 10**6),
    }
