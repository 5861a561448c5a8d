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
from functools import partial

import gradio as gr

from lorlib_ui.app.route import DENSITY, RouteTab, layer_detail, route
from lorlib_ui.core.record import RoutingRecord
from lorlib_ui.worker.api import MAX_NEW_TOKENS, Worker

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


# What opening a link does on the Route tab, once the library has opened.


def restore_controls(tab: RouteTab, link: dict, notes: dict | None) -> dict:
    """The controls a link sets (after the library opened and filled the menus); others stay. A
    page opened without a prompt in its link starts on the library's demo example, if it has one."""
    controls = (tab.prompt, tab.router, tab.compare_router, tab.top_k, tab.temperature, tab.max_new)
    out = {component: gr.update() for component in controls}
    demo = (notes or {}).get("demo")
    if demo and not (link or {}).get("prompt"):
        out[tab.prompt] = demo["prompt"]
    if not link:
        return out
    values = settings(link)
    for key, component in (("prompt", tab.prompt), ("router", tab.router), ("compare", tab.compare_router)):
        if key in link:
            out[component] = link[key]
    for key, component in (("k", tab.top_k), ("t", tab.temperature), ("n", tab.max_new)):
        if values[key] is not None:
            out[component] = values[key]
    return out


def route_link(
    worker: Worker, tab: RouteTab, link: dict, folder, text, spec, k, temp, max_tokens, density=DENSITY, notes=None
):
    """A link with a prompt routes it, as the Route button would; other pages load as they are."""
    if not link or not link.get("prompt"):
        yield {tab.timing: gr.update()}
        return
    yield from route(worker, tab, folder, text, spec, k, temp, max_tokens, density, notes)


def restore_picks(tab: RouteTab, link: dict, record: RoutingRecord | None) -> dict:
    """The layer and token a link names, where the route has them."""
    if not link or record is None:
        return {tab.module_pick: gr.update(), tab.token_pick: gr.update()}
    token = settings(link)["token"]
    return {
        tab.module_pick: link["layer"] if link.get("layer") in record.modules else gr.update(),
        tab.token_pick: token if token is not None and token < len(record.tokens) else gr.update(),
    }


def wire_link(tab: RouteTab, worker: Worker, path: gr.State, path_box: gr.Textbox, link: gr.State, opened) -> None:
    """ "Copy link", and what opening a link does after the library opened (`opened`): the controls,
    the route, the layer and token."""
    view = [path_box, tab.prompt, tab.router, tab.compare_router, tab.top_k, tab.temperature, tab.max_new]
    tab.link_btn.click(None, [*view, tab.module_pick, tab.token_pick], tab.link_box, js=COPY_JS)
    controls = [tab.prompt, tab.router, tab.compare_router, tab.top_k, tab.temperature, tab.max_new]
    restored = opened.then(partial(restore_controls, tab), [link, tab.notes], controls, api_visibility="private")
    outputs = [tab.answer, tab.timing, tab.layer_plot, tab.record, tab.module_pick, tab.token_pick, tab.shown]
    outputs.append(tab.routed_prompt)
    inputs = [link, path, tab.prompt, tab.router, tab.top_k, tab.temperature, tab.max_new, tab.density, tab.notes]
    routed = restored.success(
        partial(route_link, worker, tab), inputs, [*outputs, tab.layer_box, tab.detail_box], api_visibility="private"
    )
    picked = routed.success(
        partial(restore_picks, tab), [link, tab.record], [tab.module_pick, tab.token_pick], api_visibility="private"
    )
    detail_inputs = [tab.record, tab.module_pick, tab.token_pick, tab.shown, tab.notes, tab.hide_template]
    picked.success(
        partial(layer_detail, tab),
        detail_inputs,
        [tab.coloured, tab.token_pick, tab.token_plot, tab.logits_plot],
        api_visibility="private",
    )
