"""The explorer in a real browser: Debian's chromium driven by Playwright (never `playwright install`)."""

import math

import pytest
from browser import MARKS, VIEWPORT, chromium, pages, served

pytestmark = MARKS


@pytest.fixture
def open_page(explorer_url):
    """Opens the explorer in a new browser tab (its own session) at 1280x800; afterwards, checks
    that no tab sent a request anywhere but the app."""
    with pages(explorer_url) as open_page:
        yield open_page


@pytest.fixture
def page(open_page):
    return open_page()


def _plot_data(page, where: str) -> list[dict]:
    """Each trace of the plotly figure inside the element `where` (a CSS selector: the plot's
    elem_id), as the browser holds it: its type, the shape of z and the number of x values
    (plotly.js may hold them as typed arrays). Waits for the figure to be drawn."""
    page.wait_for_function(_DRAWN, arg=where, timeout=60_000)
    return page.evaluate(
        """w => document.querySelector(w + ' .js-plotly-plot')._fullData.map(t => {
            const z = t.z ? Array.from(t.z, row => Array.from(row)) : [];
            return {type: t.type, rows: z.length, cols: z.length ? z[0].length : 0,
                    points: t.x ? Array.from(t.x).length : 0};
        })""",
        where,
    )


_DRAWN = "w => { const p = document.querySelector(w + ' .js-plotly-plot'); return p && p._fullData; }"


def test_every_tab_opens_and_explains_itself(page):
    for tab, words in [
        ("Library", "The experts of the open library"),
        ("Clusters", "Each point is an expert"),
        ("Route", "Type a prompt and pick a router"),
        ("Build", "Train one expert per task"),
        ("Evaluate", "Compare routers zero-shot"),
        ("Adapt", "Learn a new task from a few of its examples"),
        ("Insight", "Does routing pick the experts that help?"),
    ]:
        page.get_by_role("tab", name=tab).click()
        page.get_by_text(words).first.wait_for(timeout=10_000)


def test_route_renders_the_layer_heatmap(page, tiny_routed):
    page.get_by_role("tab", name="Route").click()
    page.get_by_label("Prompt").fill("the quick brown")
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("done in").wait_for(timeout=60_000)
    heatmaps = [d for d in _plot_data(page, "#route-layer-plot") if d["type"] == "heatmap"]
    # one panel per module type, every layer a row, every expert a column
    assert sum(h["rows"] for h in heatmaps) == len(tiny_routed.modules)
    assert all(h["cols"] == len(tiny_routed.experts) for h in heatmaps)
    page.get_by_label("Router", exact=True).click()  # the routers on offer include each expert alone
    for name in tiny_routed.experts:
        page.get_by_role("option", name=f"expert:{name}", exact=True).wait_for(timeout=10_000)


def test_clusters_scatter_has_a_point_per_expert(page, tiny_library):
    page.get_by_role("tab", name="Clusters").click()
    traces = [d for d in _plot_data(page, "#cluster-umap") if d["type"] == "scatter"]
    assert sum(t["points"] for t in traces) == len(tiny_library.experts)
    k = int(page.get_by_label("number input for k (number of clusters)").input_value())
    assert len(traces) == k == 2  # one colour per cluster, at the k the slider shows


def test_empty_prompt_shows_an_error_and_the_app_keeps_serving(page):
    page.get_by_role("tab", name="Route").click()
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("the prompt is empty").first.wait_for(timeout=30_000)
    page.get_by_label("Prompt").fill("the quick")
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("done in").wait_for(timeout=60_000)


def _route(page, prompt: str) -> None:
    page.get_by_role("tab", name="Route").click()
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_role("button", name="Route", exact=True).click()


def test_two_tabs_routing_at_once_each_get_their_own_result(open_page, tiny_routed):
    from lorlib_ui.core.generation import generate
    from lorlib_ui.core.routers import make_router

    prompts = ["the quick brown fox", "one two three four five six seven eight nine ten eleven"]
    pages = [open_page() for _ in prompts]
    for page, prompt in zip(pages, prompts):  # both submitted before either finishes
        _route(page, prompt)
    for page, prompt in zip(pages, prompts):
        page.get_by_text("done in").wait_for(timeout=60_000)
        expected = generate(tiny_routed, prompt, make_router("arrow", tiny_routed.experts, 4), max_new_tokens=32)
        shown = page.get_by_label("Generated text").input_value()
        assert shown == expected.text.replace("\r\n", "\n").replace("\r", "\n")  # as a textarea holds it
        # the tokens x experts heatmap of the chosen layer has one row per token of this prompt
        tokens = [d for d in _plot_data(page, "#route-token-plot") if d["type"] == "heatmap"][0]
        assert tokens["rows"] == len(expected.record.tokens)


def test_tiny_build_shows_progress_and_new_experts_appear(page, tasks_file, tiny_library):
    from lorlib_ui.core.library import Library

    before = set(tiny_library.names)
    page.get_by_role("tab", name="Build").click()
    page.locator("input[type=file][accept*='.jsonl']").set_input_files(str(tasks_file))
    page.get_by_text(tasks_file.name).first.wait_for(timeout=30_000)  # the upload has finished
    page.get_by_label("number input for steps per expert").fill("40")
    modules = page.locator("#build-targets").inner_text()
    assert all(m in modules for m in ("q_proj", "k_proj", "v_proj", "o_proj"))  # as the library's experts
    assert page.get_by_label("number input for rank").input_value() == "4"
    page.get_by_role("button", name="Build", exact=True).click()
    bar = page.get_by_role("progressbar").first
    bar.wait_for(timeout=60_000)  # Gradio's progress bar, fed by the worker's job status
    page.get_by_text("trained 6 experts").wait_for(timeout=180_000)
    added = set(Library.open(tiny_library.path).names) - before
    assert added == {f"{kind}{t}" for kind in ("copy", "pick") for t in range(3)}
    page.get_by_role("tab", name="Library").click()
    for name in added:  # the table was refreshed from the library
        page.get_by_role("gridcell", name=name, exact=True).first.wait_for(timeout=30_000)
    page.get_by_role("tab", name="Clusters").click()  # and the UMAP has a point for each of them too
    n = len(before) + len(added)
    page.wait_for_function(
        """n => { const p = document.querySelector('#cluster-umap .js-plotly-plot');
                  return p && p._fullData.reduce((s, t) => s + (t.x ? t.x.length : 0), 0) === n; }""",
        arg=n,
        timeout=60_000,
    )


@pytest.mark.parametrize("case", ["unknown library", "malformed upload", "k above the experts"])
def test_bad_input_shows_an_error_and_changes_nothing(page, tiny_library, tmp_path, case):
    from conftest import library_snapshot

    # Opening the library keeps its MBC Gram matrix in it (derived data, a cache) while the cluster
    # view is computed, after "Opened": the snapshot waits for that view, to hold no write but the test's.
    page.get_by_role("tab", name="Clusters").click()
    page.wait_for_function(_DRAWN, arg="#cluster-umap", timeout=60_000)
    page.get_by_role("tab", name="Library").click()
    before = library_snapshot(tiny_library.path)
    if case == "unknown library":
        page.get_by_label("Library folder").fill(str(tmp_path / "nowhere"))
        page.get_by_role("button", name="Open", exact=True).click()
        page.get_by_text("no library").first.wait_for(timeout=30_000)
        page.get_by_label("Library folder").fill(str(tiny_library.path))  # the app still serves
        page.get_by_role("button", name="Open", exact=True).click()
    elif case == "malformed upload":
        bad = tmp_path / "adapters.zip"
        bad.write_bytes(b"PK\x03\x04 this is not really a zip")
        page.locator("input[type=file][accept='.zip']").set_input_files(str(bad))
        page.get_by_text(bad.name).first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Import", exact=True).click()
        page.get_by_text("not a zip archive").first.wait_for(timeout=30_000)
    else:
        page.get_by_role("tab", name="Clusters").click()
        page.wait_for_function(_DRAWN, arg="#cluster-umap", timeout=60_000)
        box = page.get_by_label("number input for k (number of clusters)")
        box.fill("99")
        box.press("Enter")
        page.get_by_text("99 is greater than maximum value 6").first.wait_for(timeout=30_000)
        box.blur()  # the box then holds the largest k, and the view shows that many clusters
        page.wait_for_function(
            "document.querySelector('#cluster-umap .js-plotly-plot')._fullData.length === 6", timeout=30_000
        )
    _route(page, "still serving")
    page.get_by_text("done in").wait_for(timeout=60_000)
    assert library_snapshot(tiny_library.path) == before


def test_an_empty_library_opens_and_explains_what_it_lacks(page, tiny_base, tiny_library, tmp_path):
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import Library

    empty = Library.create(tmp_path / "empty", base_model_info(str(tiny_base)))
    page.get_by_label("Library folder").fill(str(empty.path))
    page.get_by_role("button", name="Open", exact=True).click()
    page.get_by_text("0 experts on").first.wait_for(timeout=30_000)
    page.get_by_text("clustering needs 2 or more").first.wait_for(timeout=30_000)  # the cluster view says why
    _route(page, "hello")
    page.get_by_text("needs experts, but the library is empty").first.wait_for(timeout=30_000)
    page.get_by_label("Library folder").fill(str(tiny_library.path))  # and the app goes on serving
    page.get_by_role("button", name="Open", exact=True).click()
    _route(page, "hello")
    page.get_by_text("done in").wait_for(timeout=60_000)


ROUTE_PLOTS = ["route-layer-plot", "route-token-plot", "route-logits-plot", "route-compare-a", "route-compare-diff"]


def _visible_plots(page) -> list[str]:
    return [name for name in ROUTE_PLOTS if page.locator(f"#{name}").is_visible()]


def test_route_plots_appear_only_once_filled_with_a_bar_per_expert(page, tiny_routed):
    page.get_by_role("tab", name="Route").click()
    page.get_by_text("Type a prompt and pick a router").wait_for(timeout=10_000)
    assert _visible_plots(page) == [] and not page.get_by_label("Layer", exact=True).is_visible()
    page.get_by_label("Prompt").fill("the quick brown")
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("done in").wait_for(timeout=60_000)
    page.wait_for_selector("#route-logits-plot .js-plotly-plot", timeout=30_000)
    assert _visible_plots(page) == ROUTE_PLOTS[:3]  # the comparison's stay hidden until it runs
    bars = page.locator("#route-logits-plot .bars .point")
    assert bars.count() == len(tiny_routed.experts)  # Arrow over the whole library: every expert
    top_k = int(page.get_by_label("number input for top-k").input_value())
    chosen = page.evaluate(
        """() => document.querySelector('#route-logits-plot .js-plotly-plot')._fullData
                 .filter(t => t.name.startsWith('chosen')).map(t => Array.from(t.x).length)"""
    )
    assert chosen == [top_k]
    page.get_by_role("button", name="Compare two routers").click()
    page.wait_for_selector("#route-compare-diff .js-plotly-plot", timeout=60_000)
    assert _visible_plots(page) == ROUTE_PLOTS
    diff = page.evaluate(
        """() => { const t = document.querySelector('#route-compare-diff .js-plotly-plot')._fullData[0];
                   return {zmin: t.zmin, zmax: t.zmax, cols: Array.from(t.x).length}; }"""
    )
    assert diff["cols"] == len(tiny_routed.experts) and diff["zmin"] == -diff["zmax"] < 0  # centred on 0


def test_the_compare_panes_clear_on_a_new_prompt(page):
    """Route, compare with base (the default), then type another prompt: both routers' answers and
    the comparison's plots go with the prompt they were made for, and the timing line says why."""
    from playwright.sync_api import expect

    from lorlib_ui.app.route import STALE

    _route(page, "the quick brown")
    page.get_by_text("done in").wait_for(timeout=120_000)
    page.get_by_role("button", name="Compare two routers").click()
    page.wait_for_function(  # both answers finished: a timing line each
        "() => (document.querySelector('#route-compare-timing')?.innerText.match(/done in/g) || []).length === 2",
        timeout=120_000,
    )
    page.wait_for_selector("#route-compare-diff .js-plotly-plot", timeout=60_000)
    timing = page.locator("#route-compare-timing").inner_text()
    assert "A (" in timing and "B (base)" in timing, timing
    assert _visible_plots(page) == ROUTE_PLOTS

    # typed key by key: Gradio's Textbox sends its input event on a key press, not on the DOM's
    # input event (so neither `fill` nor a paste from the menu counts as the user's change)
    prompt = page.get_by_label("Prompt")
    prompt.press("ControlOrMeta+a")
    prompt.press_sequentially("one two three")
    page.get_by_text(STALE.strip("*")).first.wait_for(timeout=30_000)
    for label in ("Router A", "Router B"):
        box = page.get_by_label(label, exact=True)
        expect(box).to_be_hidden(timeout=30_000)
        assert box.count() == 0 or box.input_value() == "", f"{label} still shows {box.input_value()!r}"
    assert page.get_by_label("Generated text").input_value() == ""
    assert _visible_plots(page) == []  # the route's plots went too: they were of the old prompt
    compared = ["route-compare-a", "route-compare-b", "route-compare-diff"]
    drawn = [n for n in compared if page.locator(f"#{n} .js-plotly-plot").count()]
    assert drawn == [], f"the comparison's plots are still drawn (hidden): {drawn}"


_TRACES = """ids => ids.flatMap(id => {
    const plot = document.querySelector(id + ' .js-plotly-plot');
    const list = v => (Array.isArray(v) || ArrayBuffer.isView(v)) ? Array.from(v) : v;
    return plot ? plot._fullData.map(t => ({
        name: t.name, orientation: t.orientation || 'v', x: list(t.x) || [], y: list(t.y) || [],
        colour: t.marker && t.marker.color !== undefined ? list(t.marker.color) : (t.line ? t.line.color : null),
    })) : [];
})"""


def _expert_colours(traces: list[dict], experts: list[str]) -> list[tuple[str, str]]:
    """(expert, colour) for each mark a figure colours by expert: a trace named after one expert,
    or the bars or points of a trace coloured one by one, each in its expert's colour (the expert:
    its category, y for horizontal bars, else x). A trace in one colour for a role (the logits
    figure's "chosen", "not chosen") colours no expert."""
    pairs = []
    for trace in traces:
        colour = trace["colour"]
        if trace["name"] in experts and isinstance(colour, str):
            pairs.append((trace["name"], colour))
        elif isinstance(colour, list):
            categories = trace["y"] if trace["orientation"] == "h" else trace["x"]
            pairs += [(name, c) for name, c in zip(categories, colour) if name in experts]
    return pairs


def test_no_two_experts_in_one_route_view_share_a_colour(page, tiny_library):
    """The coloured tokens' legend gives each expert a colour of its own, and so do the tokens;
    a figure of the same view that colours experts gives no two of them one colour."""
    _route(page, "the quick brown")  # its tokens top 5 of the 6 experts at the default layer
    page.get_by_text("done in").wait_for(timeout=120_000)
    page.locator("#route-coloured .legend-item").first.wait_for(timeout=60_000)
    page.wait_for_selector("#route-logits-plot .js-plotly-plot", timeout=60_000)
    page.mouse.move(0, 0)  # a pointer resting on a legend item would dim the other experts' tokens
    shown = page.evaluate(
        """() => ({
            legend: Array.from(document.querySelectorAll('#route-coloured .legend-item'),
                               e => [e.innerText.trim(), getComputedStyle(e).backgroundColor]),
            tokens: Array.from(document.querySelectorAll('#route-coloured .token.highlighted'),
                               e => getComputedStyle(e).backgroundColor),
        })"""
    )
    names = [name for name, _ in shown["legend"]]
    colours = [colour for _, colour in shown["legend"]]
    assert len(names) >= 3 and len(set(names)) == len(names), names  # several experts, each named once
    assert set(names) <= set(tiny_library.names), names
    assert len(set(colours)) == len(colours), f"experts sharing a colour: {shown['legend']}"
    assert set(shown["tokens"]) == set(colours)  # each expert's tokens in its legend colour, none other

    traces = page.evaluate(_TRACES, ["#route-layer-plot", "#route-token-plot", "#route-logits-plot"])
    owners: dict[str, set[str]] = {}
    for expert, colour in _expert_colours(traces, tiny_library.names):
        owners.setdefault(colour.lower(), set()).add(expert)
    shared = {colour: experts for colour, experts in owners.items() if len(experts) > 1}
    assert not shared, f"one colour for several experts in a figure: {shared}"


def test_cluster_similarity_colours_span_the_off_diagonal_cells(page):
    page.get_by_role("tab", name="Clusters").click()
    page.wait_for_selector("#cluster-similarity .js-plotly-plot", timeout=90_000)
    trace = page.evaluate(
        """() => { const t = document.querySelector('#cluster-similarity .js-plotly-plot')._fullData[0];
                   return {zmin: t.zmin, zmax: t.zmax, z: Array.from(t.z, row => Array.from(row))}; }"""
    )
    off = [v for i, row in enumerate(trace["z"]) for j, v in enumerate(row) if i != j]
    assert all(row[i] is None or math.isnan(row[i]) for i, row in enumerate(trace["z"]))  # the diagonal is blank
    assert trace["zmin"] == pytest.approx(min(off)) and trace["zmax"] == pytest.approx(max(off))
    assert trace["zmax"] < 1  # not stretched to the diagonal's 1


def test_expert_detail_appears_when_an_expert_is_picked(page, tiny_library):
    import numpy as np

    from lorlib_ui.app.library import NO_CURVE_IMPORTED
    from lorlib_ui.worker.local import LocalWorker

    assert page.locator("#expert-norms .js-plotly-plot").count() == 0  # no frames before a pick
    assert not page.locator("#expert-nearest").is_visible()
    page.get_by_label("Expert", exact=True).click()
    page.get_by_role("option", name="task3", exact=True).click()
    page.get_by_role("heading", name="task3").wait_for(timeout=60_000)
    page.wait_for_selector("#expert-spectrum .js-plotly-plot", timeout=30_000)
    norms = page.evaluate(
        """() => document.querySelector('#expert-norms .js-plotly-plot')._fullData
                 .map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}))"""
    )
    adapter = tiny_library.load_adapter("task3")
    assert [t["name"] for t in norms] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    for trace in norms:
        assert trace["x"] == [0, 1]
        for layer, shown in zip(trace["x"], trace["y"]):
            a, b = adapter.factors[f"model.layers.{layer}.self_attn.{trace['name']}"]
            assert shown == pytest.approx(2.0 * np.linalg.norm(b.double().numpy() @ a.double().numpy()), rel=1e-5)
    spectrum = page.evaluate(
        """() => { const z = document.querySelector('#expert-spectrum .js-plotly-plot')._fullData[0].z;
                   return Array.from(z, row => Array.from(row)); }"""
    )
    assert np.shape(spectrum) == (16, 2)  # q, k, v, o_proj's σ1..σ4 down, layers 0 and 1 across
    assert all(list(col) == sorted(col, reverse=True) for block in np.split(np.array(spectrum), 4) for col in block.T)
    nearest = LocalWorker(device="cpu").expert_detail(str(tiny_library.path), "task3").nearest
    cells = page.locator("#expert-nearest").inner_text().split()
    rows = cells[cells.index("cosine") + 1 :]  # expert, cosine, expert, cosine, ...
    assert rows[::2] == [name for name, _ in nearest] and "task3" not in rows  # most similar first
    assert [float(c) for c in rows[1::2]] == pytest.approx([round(c, 3) for _, c in nearest], abs=1e-9)
    page.get_by_text(NO_CURVE_IMPORTED).wait_for(timeout=10_000)
    assert not page.locator("#expert-loss").is_visible()  # no empty frame for the missing curve


@pytest.fixture
def judged_url(built):
    """The explorer on a library whose transfer matrix and routing statistics are stored."""
    from lorlib_ui.analysis.routing_stats import RoutingStatsOptions, routing_stats_library
    from lorlib_ui.analysis.transfer import TransferOptions, transfer_library

    transfer_library(str(built), TransferOptions(tasks="held-out", limit=2))
    routing_stats_library(str(built), RoutingStatsOptions(router="arrow@private", tasks="held-out", limit=2))
    with served(built) as url:
        yield url


def test_tiny_adaptation_draws_its_curves_and_scores_and_its_expert_appears(built):
    from lorlib_ui.core.library import Library

    with served(built) as url, pages(url) as open_page:
        page = open_page()
        page.get_by_role("tab", name="Adapt").click()
        page.locator("#adapt-shots").get_by_label("32", exact=True).uncheck()
        page.locator("#adapt-shots").get_by_label("8", exact=True).check()
        for method in ("mu", "shared", "poly-full", "lorahub"):
            page.locator("#adapt-methods").get_by_label(method, exact=True).uncheck()
        page.get_by_label("training steps (0: as the library's experts)").fill("3")
        page.get_by_role("button", name="Adapt", exact=True).click()
        page.get_by_text("scored on the test rows").wait_for(timeout=180_000)
        for plot in ("#adapt-losses", "#adapt-scores"):  # shown once there are results: wait for them drawn
            page.wait_for_function(
                "w => { const p = document.querySelector(w + ' .js-plotly-plot'); return p && p._fullData; }",
                arg=plot,
                timeout=60_000,
            )
        curves = page.evaluate(
            "() => document.querySelector('#adapt-losses .js-plotly-plot')._fullData.map(t => [t.name, t.y.length])"
        )
        assert curves == [["scratch/8", 3], ["poly-router/8", 3]]
        bars = page.evaluate("() => document.querySelector('#adapt-scores .js-plotly-plot')._fullData.map(t => t.name)")
        assert bars == ["arrow", "base", "scratch/8", "poly-router/8"]
        adapted = [e.name for e in Library.open(built).experts if e.kind == "adapted"]
        assert len(adapted) == 1
        page.get_by_role("tab", name="Library").click()  # the table was refreshed from the library
        page.get_by_role("gridcell", name=adapted[0], exact=True).first.wait_for(timeout=30_000)


def test_insight_draws_transfer_and_routing_with_a_cell_per_task_and_expert(judged_url, built):
    from lorlib_ui.core.library import Library

    library = Library.open(built)
    tasks, experts = library.extra["held_out"]["tasks"], library.names
    with pages(judged_url) as open_page:
        page = open_page()
        page.get_by_role("tab", name="Insight").click()
        for plot in ("#insight-transfer", "#insight-routing", "#insight-accuracy", "#insight-entropy"):
            page.wait_for_selector(f"{plot} .js-plotly-plot", timeout=60_000)
        shapes = page.evaluate(
            """() => ['#insight-transfer', '#insight-routing'].map(id => {
                const t = document.querySelector(id + ' .js-plotly-plot')._fullData[0];
                return {rows: t.z.length, cols: t.z[0].length, x: Array.from(t.x), y: Array.from(t.y)};
            })"""
        )
        for shape in shapes:
            assert (shape["rows"], shape["cols"]) == (len(tasks), len(experts))
            assert sorted(shape["y"]) == sorted(tasks)
        assert shapes[0]["x"] == shapes[1]["x"] and shapes[0]["y"] == shapes[1]["y"]  # one order for both
        for task in tasks:  # a row per task (the dataframe also keeps a hidden copy of its cells)
            page.locator(f"#insight-table :text-is('{task}'):visible").first.wait_for(timeout=10_000)


def test_the_route_report_opens_offline_with_its_figures(tiny_routed, tmp_path):
    """The HTML report of one route, opened from the file with every network request refused:
    the page needs nothing outside itself, and plotly draws both figures."""
    from lorlib_ui.app.report import route_report
    from lorlib_ui.core.generation import generate
    from lorlib_ui.core.routers import make_router

    result = generate(tiny_routed, "the quick brown", make_router("arrow", tiny_routed.experts, top_k=2), 4)
    page_html = route_report(result.record, "the <quick> brown", result.text, {"router": "arrow"}, "lib", "abc")
    (tmp_path / "report.html").write_text(page_html)
    refused = []
    with chromium() as browser:
        page = browser.new_context(offline=True, viewport=VIEWPORT).new_page()
        page.route(
            "**/*",
            lambda r: (
                r.continue_() if r.request.url.startswith("file:") else (refused.append(r.request.url), r.abort())
            ),
        )
        page.goto((tmp_path / "report.html").as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2", timeout=30_000)
        assert page.evaluate("typeof window.Plotly") == "object"
        assert "the <quick> brown" in page.inner_text("pre")
    assert not refused, refused


def _route_view(page) -> dict:
    """The answer, the heatmap's numbers and the layer picked, as the browser shows them."""
    heatmap = page.evaluate(
        "() => { const t = document.querySelector('#route-layer-plot .js-plotly-plot')._fullData[0];"
        " return {z: Array.from(t.z, r => Array.from(r)), x: Array.from(t.x)}; }"
    )
    return {"answer": page.get_by_label("Generated text").input_value(), **heatmap}


def test_a_copied_link_reopens_the_view_in_a_fresh_browser(open_page, tiny_routed):
    """Route with settings of one's own, copy the link, open it in a new browser context (no state
    shared): the same library, tab, controls, answer and heatmap."""
    page = open_page()
    page.get_by_role("tab", name="Route").click()
    page.get_by_label("Prompt").fill("the lazy dog & co?")
    page.get_by_label("number input for top-k").fill("2")
    page.get_by_label("number input for max new tokens").fill("5")
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("done in").wait_for(timeout=60_000)
    page.wait_for_selector("#route-layer-plot .js-plotly-plot", timeout=30_000)
    before = _route_view(page)
    page.get_by_role("button", name="Copy link").click()
    page.wait_for_function(
        "() => (document.querySelector('#route-link textarea')?.value || '').includes('prompt=')", timeout=10_000
    )
    link = page.locator("#route-link textarea").input_value()
    assert "tab=route" in link and "k=2" in link and "n=5" in link
    other = page.context.browser.new_context().new_page()
    other.goto(link)
    other.get_by_text("done in").wait_for(timeout=90_000)
    other.wait_for_selector("#route-layer-plot .js-plotly-plot", timeout=30_000)
    assert other.get_by_label("Prompt").input_value() == "the lazy dog & co?"
    assert _route_view(other) == before
    other.context.close()


def test_a_link_with_bad_values_shows_the_controls_error(open_page, explorer_url):
    page = open_page()
    other = page.context.browser.new_context().new_page()
    other.goto(explorer_url + "?tab=route&prompt=hi&k=many")
    other.get_by_text("the link's top-k must be a whole number").first.wait_for(timeout=60_000)
    other.goto(explorer_url + "?tab=route&prompt=hi&router=nonsense")
    other.get_by_text("unknown router").first.wait_for(timeout=60_000)
    other.context.close()
