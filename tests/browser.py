"""What every browser test needs: the explorer served on a free local port (`served`), and Debian's
chromium driven by Playwright (never `playwright install`), whose tabs open at the issue's 1280x800
projector and are checked, when the browser closes, to have requested nothing outside the app
(`pages`). A browser test module sets `pytestmark = MARKS`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the served app must not call home either

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
VIEWPORT = {"width": 1280, "height": 800}  # the projector of a lecture room
OPENED_MS = 120_000  # the page says "Opened" once the library has loaded: slow on a busy machine
NEEDS_CHROMIUM = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
MARKS = [pytest.mark.browser, NEEDS_CHROMIUM]


@contextmanager
def served(library: str | Path, tasks_by_family: dict[str, list[str]] | None = None, worker=None) -> Iterator[str]:
    """The explorer over `worker` (an in-process one on the CPU by default), opening `library`,
    served on a free local port: yields its URL, and closes the app afterwards."""
    from conftest import free_port

    from lorlib_ui.app.layout import build_app, launch
    from lorlib_ui.worker.local import LocalWorker

    app = build_app(worker or LocalWorker(device="cpu"), str(library), tasks_by_family)
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@contextmanager
def chromium():
    """Debian's chromium, headless, driven by Playwright; closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def pages(url: str, viewport: dict[str, int] = VIEWPORT) -> Iterator[Callable]:
    """Yields `open_page(query="", viewport=...)`, which opens `url` + `query` in a new tab of its
    own browser context (no session shared), at `viewport` unless told another, and returns it
    once the page says "Opened". Afterwards, checks that none of these tabs sent a request
    anywhere but the app (the page's own data: and blob: URLs aside)."""
    requested: list[str] = []
    with chromium() as browser:

        def open_page(query: str = "", viewport: dict[str, int] = viewport):
            page = browser.new_context(viewport=viewport).new_page()
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url + query)
            page.get_by_text("Opened").wait_for(timeout=OPENED_MS)
            return page

        yield open_page
    outside = [u for u in requested if not u.startswith((url, "data:", "blob:"))]
    assert not outside, f"requests left 127.0.0.1: {outside[:5]}"
