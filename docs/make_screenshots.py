"""Screenshots of each tab of the explorer, for the README: `python docs/make_screenshots.py`.

Starts the app on the embedded model and the shipped library, drives it with Debian's chromium
(Playwright, headless) at 1280x800 (a projector), routes the example the Route tab opens on (a
validation row of a held-out task where Arrow helps) and compares it with the base model, adapts
a copy of the library to a held-out task (a few minutes), and writes docs/screenshots/<tab>.png.
Run it again whenever the UI changes.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

OUT = ROOT / "docs" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
FLAGS += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    import app as explorer
    from lorlib_ui.app.layout import launch

    # what `python app.py` serves, with a folder of libraries holding the copy that the Adapt tab changes
    work = Path(tempfile.mkdtemp(prefix="lorlib-screenshot-"))
    copy = work / "library"
    shutil.copytree(ROOT / "assets" / "library", copy)
    app, worker = explorer.create(explorer.parse_args(["--device", "cpu", "--libraries", str(work)]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, "127.0.0.1", port, block=False)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text("Opened").wait_for(timeout=120_000)
            page.get_by_label("Expert", exact=True).click()
            page.get_by_role("option", name="color.rgb", exact=True).click()
            page.wait_for_selector("#expert-spectrum .js-plotly-plot", timeout=180_000)
            page.screenshot(path=OUT / "library.png", full_page=True)
            page.get_by_role("tab", name="Clusters").click()
            page.wait_for_selector("#cluster-umap .js-plotly-plot", timeout=120_000)
            page.wait_for_selector("#cluster-similarity .js-plotly-plot", timeout=120_000)
            page.screenshot(path=OUT / "clusters.png", full_page=True)
            page.get_by_role("tab", name="Route").click()
            page.get_by_role("button", name="Route", exact=True).click()  # the page opens on its example
            page.get_by_text("done in").wait_for(timeout=120_000)
            page.wait_for_selector("#route-logits-plot .js-plotly-plot", timeout=180_000)  # the layer detail follows
            page.get_by_role("button", name="Compare two routers").click()  # with base, the menu's default
            page.wait_for_selector("#route-compare-diff .js-plotly-plot", timeout=120_000)
            page.screenshot(path=OUT / "route.png", full_page=True)
            page.get_by_role("tab", name="Insight").click()
            page.wait_for_selector("#insight-entropy .js-plotly-plot", timeout=120_000)
            page.screenshot(path=OUT / "insight.png", full_page=True)
            for tab in ("Build", "Evaluate"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(1500)
                page.screenshot(path=OUT / f"{tab.lower()}.png", full_page=True)
            adapt_on_a_copy(page, copy)
            page.screenshot(path=OUT / "adapt.png", full_page=True)
            browser.close()
    finally:
        app.close()
        worker.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"screenshots in {OUT}")


def adapt_on_a_copy(page, copy: Path) -> None:
    """A short adaptation (3 methods, 16 shots, 20 steps, 20 test rows) of a held-out task, run
    from the Adapt tab on a copy of the shipped library, so the shipped one stays as it is."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.get_by_label("Library folder").fill(str(copy))
    page.get_by_role("button", name="Open", exact=True).click()
    page.get_by_text(f"Opened {copy}").wait_for(timeout=120_000)
    page.get_by_role("tab", name="Adapt").click()
    page.locator("#adapt-shots").get_by_label("32", exact=True).uncheck()
    page.locator("#adapt-shots").get_by_label("16", exact=True).check()
    for method in ("shared", "poly-full", "lorahub"):
        page.locator("#adapt-methods").get_by_label(method, exact=True).uncheck()
    page.get_by_label("training steps (0: as the library's experts)").fill("20")
    page.get_by_label("number input for test rows scored (at most)").fill("20")
    page.get_by_role("button", name="Adapt", exact=True).click()
    asked = page.get_by_text("again to start it")  # a run estimated over 3 minutes asks for a second press
    try:
        asked.wait_for(timeout=10_000)
        page.get_by_role("button", name="Adapt", exact=True).click()
    except PlaywrightTimeout:
        pass  # short enough to start at once
    page.get_by_text("scored on the test rows").wait_for(timeout=1_800_000)
    for plot in ("#adapt-losses", "#adapt-scores"):  # the results redraw after the job: wait for them
        page.wait_for_selector(f"{plot} .js-plotly-plot", timeout=120_000)
    page.wait_for_function("!document.querySelector('.pending')", timeout=120_000)
    page.wait_for_timeout(1500)


if __name__ == "__main__":
    main()
