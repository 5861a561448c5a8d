"""The explorer in a real browser: Debian's chromium driven by Playwright (never `playwright install`)."""

import os
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]


@pytest.fixture
def page(explorer_url):
    from playwright.sync_api import sync_playwright

    requests = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(explorer_url)
        page.get_by_text("Opened").wait_for(timeout=60_000)
        yield page
        outside = [u for u in requests if not u.startswith((explorer_url, "data:", "blob:"))]
        assert not outside, f"requests left 127.0.0.1: {outside[:5]}"
        browser.close()


def _plot_data(page, index: int = 0) -> list[dict]:
    """Each trace of the index-th plotly figure on the page, as the browser holds it: its type,
    the shape of z and the number of x values (plotly.js may hold them as typed arrays)."""
    return page.evaluate(
        """i => document.querySelectorAll('.js-plotly-plot')[i]._fullData.map(t => {
            const z = t.z ? Array.from(t.z, row => Array.from(row)) : [];
            return {type: t.type, rows: z.length, cols: z.length ? z[0].length : 0,
                    points: t.x ? Array.from(t.x).length : 0};
        })""",
        index,
    )


def test_every_tab_opens_and_explains_itself(page):
    for tab, words in [
        ("Library", "The experts of the open library"),
        ("Clusters", "Each point is an expert"),
        ("Route", "Type a prompt and pick a router"),
        ("Build", "Train one expert per task"),
        ("Evaluate", "Compare routers zero-shot"),
    ]:
        page.get_by_role("tab", name=tab).click()
        page.get_by_text(words).first.wait_for(timeout=10_000)


def test_route_renders_the_layer_heatmap(page, tiny_routed):
    page.get_by_role("tab", name="Route").click()
    page.get_by_label("Prompt").fill("the quick brown")
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("done in").wait_for(timeout=60_000)
    page.wait_for_selector(".js-plotly-plot", timeout=30_000)
    heatmaps = [d for d in _plot_data(page) if d["type"] == "heatmap"]
    assert heatmaps[0]["rows"] == len(tiny_routed.modules) and heatmaps[0]["cols"] == len(tiny_routed.experts)


def test_clusters_scatter_has_a_point_per_expert(page, tiny_library):
    page.get_by_role("tab", name="Clusters").click()
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 1", timeout=60_000)
    traces = [d for d in _plot_data(page) if d["type"] == "scatter"]
    assert sum(t["points"] for t in traces) == len(tiny_library.experts)


def test_empty_prompt_shows_an_error_and_the_app_keeps_serving(page):
    page.get_by_role("tab", name="Route").click()
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("the prompt is empty").first.wait_for(timeout=30_000)
    page.get_by_label("Prompt").fill("the quick")
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text("done in").wait_for(timeout=60_000)
