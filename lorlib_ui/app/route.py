"""The Route tab: a streamed answer under a router, its routing per layer, each token coloured by
its top expert at a chosen layer, and two routers side by side."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from lorlib_ui.app import figures
from lorlib_ui.app.events import shows_errors
from lorlib_ui.core.record import RoutingRecord
from lorlib_ui.worker.api import MAX_NEW_TOKENS, LibraryInfo, RouteRequest, Worker

HELP = (
    "Type a prompt and pick a router. The heatmap shows, for every adapted layer, how much weight "
    "each expert got on average over the tokens; below, pick one layer to see each token's weights and the "
    "text coloured by each token's top expert."
)
DEFAULT_ROUTER = "arrow@private"  # Arrow over the task experts, when the library has them


@dataclass
class RouteTab:
    prompt: gr.Textbox
    example_pick: gr.Dropdown
    router: gr.Dropdown
    compare_router: gr.Dropdown
    top_k: gr.Slider
    temperature: gr.Slider
    max_new: gr.Slider
    route_btn: gr.Button
    compare_btn: gr.Button
    answer: gr.Textbox
    timing: gr.Markdown
    layer_plot: gr.Plot
    module_pick: gr.Dropdown
    coloured: gr.HighlightedText
    token_plot: gr.Plot
    compare_a: gr.Textbox
    compare_b: gr.Textbox
    compare_plot_a: gr.Plot
    compare_plot_b: gr.Plot
    record: gr.State


def build_tab() -> RouteTab:
    with gr.Tab("Route", id="route"):
        gr.Markdown(HELP)
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Ask something...")
                example_pick = gr.Dropdown([], label="Examples from held-out tasks", allow_custom_value=False)
                with gr.Row():  # the menus are filled from the worker when a library opens
                    router = gr.Dropdown([], label="Router", allow_custom_value=True)
                    compare_router = gr.Dropdown([], label="Compare with", allow_custom_value=True)
                with gr.Row():
                    top_k = gr.Slider(1, 16, value=4, step=1, label="top-k")
                    temperature = gr.Slider(0.1, 5.0, value=1.0, step=0.1, label="temperature")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=32, step=1, label="max new tokens")
                with gr.Row():
                    route_btn = gr.Button("Route", variant="primary")
                    compare_btn = gr.Button("Compare two routers")
                answer = gr.Textbox(label="Generated text", lines=4, interactive=False)
                timing = gr.Markdown()
            with gr.Column(scale=3):
                layer_plot = gr.Plot(label="Routing per layer", show_label=False)
        with gr.Row():
            module_pick = gr.Dropdown([], label="Layer", allow_custom_value=False)
        coloured = gr.HighlightedText(label="Tokens coloured by their top expert at this layer", show_legend=True)
        token_plot = gr.Plot(label="Tokens x experts", show_label=False)
        with gr.Row():
            compare_a = gr.Textbox(label="Router A", lines=4, interactive=False)
            compare_b = gr.Textbox(label="Router B", lines=4, interactive=False)
        with gr.Row():
            compare_plot_a = gr.Plot(show_label=False)
            compare_plot_b = gr.Plot(show_label=False)
        record = gr.State(None)  # inside the tab: a Tabs block holds only tabs
    return RouteTab(
        prompt,
        example_pick,
        router,
        compare_router,
        top_k,
        temperature,
        max_new,
        route_btn,
        compare_btn,
        answer,
        timing,
        layer_plot,
        module_pick,
        coloured,
        token_plot,
        compare_a,
        compare_b,
        compare_plot_a,
        compare_plot_b,
        record,
    )


def opened(tab: RouteTab, info: LibraryInfo, examples: list[tuple[str, str]]) -> dict:
    """The routers the worker offers for this library, top-k up to its size, its example prompts."""
    n = len(info.experts)
    default = DEFAULT_ROUTER if DEFAULT_ROUTER in info.routers else (info.routers or [None])[0]
    return {
        tab.example_pick: gr.Dropdown(choices=[(f"{t}: {p[:60]}", p) for t, p in examples], value=None),
        tab.router: gr.Dropdown(choices=info.routers, value=default),
        tab.compare_router: gr.Dropdown(choices=info.routers, value="base"),
        tab.top_k: gr.Slider(1, max(n, 2), value=min(4, max(n, 1)), step=1),
    }


def _request(folder, text, spec, k, temp, max_tokens) -> RouteRequest:
    return RouteRequest(folder, text, spec, int(k), float(temp), max_new_tokens=int(max_tokens))


@shows_errors
def route(worker: Worker, tab: RouteTab, folder, text, spec, k, temp, max_tokens):
    """Stream the answer; at the end, the routing heatmap and the layers to inspect."""
    for update in worker.route(_request(folder, text, spec, k, temp, max_tokens)):
        if not update.done:
            yield {tab.answer: update.text, tab.timing: f"first token after {update.first_token_s:.2f} s"}
            continue
        record = update.record
        note = f"first token after {update.first_token_s:.2f} s, done in {update.total_s:.2f} s"
        if update.truncated:
            note += " (the prompt was cut to fit the model's context)"
        default = record.modules[len(record.modules) // 2] if record.modules else None
        yield {
            tab.answer: update.text,
            tab.timing: note,
            tab.layer_plot: figures.layer_heatmap(record),
            tab.record: record,
            tab.module_pick: gr.Dropdown(choices=[(figures.short_module(m), m) for m in record.modules], value=default),
        }


def layer_detail(tab: RouteTab, record: RoutingRecord | None, module: str | None) -> dict:
    if record is None or not module:
        return {tab.coloured: None, tab.token_plot: None}
    pairs, colours = figures.token_colours(record, module)
    return {
        tab.coloured: gr.HighlightedText(pairs, color_map=colours),
        tab.token_plot: figures.token_heatmap(record, module),
    }


@shows_errors
def compare(worker: Worker, tab: RouteTab, folder, text, spec_a, spec_b, k, temp, max_tokens) -> dict:
    out = {}
    for spec, answer, plot in (
        (spec_a, tab.compare_a, tab.compare_plot_a),
        (spec_b, tab.compare_b, tab.compare_plot_b),
    ):
        final = list(worker.route(_request(folder, text, spec, k, temp, max_tokens)))[-1]
        out |= {answer: final.text, plot: figures.layer_heatmap(final.record)}
    return out


def wire(tab: RouteTab, worker: Worker, path: gr.State) -> None:
    tab.route_btn.click(
        partial(route, worker, tab),
        [path, tab.prompt, tab.router, tab.top_k, tab.temperature, tab.max_new],
        [tab.answer, tab.timing, tab.layer_plot, tab.record, tab.module_pick],
        api_name="route",
    )
    tab.module_pick.change(
        partial(layer_detail, tab),
        [tab.record, tab.module_pick],
        [tab.coloured, tab.token_plot],
        api_visibility="private",
    )
    tab.example_pick.change(lambda p: p or gr.skip(), tab.example_pick, tab.prompt, api_visibility="private")
    tab.compare_btn.click(
        partial(compare, worker, tab),
        [path, tab.prompt, tab.router, tab.compare_router, tab.top_k, tab.temperature, tab.max_new],
        [tab.compare_a, tab.compare_b, tab.compare_plot_a, tab.compare_plot_b],
        api_name="compare",
    )
