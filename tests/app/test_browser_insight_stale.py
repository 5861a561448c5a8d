"""The Insight tab in a real browser after the library changed: the stored results stay on screen,
marked stale with the reason, rather than vanishing. Debian's chromium driven by Playwright
(tests/browser.py: never `playwright install`)."""

import time

from browser import MARKS, pages, served

pytestmark = MARKS


def test_an_expert_added_after_routing_marks_the_insight_view_stale_not_empty(built, tiny_base, tmp_path):
    from conftest import make_adapter

    from lorlib_ui.analysis.routing_stats import RoutingStatsOptions, routing_stats_library
    from lorlib_ui.analysis.transfer import TransferOptions, transfer_library
    from lorlib_ui.core.adapters import read_adapter
    from lorlib_ui.core.library import Library, expert_from_adapter

    transfer_library(str(built), TransferOptions(tasks="held-out", limit=2))
    routing_stats_library(str(built), RoutingStatsOptions(router="arrow@private", tasks="held-out", limit=2))
    time.sleep(1.1)  # the new expert is created a second after the results: expert times count to the second
    library = Library.open(built)
    extra = read_adapter(make_adapter(tmp_path / "extra", tiny_base, seed=80, rank=2, targets=["q_proj", "v_proj"]))
    library.add_experts([(expert_from_adapter("extra", extra, library.base_model), extra)])
    tasks, experts = library.extra["held_out"]["tasks"], Library.open(built).names
    with served(built) as url, pages(url) as open_page:
        page = open_page()
        page.get_by_role("tab", name="Insight").click()
        page.wait_for_selector("#insight-routing .js-plotly-plot", timeout=120_000)
        notes = page.locator("#insight-notes")
        notes.get_by_text("stale: 1 expert added since").wait_for(timeout=60_000)
        assert "press Route the tasks to recompute (under a minute on a CPU)" in notes.inner_text()
        assert "No routing statistics" not in notes.inner_text()
        shown = page.evaluate(
            """() => {
                const plot = document.querySelector('#insight-routing .js-plotly-plot');
                const t = plot._fullData[0];
                return {title: plot.layout.title.text, opacity: t.opacity, rows: t.z.length, cols: t.z[0].length};
            }"""
        )
        assert shown["title"].startswith("<b>stale: 1 expert added since</b>")
        assert shown["opacity"] < 1  # faded
        assert (shown["rows"], shown["cols"]) == (len(tasks), len(experts))  # the new expert's column too
        page.locator("#insight-accuracy .js-plotly-plot").wait_for(timeout=30_000)
        page.locator("#insight-table").get_by_text("stale: 1 expert added since").first.wait_for(timeout=30_000)
        # every title line and legend entry fits its panel (at 1280 px the panels are half width): none is cut
        for panel in ["#insight-transfer", "#insight-routing", "#insight-accuracy"]:
            page.locator(f"{panel} .gtitle").first.wait_for(timeout=30_000)
            spans = page.evaluate(
                """(panel) => {
                    const svg = document.querySelector(panel).getBoundingClientRect();  // it clips what overflows
                    const parts = ['.gtitle', '.gsubtitle', '.legendtext'].map(c => panel + ' ' + c).join(', ');
                    return [...document.querySelectorAll(parts)].map(t => {
                        const box = t.getBoundingClientRect();
                        return {text: t.textContent, left: box.left - svg.left, right: svg.right - box.right};
                    });
                }""",
                panel,
            )
            assert spans and all(s["left"] >= 0 and s["right"] >= 0 for s in spans), (panel, spans)
        # the heatmaps' subtitles say what a star is: no legend sits on their tick labels
        assert not page.locator("#insight-transfer .legendtext, #insight-routing .legendtext").count()
