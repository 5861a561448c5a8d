"""The Route tab: a streamed answer under a router, its routing per layer, each token coloured by
its top expert at a chosen layer, why one token went to its experts (every expert's routing logit,
for Arrow |h·v_e|, Ostapenko et al., 2024, Sec. 4.2), and two routers side by side.

The figures show only the experts the router could use: a router limited to a group of the library
(`arrow@private`) gives the others no weight, but Arrow still scores them, so the group is read
from the router spec and the library's expert kinds (`group_members`)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from lorlib_ui.app import explain_figures, figures, report, routing_figures
from lorlib_ui.app.events import shows_errors
from lorlib_ui.core.record import RoutingRecord
from lorlib_ui.worker.api import MAX_NEW_TOKENS, Example, LibraryInfo, RouteRequest, RouteUpdate, Worker

HELP = (
    "Type a prompt and pick a router. The heatmap shows, for every adapted layer, how much weight "
    "each expert got on average over the tokens; below, pick one layer to see each token's weights and the "
    "text coloured by each token's top expert, and one token to see why it went to its experts: every "
    "expert's routing score there, the chosen ones highlighted with their weights."
)
DEFAULT_ROUTER = "arrow@private"  # Arrow over the task experts, when the library has them
DENSITY = 0.2  # the TIES density the slider starts at: the default of the paper's code

BATCH_HELP = (
    "A `.jsonl` or `.csv` file with a `prompt` column, routed with the router and settings above: for each prompt "
    "its answer, its top experts and its mean routing weight per expert, as CSV. A row that cannot run (empty, not "
    "JSON, too long) says why in its `error` column; the others still run."
)
EXPLAIN_HELP = (
    "Teacher-forces the answer after the prompt under the router: per token its log-probability under the router "
    "and under the base model, and the gain. Then each expert the router chose is taken out in turn (the others "
    "renormalised): what the answer loses without it says which expert earned it. With a router under "
    "*Compare with*, the same answer under that router too."
)


@dataclass
class RouteTab:
    prompt: gr.Textbox
    example_pick: gr.Dropdown
    router: gr.Dropdown
    compare_router: gr.Dropdown
    router_note: gr.Markdown  # what the two chosen routers do, and the routers the library lacks keys for
    notes: gr.State  # {"notes": spec -> line, "missing": spec -> what it lacks}, from the worker
    top_k: gr.Slider
    temperature: gr.Slider
    density: gr.Slider  # TIES: the share of each expert's entries kept
    max_new: gr.Slider
    route_btn: gr.Button
    compare_btn: gr.Button
    merge_btn: gr.Button  # the current static router's merge as a PEFT adapter (a zip)
    merge_file: gr.File
    csv_btn: gr.Button  # the last route's record as CSV, as JSON, or the whole route as an HTML page
    json_btn: gr.Button
    html_btn: gr.Button
    record_file: gr.File
    batch_file: gr.File  # many prompts at once (a .jsonl or .csv upload), and their results
    batch_btn: gr.Button
    batch_note: gr.Markdown
    batch_out: gr.File
    link_btn: gr.Button  # the view as a link (the page URL with the controls as its query)
    link_box: gr.Textbox
    explain_answer: gr.Textbox  # the answer to explain: the generated one, or one the user types
    explain_btn: gr.Button
    explain_table: gr.Dataframe
    explain_gains: gr.Plot
    explain_credit: gr.Plot
    answer: gr.Textbox
    timing: gr.Markdown
    layer_box: gr.Column  # the boxes are hidden until a route (or a comparison) fills them
    layer_plot: gr.Plot
    detail_box: gr.Column
    module_pick: gr.Dropdown
    token_pick: gr.Dropdown
    hide_template: gr.Checkbox  # the chat template's tokens left out of the coloured text and the token menu
    coloured: gr.HighlightedText  # a click on a token picks it in `token_pick`
    token_plot: gr.Plot
    logits_plot: gr.Plot
    compare_box: gr.Column
    compare_a: gr.Textbox
    compare_b: gr.Textbox
    compare_timing: gr.Markdown  # each router's first token and total time, as the route's `timing`
    compare_plot_a: gr.Plot
    compare_plot_b: gr.Plot
    compare_diff: gr.Plot
    record: gr.State
    shown: gr.State  # the names of the experts the record's router could use
    routed_prompt: gr.State  # the prompt of the answers on show (a route's or a comparison's)


def build_tab() -> RouteTab:
    # The plots sit in boxes that stay hidden until a route fills them (an empty frame explains
    # nothing); the boxes, not the plots, are shown, so that API clients get plain figures.
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
                    route_btn = gr.Button("Route", variant="primary")
                    compare_btn = gr.Button("Compare two routers")
                    merge_btn = gr.Button("Download the merge")
                    link_btn = gr.Button("Copy link")
                # the answer right under the buttons: on a 1280x800 projector it stays above the fold
                answer = gr.Textbox(label="Generated text", lines=4, interactive=False)
                timing = gr.Markdown()
                router_note = gr.Markdown(elem_id="route-router-note")
                with gr.Row():
                    top_k = gr.Slider(1, 16, value=4, step=1, label="top-k")
                    temperature = gr.Slider(0.1, 5.0, value=1.0, step=0.1, label="temperature")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=32, step=1, label="max new tokens")
                    density = gr.Slider(0.05, 1.0, value=DENSITY, step=0.05, label="density (ties)")
                link_box = gr.Textbox(
                    label="Link to this view (opening it routes again)", buttons=["copy"], elem_id="route-link"
                )
                merge_file = gr.File(label="The router's merge: a PEFT adapter", interactive=False, visible=False)
            with gr.Column(scale=3, visible=False) as layer_box:
                layer_plot = gr.Plot(show_label=False, elem_id="route-layer-plot")
        with gr.Column(visible=False) as detail_box:
            with gr.Row():
                csv_btn = gr.Button("Download the routing (CSV)", size="sm")
                json_btn = gr.Button("Download the routing (JSON)", size="sm")
                html_btn = gr.Button("Download a report (HTML, opens offline)", size="sm")
            record_file = gr.File(label="Download", interactive=False, visible=False)
            with gr.Row():
                module_pick = gr.Dropdown([], label="Layer", allow_custom_value=False)
                token_pick = gr.Dropdown([], label="Token (why these experts)", allow_custom_value=False)
                hide_template = gr.Checkbox(True, label="hide the chat template")
            coloured = gr.HighlightedText(
                label="Tokens coloured by their top expert at this layer (click one to see why)",
                show_legend=True,
                elem_id="route-coloured",
            )
            with gr.Row():
                token_plot = gr.Plot(show_label=False, elem_id="route-token-plot")
                logits_plot = gr.Plot(show_label=False, elem_id="route-logits-plot")
        with gr.Accordion("Many prompts at once", open=False):
            gr.Markdown(BATCH_HELP)
            with gr.Row():
                batch_file = gr.File(label="Prompts (.jsonl or .csv)", file_types=[".jsonl", ".csv"], type="filepath")
                batch_btn = gr.Button("Route them all")
            batch_note = gr.Markdown()
            batch_out = gr.File(label="Results (CSV)", interactive=False, visible=False)
        with gr.Accordion("Explain an answer: which expert earned it?", open=False):
            gr.Markdown(EXPLAIN_HELP)
            explain_answer = gr.Textbox(label="Answer to explain (empty: the router's own)", lines=2)
            explain_btn = gr.Button("Explain")
            explain_table = gr.Dataframe(interactive=False, wrap=True, label="Per answer token")
            with gr.Row():
                explain_gains = gr.Plot(show_label=False, elem_id="route-explain-gains")
                explain_credit = gr.Plot(show_label=False, elem_id="route-explain-credit")
        with gr.Column(visible=False) as compare_box:
            with gr.Row():
                compare_a = gr.Textbox(label="Router A", lines=4, interactive=False)
                compare_b = gr.Textbox(label="Router B", lines=4, interactive=False)
            compare_timing = gr.Markdown(elem_id="route-compare-timing")
            # one under the other: each has a panel per module type, too wide for half the page
            compare_plot_a = gr.Plot(show_label=False, elem_id="route-compare-a")
            compare_plot_b = gr.Plot(show_label=False, elem_id="route-compare-b")
            compare_diff = gr.Plot(show_label=False, elem_id="route-compare-diff")
        record = gr.State(None)  # inside the tab: a Tabs block holds only tabs
        shown = gr.State(None)
        routed_prompt = gr.State(None)
        notes = gr.State({})
    return RouteTab(
        prompt=prompt,
        example_pick=example_pick,
        router=router,
        compare_router=compare_router,
        router_note=router_note,
        notes=notes,
        top_k=top_k,
        temperature=temperature,
        density=density,
        max_new=max_new,
        route_btn=route_btn,
        compare_btn=compare_btn,
        merge_btn=merge_btn,
        merge_file=merge_file,
        csv_btn=csv_btn,
        json_btn=json_btn,
        html_btn=html_btn,
        record_file=record_file,
        batch_file=batch_file,
        batch_btn=batch_btn,
        batch_note=batch_note,
        batch_out=batch_out,
        link_btn=link_btn,
        link_box=link_box,
        explain_answer=explain_answer,
        explain_btn=explain_btn,
        explain_table=explain_table,
        explain_gains=explain_gains,
        explain_credit=explain_credit,
        answer=answer,
        timing=timing,
        layer_box=layer_box,
        layer_plot=layer_plot,
        detail_box=detail_box,
        module_pick=module_pick,
        token_pick=token_pick,
        hide_template=hide_template,
        coloured=coloured,
        token_plot=token_plot,
        logits_plot=logits_plot,
        compare_box=compare_box,
        compare_a=compare_a,
        compare_b=compare_b,
        compare_timing=compare_timing,
        compare_plot_a=compare_plot_a,
        compare_plot_b=compare_plot_b,
        compare_diff=compare_diff,
        record=record,
        shown=shown,
        routed_prompt=routed_prompt,
    )


def opened(tab: RouteTab, info: LibraryInfo, examples: list[Example]) -> dict:
    """The routers the worker offers for this library, top-k up to its size, its example prompts
    (labelled by their question, with their verdict where known) and their reference answers."""
    n = len(info.experts)
    default = DEFAULT_ROUTER if DEFAULT_ROUTER in info.routers else (info.routers or [None])[0]
    demo = info.demo if info.demo and info.demo["router"] in info.routers else None
    notes = {"notes": info.router_notes, "missing": info.routers_missing, "demo": demo}
    notes["families"] = {e["name"]: e.get("family") for e in info.experts}  # each expert's colour (`token_colours`)
    references = {info.demo["prompt"].strip(): info.demo["expected"]} if info.demo else {}
    notes["references"] = references | {e.prompt.strip(): e.expected for e in examples}  # prompt -> answer
    default = demo["router"] if demo else default
    shown = {
        tab.example_pick: gr.Dropdown(choices=[(e.label, e.prompt) for e in examples], value=None),
        tab.router: gr.Dropdown(choices=info.routers, value=default),
        tab.compare_router: gr.Dropdown(choices=info.routers, value="base"),
        tab.top_k: gr.Slider(1, max(n, 2), value=min(4, max(n, 1)), step=1),
        tab.notes: notes,
        tab.router_note: router_note(default, "base", notes),
    }
    if demo:  # the page opens on an example where the library visibly helps (`links.restore_controls`): say so
        shown[tab.router_note] = demo_note(demo) + "\n\n" + shown[tab.router_note]
    return shown


def demo_note(demo: dict) -> str:
    """One line on what the opening example shows."""
    return (
        f"*This example is from {demo['task']}, a task no expert was trained on: {demo['router']} answers "
        f'"{demo["answer"].strip()}", as expected; the base model alone answers "{demo["base_answer"].strip()}". '
        "Route it, then compare with base.*"
    )


def router_note(spec: str | None, other: str | None, notes: dict) -> str:
    """Markdown: one line on each chosen router, then the routers this library cannot run yet,
    each with what it lacks and the command that computes it."""
    lines = [f"**{s}**: {notes.get('notes', {}).get(s, 'a router spec')}" for s in dict.fromkeys([spec, other]) if s]
    missing = notes.get("missing") or {}
    if missing:
        items = "".join(f"<li><code>{s}</code>: {why}</li>" for s, why in missing.items())
        summary = f"<summary>Not available for this library yet ({len(missing)})</summary>"
        lines.append(f"<details>{summary}<ul>{items}</ul></details>")
    return "\n\n".join(lines)


def group_members(spec: str, experts: list[dict]) -> set[str] | None:
    """The experts a router spec limits itself to: for `arrow@private`, the names of the library's
    experts of kind private (`experts` as in `LibraryInfo.experts`); for `@general`, those marked
    general, whatever their kind (general is a flag beside the kind); None for a spec without a group."""
    _, at, group = spec.partition("@")
    if not at:
        return None
    return {e["name"] for e in experts if (e.get("general") if group == "general" else e.get("kind") == group)}


def default_token(record: RoutingRecord, n_prompt_tokens: int) -> int | None:
    """The token whose routing to explain first: the first generated one (where the answer
    starts); with none generated, the last of the user's own text (the chat template's are not
    it); with a prompt count that does not fit the record, the first; None for a record of no token."""
    if not record.tokens:
        return None
    if not 0 < n_prompt_tokens <= len(record.tokens):
        return 0
    if n_prompt_tokens < len(record.tokens):
        return n_prompt_tokens
    own = [i for i in record.content_tokens() if i < n_prompt_tokens]
    return own[-1] if own else n_prompt_tokens - 1


def shown_tokens(record: RoutingRecord, hide_template: bool) -> list[int]:
    """The record's tokens that the coloured text and the token menu show, in order: all of them,
    or all but the chat template's."""
    return record.content_tokens() if hide_template else list(range(len(record.tokens)))


def clicked_token(record: RoutingRecord | None, hide_template: bool, evt: gr.SelectData):
    """The token a click on the coloured text picks: the clicked segment is the index-th token shown."""
    shown = shown_tokens(record, hide_template) if record is not None else []
    index = evt.index if isinstance(evt.index, int) else -1
    return shown[index] if 0 <= index < len(shown) else gr.skip()


def reference(notes: dict | None, text: str | None) -> str | None:
    """The reference answer of a prompt that is one of the library's examples, else None."""
    return ((notes or {}).get("references") or {}).get((text or "").strip())


def _request(folder, text, spec, k, temp, max_tokens, density=None, expected=None) -> RouteRequest:
    density = None if density is None else float(density)
    return RouteRequest(
        folder, text, spec, int(k), float(temp), max_new_tokens=int(max_tokens), density=density, expected=expected
    )


def answer_note(update: RouteUpdate) -> str:
    """Why a finished answer is empty, where it is: the model stopped at once, or wrote only blanks."""
    if not update.done or update.text.strip():
        return ""
    n = update.answer_tokens
    if n == 0:
        return "stopped after 0 tokens (the model's first token ended the answer)"
    return "an empty answer" + (f": {n} tokens of white space" if n else "")


def reference_line(expected: str, marks: list[tuple[str, bool | None]]) -> str:
    """'reference: «took» · arrow@private ✓': the reference answer, and each answer graded against it
    (by the worker, as the evaluation grades)."""
    graded = " / ".join(f"{name} {'?' if ok is None else '✓' if ok else '✗'}" for name, ok in marks)
    return f"reference: «{expected.strip()}» · {graded}"


def timing_note(update: RouteUpdate) -> str:
    """How long a route took so far: its first token, and once done its total (and a cut prompt)."""
    note = f"first token after {update.first_token_s:.2f} s"
    if not update.done:
        return note
    note += f", done in {update.total_s:.2f} s"
    if update.truncated:
        note += " (the prompt was cut from the left to fit " + (
            f"this explorer's limit of {update.prompt_limit} tokens)" if update.prompt_limit else "the model's context)"
        )
    return note


@shows_errors
def route(worker: Worker, tab: RouteTab, folder, text, spec, k, temp, max_tokens, density=DENSITY, notes=None):
    """Stream the answer; at the end, the routing heatmap and the layers and tokens to inspect, and
    for one of the library's examples (`notes`) its reference answer and whether the answer is it."""
    expected = reference(notes, text)
    for update in worker.route(_request(folder, text, spec, k, temp, max_tokens, density, expected)):
        if not update.done:
            yield {tab.answer: update.text, tab.timing: timing_note(update)}
            continue
        graded = reference_line(expected, [(spec, update.correct)]) if expected is not None else ""
        record, note = update.record, "  \n".join(filter(None, [timing_note(update), answer_note(update), graded]))
        shown = routing_figures.shown_experts(record, group_members(spec, worker.library(folder).experts))
        default = record.modules[len(record.modules) // 2] if record.modules else None
        tokens = [(label, i) for i, label in enumerate(routing_figures.token_labels(record))]
        yield {
            tab.routed_prompt: text,
            tab.answer: update.text,
            tab.timing: note,
            tab.layer_plot: routing_figures.layer_heatmap(record, shown),
            tab.layer_box: gr.Column(visible=True),
            tab.detail_box: gr.Column(visible=True),
            tab.record: record,
            tab.shown: shown,
            tab.module_pick: gr.Dropdown(choices=[(figures.short_module(m), m) for m in record.modules], value=default),
            tab.token_pick: gr.Dropdown(choices=tokens, value=default_token(record, update.n_prompt_tokens)),
        }


def layer_detail(
    tab: RouteTab,
    record: RoutingRecord | None,
    module: str | None,
    token,
    shown,
    notes: dict | None = None,
    hide_template: bool = True,
) -> dict:
    """One layer: the tokens coloured by their top expert (in its family's colour, from `notes`),
    without the chat template's unless asked (and so the token menu), their weights, and the
    picked token's logits."""
    if record is None or not module:
        return {tab.coloured: None, tab.token_plot: None, tab.logits_plot: None}
    pairs, colours = routing_figures.token_colours(record, module, (notes or {}).get("families"))
    kept = shown_tokens(record, hide_template)
    pairs = [pairs[i] for i in kept]
    used = {expert for _, expert in pairs}
    picked = None if token is None else int(token)
    menu = sorted({*kept, picked} - {None})  # a picked template token (from a link) stays pickable
    labels = routing_figures.token_labels(record)
    return {
        tab.coloured: gr.HighlightedText(pairs, color_map={e: c for e, c in colours.items() if e in used}),
        tab.token_pick: gr.Dropdown(choices=[(labels[i], i) for i in menu], value=picked),
        tab.token_plot: routing_figures.token_heatmap(record, module, shown or None, kept),
        **token_detail(tab, record, module, token, shown),
    }


def token_detail(tab: RouteTab, record: RoutingRecord | None, module: str | None, token, shown) -> dict:
    """Why one token at one layer went to its experts: every shown expert's routing logit."""
    if record is None or not module or token is None or not 0 <= int(token) < len(record.tokens):
        return {tab.logits_plot: None}
    return {tab.logits_plot: routing_figures.expert_logits(record, module, int(token), shown or None)}


def cleared_compare(tab: RouteTab) -> dict:
    """The comparison emptied and hidden: nothing of an earlier prompt or earlier settings stays."""
    return {
        tab.compare_a: "",
        tab.compare_b: "",
        tab.compare_timing: "",
        tab.compare_plot_a: None,
        tab.compare_plot_b: None,
        tab.compare_diff: None,
        tab.compare_box: gr.Column(visible=False),
    }


STALE = "*The prompt or a setting changed: press Route (or Compare) again.*"


def stale(tab: RouteTab, record: RoutingRecord | None, answer: str | None, compared: str | None) -> dict:
    """After the prompt, router A or a setting changed: the answers and plots on show were made
    with the old ones, so they go, and the timing line says why. The route's record goes too (its
    downloads would pair it with the new settings). Nothing changes where nothing is shown."""
    if record is None and not answer and not compared:
        return gr.skip()
    hidden = gr.Column(visible=False)
    route_cleared = {tab.answer: "", tab.timing: STALE, tab.layer_plot: None, tab.record: None, tab.shown: None}
    return cleared_compare(tab) | route_cleared | {tab.layer_box: hidden, tab.detail_box: hidden}


def stale_prompt(
    tab: RouteTab, text: str | None, routed: str | None, record: RoutingRecord | None, answer, compared
) -> dict:
    """After the prompt changed, however it changed (typed, deleted, pasted, dropped, an example
    picked): `stale`, unless it is back to the prompt of the answers on show."""
    if (text or "").strip() == (routed or "").strip():
        return gr.skip()
    return stale(tab, record, answer, compared)


def stale_compare(tab: RouteTab, compared: str | None) -> dict:
    """After router B changed: only the comparison was made with it."""
    return cleared_compare(tab) if compared else gr.skip()


@shows_errors
def compare(
    worker: Worker, tab: RouteTab, folder, text, spec_a, spec_b, k, temp, max_tokens, density=DENSITY, notes=None
):
    """Both routers' answers, streamed one after the other with their timing, each one's routing
    per layer, and where their mean weights differ over the experts both can use; for one of the
    library's examples (`notes`), its reference answer and whether each answer is it."""
    info = worker.library(folder)
    yield cleared_compare(tab) | {tab.compare_box: gr.Column(visible=True), tab.routed_prompt: text}
    expected = reference(notes, text)
    records, groups, times, marks = [], [], [], []
    for side, spec, answer, plot in (
        ("A", spec_a, tab.compare_a, tab.compare_plot_a),
        ("B", spec_b, tab.compare_b, tab.compare_plot_b),
    ):
        for update in worker.route(_request(folder, text, spec, k, temp, max_tokens, density, expected)):
            line = f"**{side}** ({spec}): {timing_note(update)}"
            if not update.done:
                yield {answer: update.text, tab.compare_timing: "  \n".join([*times, line])}
                continue
            times.append(" — ".join(filter(None, [line, answer_note(update)])))
            marks.append((side, update.correct))
            if expected is not None and len(marks) == 2:
                times.append(reference_line(expected, marks))
            groups.append(group_members(spec, info.experts))
            records.append(update.record)
            shown = routing_figures.shown_experts(update.record, groups[-1])
            yield {
                answer: update.text,
                plot: routing_figures.layer_heatmap(update.record, shown),
                tab.compare_timing: "  \n".join(times),
            }
    yield {tab.compare_diff: routing_figures.difference_heatmap(*records, members_a=groups[0], members_b=groups[1])}


@shows_errors
def merge(worker: Worker, folder: str, router: str | None, density: float) -> dict:
    """The chosen router's merge, for download: a PEFT adapter that applies what the router does
    (a static router only: uniform, mean_delta, ties, one expert; a per-token router is refused
    with a pointer to PEFT's Arrow)."""
    if not router:
        raise gr.Error("pick a router first")
    return gr.update(value=worker.export_merge(folder, router, density=density), visible=True)


@shows_errors
def explain(worker: Worker, tab: RouteTab, folder, text, answer, spec, compare_spec, k, temp, max_tokens, density):
    """The answer (typed, or the router's own) token by token: its gain over the base model, the
    top experts, and what it loses without each chosen expert; against the compared router too."""
    request = _request(folder, text, spec, k, temp, max_tokens, density)
    shown = worker.explain(request, answer or None, compare_spec or None)
    return {
        tab.explain_answer: shown["answer"],
        tab.explain_table: explain_figures.token_table(shown),
        tab.explain_gains: explain_figures.token_gains(shown),
        tab.explain_credit: explain_figures.credit_bars(shown),
    }


@shows_errors
def download_record(
    worker: Worker, kind: str, folder, record: RoutingRecord | None, text, answer, spec, k, temp, max_tokens, shown
) -> dict:
    """The last route as a file: its record as CSV or JSON, or the whole route as an HTML page."""
    if record is None:
        raise gr.Error("route a prompt first")
    out = Path(tempfile.mkdtemp(prefix="lorlib-record-")) / f"routing.{kind}"
    if kind == "csv":
        out.write_text(record.to_csv(), encoding="utf-8")
    elif kind == "json":
        out.write_text(json.dumps(record.to_json()), encoding="utf-8")
    else:
        info = worker.library(folder)
        settings = {"router": record.router, "top-k": k, "temperature": temp, "max new tokens": max_tokens}
        page = report.route_report(record, text, answer, settings, info.path, info.fingerprint, shown or None)
        out.write_text(page, encoding="utf-8")
    return gr.update(value=str(out), visible=True)


@shows_errors
def route_batch(
    worker: Worker,
    tab: RouteTab,
    folder,
    file,
    spec,
    k,
    temp,
    max_tokens,
    density,
    progress=gr.Progress(),  # noqa: B008 (Gradio fills it in)
):
    """Every prompt of the uploaded file under the chosen router, with progress; then the CSV."""
    if not file:
        raise gr.Error("upload a .jsonl or .csv file with a prompt column first")
    last = {}
    for last in worker.route_batch(_request(folder, "-", spec, k, temp, max_tokens, density), file):
        progress((last["done"], last["total"]), desc="prompts routed", unit="prompts")
    note = f"routed {last['total'] - last['errors']} prompts; {last['errors']} rows could not run (see `error`)"
    return {tab.batch_note: note, tab.batch_out: gr.update(value=last["file"], visible=True)}


def wire(tab: RouteTab, worker: Worker, path: gr.State) -> None:
    detail_inputs = [tab.record, tab.module_pick, tab.token_pick, tab.shown]
    detail_outputs = [tab.coloured, tab.token_pick, tab.token_plot, tab.logits_plot]
    routed = tab.route_btn.click(
        partial(route, worker, tab),
        [path, tab.prompt, tab.router, tab.top_k, tab.temperature, tab.max_new, tab.density, tab.notes],
        [
            tab.answer,
            tab.timing,
            tab.layer_plot,
            tab.record,
            tab.module_pick,
            tab.token_pick,
            tab.shown,
            tab.layer_box,
            tab.detail_box,
            tab.routed_prompt,
        ],
        api_name="route",
    )
    # after each route, whether or not the default layer changed; then on the user's picks
    layer_inputs = [*detail_inputs, tab.notes, tab.hide_template]  # the notes hold each expert's family
    routed.success(partial(layer_detail, tab), layer_inputs, detail_outputs, api_visibility="private")
    for control in (tab.module_pick, tab.hide_template):
        control.input(partial(layer_detail, tab), layer_inputs, detail_outputs, api_visibility="private")
    tab.token_pick.input(partial(token_detail, tab), detail_inputs, tab.logits_plot, api_visibility="private")
    pick_inputs = [tab.record, tab.hide_template]
    clicked = tab.coloured.select(clicked_token, pick_inputs, tab.token_pick, api_visibility="private")
    clicked.success(partial(token_detail, tab), detail_inputs, tab.logits_plot, api_visibility="private")
    tab.example_pick.change(lambda p: p or gr.skip(), tab.example_pick, tab.prompt, api_visibility="private")
    for menu in (tab.router, tab.compare_router):
        menu.input(router_note, [tab.router, tab.compare_router, tab.notes], tab.router_note, api_visibility="private")
    for kind, button in (("csv", tab.csv_btn), ("json", tab.json_btn), ("html", tab.html_btn)):
        inputs = [path, tab.record, tab.prompt, tab.answer, tab.router, tab.top_k, tab.temperature, tab.max_new]
        button.click(
            partial(download_record, worker, kind), [*inputs, tab.shown], tab.record_file, api_name=f"download_{kind}"
        )
    settings = [tab.top_k, tab.temperature, tab.max_new, tab.density]  # what every model request sends
    explained = [tab.explain_answer, tab.explain_table, tab.explain_gains, tab.explain_credit]
    tab.explain_btn.click(
        partial(explain, worker, tab),
        [path, tab.prompt, tab.explain_answer, tab.router, tab.compare_router, *settings],
        explained,
        api_name="explain",
    )
    batch_inputs = [path, tab.batch_file, tab.router, tab.top_k, tab.temperature, tab.max_new, tab.density]
    tab.batch_btn.click(
        partial(route_batch, worker, tab), batch_inputs, [tab.batch_note, tab.batch_out], api_name="route_batch"
    )
    merge_inputs = [path, tab.router, tab.density]
    tab.merge_btn.click(partial(merge, worker), merge_inputs, tab.merge_file, api_name="export_merge")
    tab.compare_btn.click(
        partial(compare, worker, tab),
        [path, tab.prompt, tab.router, tab.compare_router, *settings, tab.notes],
        [*cleared_compare(tab), tab.routed_prompt],
        api_name="compare",
    )
    wire_stale(tab)


def wire_stale(tab: RouteTab) -> None:
    """What the user's change of prompt, routers or settings leaves behind is cleared at once, and
    a new route starts by clearing the comparison of the prompt before. Menus and sliders clear on
    `input` (the user's own changes: a link restoring the controls routes afresh); the prompt on any
    `change` that leaves it unlike the routed one, since Gradio's textbox sends `input` only for
    typed characters, not for deleting, pasting or dropping text."""
    cleared = list(cleared_compare(tab))
    quick = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    tab.route_btn.click(partial(cleared_compare, tab), None, cleared, **quick)
    route_shown = [tab.answer, tab.timing, tab.layer_plot, tab.record, tab.shown, tab.layer_box, tab.detail_box]
    shown_now = [tab.record, tab.answer, tab.compare_a]
    controls = (tab.example_pick, tab.router, tab.top_k, tab.temperature, tab.max_new, tab.density)
    for control in controls:
        control.input(partial(stale, tab), shown_now, [*cleared, *route_shown], **quick)
    prompt_inputs = [tab.prompt, tab.routed_prompt, *shown_now]
    tab.prompt.change(partial(stale_prompt, tab), prompt_inputs, [*cleared, *route_shown], **quick)
    tab.compare_router.input(partial(stale_compare, tab), tab.compare_a, cleared, **quick)
