"""The page on a lecturer's screen: presentation mode at 1280x800 (the header in one line, larger
text and figure fonts), a 900 px window (a row's columns stack), the dark theme's token legend,
and a click on a row of the experts table picking that expert. Browser tests drive Debian's
chromium with Playwright (tests/browser.py: never `playwright install`)."""

import gradio as gr
import pytest
from browser import NEEDS_CHROMIUM, pages

from lorlib_ui.app import layout, library


def test_a_click_on_a_row_picks_that_expert():
    with gr.Blocks():
        tab = library.build_tab()
    row = ["task1", "private", "", "", "copy1", 4, "q_proj", 10, 0.5]
    out = library.pick_row(tab, gr.SelectData(None, {"index": [1, 4], "value": "copy1", "row_value": row}))
    assert out[tab.expert_pick]["value"] == "task1"  # whichever cell of the row was clicked
    assert out[tab.summary] == {"__type__": "update", "value": library.LOADING, "visible": True}


@pytest.fixture
def open_page(explorer_url):
    """Opens the explorer at a query and a window size in a new browser tab (its own session);
    afterwards, checks that no tab sent a request anywhere but the app."""
    with pages(explorer_url) as open_page:
        yield open_page


def _route(page) -> None:
    page.get_by_role("tab", name="Route").click()
    page.get_by_label("Prompt").fill("the quick brown")
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("done in").wait_for(timeout=120_000)
    page.wait_for_selector("#route-layer-plot .js-plotly-plot", timeout=60_000)


@pytest.mark.browser
@NEEDS_CHROMIUM
def test_presentation_mode_collapses_the_header_and_enlarges_text_and_figures(open_page):
    page = open_page("?present=1")
    assert page.evaluate("document.documentElement.classList.contains('present')")
    assert not page.locator("#page-intro").is_visible() and not page.get_by_label("Library folder").is_visible()
    tabs_top = page.get_by_role("tab", name="Route").bounding_box()["y"]
    assert tabs_top < 140, f"the header takes {tabs_top:.0f} px"  # ~320 px without presentation mode
    assert page.evaluate("parseFloat(getComputedStyle(document.querySelector('#page-status p')).fontSize)") >= 16
    _route(page)
    size = "document.querySelector('#route-layer-plot .js-plotly-plot')._fullLayout.font.size"
    page.wait_for_function(f"{size} === {layout.PRESENT_FONT}", timeout=30_000)

    # a click on a row of the experts table shows that expert right below it
    page.get_by_role("tab", name="Library").click()
    page.get_by_role("gridcell", name="task2", exact=True).first.click()
    page.locator("#expert-summary").get_by_text("task2").first.wait_for(timeout=60_000)
    assert page.get_by_label("Expert", exact=True).input_value() == "task2"
    page.wait_for_selector("#expert-norms .js-plotly-plot", timeout=60_000)

    # the button turns it off: the header again, the figures at their own font, the URL without it
    page.get_by_role("button", name="Presentation").click()
    page.get_by_label("Library folder").wait_for(timeout=10_000)
    norms = "document.querySelector('#expert-norms .js-plotly-plot')._fullLayout.font.size"
    page.wait_for_function(f"{norms} < {layout.PRESENT_FONT}", timeout=30_000)
    assert "present" not in page.url


@pytest.mark.browser
@NEEDS_CHROMIUM
def test_a_narrow_window_stacks_the_columns_and_the_dark_legend_is_legible(open_page):
    page = open_page("?__theme=dark", viewport={"width": 900, "height": 800})
    _route(page)
    first = page.get_by_label("Prompt").bounding_box()
    second = page.locator("#route-layer-plot").bounding_box()
    assert second["x"] <= first["x"] + 1, f"the second column starts at x={second['x']:.0f}, beside the first"
    assert second["y"] > first["y"] + first["height"]  # below it, at the full width
    assert second["width"] > 0.9 * first["width"]
    page.wait_for_selector(".legend-item", timeout=60_000)
    colours = page.evaluate(
        """() => Array.from(document.querySelectorAll('.legend-item, .token.highlighted'),
                            e => getComputedStyle(e).color.match(/\\d+/g).slice(0, 3).map(Number))"""
    )
    assert colours and all(sum(rgb) > 3 * 180 for rgb in colours), colours  # light on the dark page, not black
