"""The Route tab's examples in a real browser (Debian's chromium driven by Playwright): pick the
first example, route it, see its reference answer and the mark; click a token of the coloured text
and see the token menu pick it."""

import re

import pytest
from browser import MARKS, pages, served

pytestmark = MARKS
FIRST = "fox (copy0) — ✓ arrow ✗ base, picked on validation rows"


@pytest.fixture
def examples_url(tiny_library, tmp_path):
    """The explorer on the tiny library, holding out two tasks, with one stored example where the
    router helps (its answers made up: the menu only reads them)."""
    from test_route_examples import _prompt, held_out_library

    library = held_out_library(tiny_library, tmp_path)
    stored = {"task": "copy0", "split": "validation", "prompt": _prompt("copy0", "fox"), "expected": "fox"}
    with library.edit() as current:
        current.extra["examples"] = [
            {**stored, "router": "arrow", "answer": "fox", "base_answer": "no", "kind": "helps"}
        ]
    with served(library.path) as url:
        yield url


@pytest.fixture
def page(examples_url):
    """The explorer in a new browser tab at 1280x800; afterwards, checks that it sent no request
    anywhere but the app."""
    with pages(examples_url) as open_page:
        yield open_page()


def test_an_example_routes_with_its_reference_and_a_click_on_a_token_picks_it(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Route").click()
    page.get_by_label("Examples from held-out tasks").click()
    page.get_by_role("option", name=FIRST, exact=True).click()
    expect(page.get_by_label("Prompt")).to_have_value(re.compile("The word: fox"), timeout=30_000)
    page.get_by_role("button", name="Route", exact=True).click()
    page.get_by_text(re.compile(r"reference: «fox» · arrow [✓✗]")).wait_for(timeout=120_000)
    tokens, menu = page.locator("#route-coloured .token"), page.get_by_label("Token (why these experts)")
    tokens.first.wait_for(timeout=60_000)
    expect(menu).to_have_value(re.compile(r"^[1-9]\d*: "), timeout=30_000)  # the first generated token
    tokens.first.click()
    expect(menu).to_have_value(re.compile(r"^0: "), timeout=60_000)  # the clicked one: the prompt's first
