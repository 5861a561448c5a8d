"""The explorer's page: the library picker above seven tabs, each from its own module, over one
`Worker`.

The UI knows nothing of models or torch: every event asks the worker and draws what comes back
with `lorlib_ui.app.figures`. Every event has a named API endpoint, so `gradio_client` can drive
the app as the browser does. A user's mistake (an empty prompt, a bad path, a malformed upload,
k out of range) shows as a visible error and the app keeps serving. This module assembles the
tabs and wires what spans them: opening a library fills every tab, and an import, a build or an
evaluation reopens it.

Presentation mode (`?present=1`, or the Presentation button) is the page's alone: a class on the
page, larger text by CSS, the header in one line, and plotly's base font raised on every figure
(`PAGE_JS`). Below about 1000 px the columns and side-by-side plots of a row stack (`CSS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from lorlib_ui.app import adapt, build, clusters, evaluate, insight, library, links, route
from lorlib_ui.app.events import bind, shows_errors
from lorlib_ui.worker.api import Worker

CONCURRENCY = 8  # events of one kind served at once; model work still queues at the worker's lock
DOWNLOAD_TTL = 600  # seconds an upload or a download stays in the app's temporary folder
READ_ONLY_NOTE = "This explorer is read-only: it routes and shows; imports, removals, builds and jobs are off."
INTRO = (
    "**lorlib** explores a *library* of LoRA experts over one language model (Ostapenko et al., 2024). "
    "Each expert was trained on one task; **Arrow** routes every token, at every adapted layer, to the "
    "experts whose main direction its hidden state points along, with no extra training."
)
PRESENT_FONT = 16  # px: plotly's base font in presentation mode (its titles are 1.4 times that)
# Run in the browser once the page has loaded: presentation mode from the URL, a switch for the
# Presentation button, and every plotly figure (drawn now or later) given the mode's base font.
PAGE_JS = """
() => {
    const root = document.documentElement;
    const fit = (gd) => {  // a figure's base font: the mode's, or back to its own
        const size = ((gd.layout || {}).font || {}).size;
        if (!window.Plotly || !gd._fullLayout) return;
        if (root.classList.contains("present")) {
            if (size === __FONT__) return;
            gd.dataset.ownFont = size === undefined ? "" : String(size);
            window.Plotly.relayout(gd, {"font.size": __FONT__});
        } else if (gd.dataset.ownFont !== undefined && size === __FONT__) {
            const own = gd.dataset.ownFont;
            delete gd.dataset.ownFont;
            window.Plotly.relayout(gd, {"font.size": own === "" ? null : Number(own)});
        }
    };
    const watch = (gd) => {  // Gradio redraws a figure in place: fit it after every draw
        if (!gd.dataset.fitted && gd.on) {
            gd.dataset.fitted = "1";
            gd.on("plotly_afterplot", () => fit(gd));
        }
        fit(gd);
    };
    const scan = () => document.querySelectorAll(".js-plotly-plot").forEach(watch);
    window.lorlibPresent = (on) => {
        root.classList.toggle("present", on);
        const url = new URL(window.location.href);
        if (on) url.searchParams.set("present", "1");
        else url.searchParams.delete("present");
        window.history.replaceState(null, "", url);
        scan();
    };
    if (new URLSearchParams(window.location.search).get("present") === "1") root.classList.add("present");
    new MutationObserver(scan).observe(document.body, {childList: true, subtree: true});
}
""".replace("__FONT__", str(PRESENT_FONT))
TOGGLE_JS = "() => window.lorlibPresent(!document.documentElement.classList.contains('present'))"
CSS = """
/* presentation mode: 16-18 px text, the header in one short line (the dark theme sets its sizes again) */
html.present, html.present .dark {
    --text-xxs: 12px; --text-xs: 14px; --text-sm: 16px; --text-md: 17px; --text-lg: 18px;
    --text-xl: 22px; --text-xxl: 26px;
}
html.present #page-intro, html.present #page-library { display: none !important; }
html.present #page-title h1 { font-size: var(--text-xl); margin: 0; }
html.present #page-status p { margin: 0; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
html.present #page-status p + p { display: none; }
/* a narrow window (a projector at 900 px): a row's columns and plots stack, each full width */
@media (max-width: 1000px) {
    .row > .column, .row > .block:has(.js-plotly-plot) { min-width: 100% !important; }
}
/* dark mode: HighlightedText writes its legend and labelled tokens in black */
.dark .legend-item, .dark .token.highlighted { color: var(--body-text-color) !important; }
"""


@dataclass
class Page:
    path: gr.State  # the open library
    path_box: gr.Textbox
    open_btn: gr.Button
    status: gr.Markdown
    library: library.LibraryTab
    clusters: clusters.ClustersTab
    route: route.RouteTab
    build: build.BuildTab
    evaluate: evaluate.EvaluateTab
    adapt: adapt.AdaptTab
    insight: insight.InsightTab

    def opened_outputs(self) -> list:
        """What opening a library updates, in the /open_library endpoint's order."""
        return [
            self.path,
            self.status,
            self.library.table,
            self.library.learned,
            self.library.expert_pick,
            self.route.example_pick,
            self.clusters.k,
            self.evaluate.table,
            self.evaluate.differences,
            self.evaluate.verdict,
            self.evaluate.plot,
            self.evaluate.task_plot,
            self.route.router,
            self.route.compare_router,
            self.route.top_k,
            self.build.targets,
            self.build.rank,
            self.route.notes,
            self.route.router_note,
        ]


@shows_errors
def open_library(worker: Worker, page: Page, folder: str) -> dict:
    info = worker.library(folder)
    examples = worker.examples(folder)
    held = f"; held out: {', '.join(info.held_out)}" if info.held_out else ""
    status = f"Opened **{info.path}**: {len(info.experts)} experts on {info.base_model}{held}."
    for name, why in info.problems.items():
        status += f"\n\n⚠ expert **{name}** cannot be used: {why}. Remove it (Library tab, or `lorlib remove`)."
    return {
        page.path: info.path,
        page.status: status,
        **library.opened(page.library, info),
        **clusters.opened(page.clusters, info),
        **route.opened(page.route, info, examples),
        **build.opened(page.build, info),
        **evaluate.opened(page.evaluate, info),
    }


@shows_errors
def import_and_reopen(worker: Worker, page: Page, folder: str, archive: str | None) -> dict:
    library.import_zip(worker, folder, archive)
    return open_library(worker, page, folder)


@shows_errors
def import_hub_and_reopen(worker: Worker, page: Page, folder: str, text: str | None) -> dict:
    library.import_hub(worker, folder, text)
    return open_library(worker, page, folder)


@shows_errors
def remove_and_reopen(worker: Worker, page: Page, folder: str, name: str | None) -> dict:
    library.remove(worker, folder, name)
    return open_library(worker, page, folder)


def build_app(
    worker: Worker,
    library_path: str,
    tasks_by_family: dict[str, list[str]] | None = None,
    read_only: bool = False,
    ttl: int = DOWNLOAD_TTL,
) -> gr.Blocks:
    """The explorer over `worker`, opening `library_path` first; `tasks_by_family` fills the Build
    tab's pickers (the embedded data's families and tasks). `read_only` says so at the top (the
    worker refuses writes); uploads and downloads are deleted `ttl` seconds after they were made."""
    return build_page(worker, library_path, tasks_by_family, read_only, ttl)[0]


def health(worker: Worker) -> dict:
    """Whether the app is up and busy, and no more: no paths, no job ids."""
    state = worker.health()
    busy = bool(state.get("busy") or state.get("jobs_running") or state.get("jobs_queued"))
    return {"up": True, "busy": busy}


def end_session(worker: Worker, request: gr.Request) -> None:
    """A browser tab (or client) went away: its jobs end, except builds it asked to finish."""
    if request is not None and request.session_hash:
        worker.end_session(request.session_hash)


def build_page(
    worker: Worker,
    library_path: str,
    tasks_by_family: dict[str, list[str]] | None = None,
    read_only: bool = False,
    ttl: int = DOWNLOAD_TTL,
) -> tuple[gr.Blocks, Page]:
    """`build_app`, and the page's components (for tests of the handlers)."""
    with gr.Blocks(title="lorlib: LoRA library explorer", delete_cache=(min(60, ttl), ttl)) as app:
        with gr.Row(equal_height=True):
            gr.Markdown("# lorlib: LoRA library explorer", elem_id="page-title")
            present_btn = gr.Button("Presentation", size="sm", scale=0, min_width=120, elem_id="present-toggle")
        present_btn.click(None, js=TOGGLE_JS)
        gr.Markdown(INTRO, elem_id="page-intro")
        if read_only:  # stays in presentation mode, which hides the intro: a class should know
            gr.Markdown(f"*{READ_ONLY_NOTE}*", elem_id="page-read-only")
        path = gr.State(library_path)
        with gr.Row(elem_id="page-library"):
            path_box = gr.Textbox(library_path, label="Library folder", scale=4)
            open_btn = gr.Button("Open", scale=1)
        status = gr.Markdown(elem_id="page-status")
        with gr.Tabs() as tabs:
            page = Page(
                path,
                path_box,
                open_btn,
                status,
                library.build_tab(),
                clusters.build_tab(),
                route.build_tab(),
                build.build_tab(tasks_by_family or {}),
                evaluate.build_tab(worker.comparisons()),
                adapt.build_tab(),
                insight.build_tab(),
            )
        _wire(page, worker, app, tabs)
        gr.Button("health", visible=False).click(
            partial(health, worker), None, gr.JSON(visible=False), api_name="health", queue=False
        )
        app.unload(bind(end_session, worker))
    return app, page


def start_from_link(request: gr.Request) -> tuple:
    """A page opened from a link: the view it asks for, the library to open, the tab to show."""
    link = links.read_link(request)
    return link, link.get("library", gr.update()), gr.Tabs(selected=link["tab"]) if link else gr.update()


def _wire(page: Page, worker: Worker, app: gr.Blocks, tabs: gr.Tabs) -> None:
    reopen, outputs = partial(open_library, worker, page), page.opened_outputs()
    show_expert = library.wire(page.library, worker, page.path)
    show_clusters = clusters.wire(page.clusters, worker, page.path)
    show_insight = insight.wire(page.insight, worker, page.path)
    adapted, show_adaptation = adapt.wire(page.adapt, worker, page.path)

    def redraw(event):  # after the library (re)opens: the picked expert, the cluster view, insight, adapt
        show_expert(event)
        show_insight(event)
        show_adaptation(event)
        return show_clusters(event)

    route.wire(page.route, worker, page.path)
    built = build.wire(page.build, worker, page.path)
    evaluated = evaluate.wire(page.evaluate, worker, page.path)

    redraw(page.open_btn.click(reopen, page.path_box, outputs, api_name="open_library"))
    link = gr.State({})  # the view a page's URL asks for (`links`)
    loaded = app.load(start_from_link, None, [link, page.path_box, tabs], api_visibility="private")
    opened = loaded.then(reopen, page.path_box, outputs, api_visibility="private")
    redraw(opened)
    links.wire_link(page.route, worker, page.path, page.path_box, link, opened)
    imported = page.library.import_btn.click(
        partial(import_and_reopen, worker, page), [page.path, page.library.upload], outputs, api_name="import_adapters"
    )
    redraw(imported)
    from_hub = page.library.hub_btn.click(
        partial(import_hub_and_reopen, worker, page), [page.path, page.library.hub_ids], outputs, api_name="import_hub"
    )
    redraw(from_hub)
    removed = page.library.remove_btn.click(
        partial(remove_and_reopen, worker, page),
        [page.path, page.library.expert_pick],
        outputs,
        api_name="remove_expert",
    )
    redraw(removed)
    redraw(built.then(reopen, page.path, outputs, api_visibility="private"))  # also after a cancel
    evaluated.then(reopen, page.path, outputs, api_visibility="private")
    redraw(adapted.then(reopen, page.path, outputs, api_visibility="private"))  # new experts, routers


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    auth: list[tuple[str, str]] | None = None,
    max_file_size: int = 256 * 10**6,
) -> None:
    """Serve the explorer: bound to `host` only, no share link, system fonts (nothing fetched from
    outside), several events at once, uploads up to `max_file_size` bytes, a login when `auth`
    (user, password) pairs are given. `block=False` returns once it serves (tests, benchmarks)."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=CONCURRENCY)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        theme=theme,
        css=CSS,
        js=PAGE_JS,
        footer_links=["api"],
        prevent_thread_lock=not block,
        quiet=not block,
        auth=auth,
        max_file_size=max_file_size,
    )
