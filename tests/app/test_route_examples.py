"""The Route tab's examples: picked on validation rows where the router helps and where it fails
(`lorlib_ui.analysis.demo`), offered by the worker labelled by their question, graded against their
reference after a route; and the token view: the first generated token first, the chat template
hidden, a click on a token picking it."""

import json
import os
import shutil

import gradio as gr
import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from test_handlers import _compared  # noqa: E402  (what a streamed event leaves on the page)

from lorlib_ui.analysis import demo  # noqa: E402
from lorlib_ui.app import layout, route  # noqa: E402
from lorlib_ui.core.library import Library  # noqa: E402
from lorlib_ui.core.record import RoutingRecord  # noqa: E402
from lorlib_ui.worker.api import Example, RouteRequest, RouteUpdate  # noqa: E402
from lorlib_ui.worker.local import LocalWorker  # noqa: E402

VALIDATION = ["fox", "dog", "lazy", "brown"]  # the fake router: right but on "dog"; the base: right on "dog" only
TEST = ["quick", "model"]
TASKS = ["copy0", "copy1"]
MODULE = "model.layers.0.self_attn.q_proj"


def _prompt(task: str, word: str) -> str:
    return f"Copy the last word of this prompt ({task}).\n\nThe word: {word}\nAnswer with one word."


def _word(prompt: str) -> str:
    return prompt.split("The word: ")[1].split()[0]


def held_out_library(library: Library, tmp_path) -> Library:
    """`library` holding out two tasks whose rows are in a data file: train, validation and test."""
    rows = []
    for task in TASKS:
        for split, words in (("train", ["arrow"]), ("validation", VALIDATION), ("test", TEST)):
            rows += [
                {"task": task, "family": "copy", "input": _prompt(task, w), "output": w, "split": split} for w in words
            ]
    data = tmp_path / "held.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with library.edit() as current:
        current.extra["held_out"] = {"data": str(data), "tasks": TASKS}
    return library


@pytest.fixture
def held(tiny_library, tmp_path):
    return held_out_library(tiny_library, tmp_path)


@pytest.fixture
def fake_answers(monkeypatch):
    """Greedy answers made up per router (the tiny model's own are noise); the prompts asked, kept."""
    asked = []

    def generate_batch(rm, prompts, router, budget):
        words = [_word(rm.tokenizer.decode(ids)) for ids in prompts]  # "... The word: W\nAnswer with one word."
        asked.extend(rm.tokenizer.decode(ids) for ids in prompts)
        if router.describe() == "base":
            return [w if w == "dog" else "I cannot" for w in words]
        return [f"{w}." if w != "dog" else "cat" for w in words]  # "fox." is right: graded after `normalize`

    monkeypatch.setattr(demo, "generate_batch", generate_batch)
    return asked


def test_pick_demo_stores_where_the_router_helps_and_where_it_fails_on_validation_rows_only(held, fake_answers):
    shown = demo.pick_demo(str(held.path))
    assert fake_answers and all(_word(p) in VALIDATION for p in fake_answers)  # never a test row
    stored = Library.open(held.path).extra
    assert stored["demo"] == shown and shown["split"] == "validation" and shown["candidates"] == 6  # 3 per task
    examples = stored["examples"]
    assert [e["kind"] for e in examples] == ["helps", "helps", "fails", "fails"]  # helps first, one per task
    assert [e["task"] for e in examples] == TASKS + TASKS
    for e in examples[:2]:  # the shortest prompt where the router is right and the base model wrong
        assert e["answer"] == e["expected"] + "." and e["base_answer"] == "I cannot"
    assert shown["prompt"] == min((e["prompt"] for e in examples[:2]), key=len)
    for e in examples[2:]:  # router wrong: "dog", which the base model gets right, before "brown", which it does not
        assert (e["expected"], e["answer"], e["base_answer"]) == ("dog", "cat", "dog")
    assert {"task", "split", "prompt", "expected", "router", "answer", "base_answer", "kind"} == set(examples[0])


def test_pick_demo_with_no_help_stores_the_failures_and_drops_an_old_demo(held, monkeypatch):
    with held.edit() as current:
        current.extra["demo"] = {"task": "copy0", "prompt": "stale"}
    monkeypatch.setattr(demo, "generate_batch", lambda rm, prompts, router, budget: ["no"] * len(prompts))
    assert demo.pick_demo(str(held.path)) is None
    stored = Library.open(held.path).extra
    assert "demo" not in stored and [e["kind"] for e in stored["examples"]] == ["fails", "fails"]


def test_the_worker_offers_the_stored_examples_first_then_validation_rows_never_test_rows(held, fake_answers):
    demo.pick_demo(str(held.path))
    examples = LocalWorker(device="cpu").examples(str(held.path), per_task=2)
    assert all(isinstance(e, Example) for e in examples)
    assert [e.kind for e in examples] == ["helps", "helps", "fails", "fails", "plain", "plain", "plain", "plain"]
    assert all(_word(e.prompt) in VALIDATION for e in examples)  # validation rows only
    assert all(e.expected == _word(e.prompt) for e in examples)
    labels = [e.label for e in examples]
    assert len(set(labels)) == len(labels)  # told apart by their question, not the task's preamble
    assert labels[0] == f"fox (copy0) — ✓ arrow ✗ base, {demo.PICKED}"
    assert labels[2] == f"dog (copy0) — ✗ arrow ✓ base, {demo.PICKED}"
    assert labels[4] == "lazy (copy0)" and "Copy the last word" not in " ".join(labels)
    assert len({e.prompt for e in examples}) == len(examples)  # a stored row is not offered twice


def test_a_stored_example_that_is_no_validation_row_is_not_offered(held):
    forged = {"task": "copy0", "prompt": _prompt("copy0", "quick"), "expected": "quick", "router": "arrow"}  # test row
    with held.edit() as current:
        current.extra["examples"] = [
            {**forged, "answer": "quick", "base_answer": "x", "kind": "helps"},
            {**forged, "prompt": _prompt("copy0", "fox"), "answer": "fox", "base_answer": "x", "kind": "nonsense"},
            "not a dict",
        ]
    examples = LocalWorker(device="cpu").examples(str(held.path), per_task=1)
    assert [(e.kind, e.expected) for e in examples] == [("plain", "fox"), ("plain", "fox")]


def test_a_question_is_what_a_row_asks_beyond_what_its_task_shares():
    rows = ["2-digit addition.\n\nWhat is 74 plus 23?", "2-digit addition.\n\nWhat is 85 plus 29?"]
    assert demo.question(rows[0], rows) == "74 plus 23?"
    nli = "Decide.\n\nSentence 1: {}\nSentence 2: {}\n\nThe answer is:"
    pair = [nli.format("A cat sat.", "It sat."), nli.format("Rain fell.", "It rained.")]
    assert demo.question(pair[1], pair) == "Rain fell. Sentence 2: It rained."
    assert demo.question("A preamble\n\nteach", []) == "teach"  # no other row: the last paragraph
    long = demo.example_label("x " * 100, "family.task_name", [])
    assert long.endswith("… (task_name)") and len(long) < 100


# ---- grading after a route, by the worker -------------------------------------------------------


class GradingWorker:
    """A worker whose answers and grades are set per router; it keeps the requests it got."""

    def __init__(self, answers: dict[str, tuple[str, int, bool]]):
        self.answers, self.requests = answers, []

    def library(self, path):
        return type("Info", (), {"experts": [{"name": "e0", "kind": "private"}]})()

    def route(self, request):
        self.requests.append(request)
        text, n, correct = self.answers[request.router]
        record = RoutingRecord(
            request.router, ["e0"], [MODULE], ["a", "b", "c"], np.ones((1, 3, 1)), np.ones((1, 3, 1))
        )
        graded = correct if request.expected is not None else None
        yield RouteUpdate(text, True, record, 2, first_token_s=0.1, total_s=0.2, answer_tokens=n, correct=graded)


NOTES = {"references": {"A preamble\n\ntake": "took"}}


def test_a_routed_example_shows_its_reference_and_a_mark_and_an_empty_answer_says_why(page):
    tab = page.route
    worker = GradingWorker({"arrow@private": ("took", 1, True), "base": ("", 0, False)})
    out = _compared(route.route(worker, tab, "lib", "A preamble\n\ntake ", "arrow@private", 2, 1.0, 4, 0.2, NOTES))
    assert worker.requests[-1].expected == "took"  # graded by the worker, as the evaluation grades
    assert out[tab.timing].endswith("reference: «took» · arrow@private ✓")
    out = _compared(route.route(worker, tab, "lib", "A preamble\n\ntake", "base", 2, 1.0, 4, 0.2, NOTES))
    assert "stopped after 0 tokens (the model's first token ended the answer)" in out[tab.timing]
    assert out[tab.timing].endswith("reference: «took» · base ✗")
    out = _compared(route.route(worker, tab, "lib", "my own prompt", "base", 2, 1.0, 4, 0.2, NOTES))
    assert worker.requests[-1].expected is None and "reference" not in out[tab.timing]
    both = _compared(
        route.compare(worker, tab, "lib", "A preamble\n\ntake", "arrow@private", "base", 2, 1.0, 4, 0.2, NOTES)
    )
    lines = both[tab.compare_timing].split("  \n")
    assert lines[1].endswith("— stopped after 0 tokens (the model's first token ended the answer)")
    assert lines[-1] == "reference: «took» · A ✓ / B ✗"


def test_the_local_worker_grades_as_the_evaluation_does_and_counts_the_answers_tokens(tiny_library):
    worker, path = LocalWorker(device="cpu"), str(tiny_library.path)

    def done(expected=None) -> RouteUpdate:
        request = RouteRequest(path, "the quick brown", "arrow", 2, max_new_tokens=4, expected=expected)
        return [u for u in worker.route(request) if u.done][0]

    plain = done()
    generated = len(plain.record.tokens) - plain.n_prompt_tokens
    assert plain.correct is None and plain.answer_tokens in (generated - 1, generated)  # the stop token not counted
    assert done(" " + plain.text.upper() + ".").correct is True  # case, blanks and a final full stop do not count
    assert done("zzz " + plain.text).correct is False


# ---- the token view ------------------------------------------------------------------------------


@pytest.fixture
def page(tiny_library):
    return layout.build_page(LocalWorker(device="cpu"), str(tiny_library.path))[1]


def _templated() -> RoutingRecord:
    """Two template tokens, the user's three, one more template token, then two generated."""
    tokens = ["<s>", "user:", "take", " it", " now", "\nassistant:", "took", "<eos>"]
    weights = np.zeros((1, len(tokens), 2))
    weights[0, :, 0], weights[0, 0, :] = 1.0, [0.0, 1.0]  # e1 tops only the first (template) token
    return RoutingRecord("arrow", ["e0", "e1"], [MODULE], tokens, weights, weights.copy(), template=[0, 1, 5])


def test_the_chat_templates_tokens_are_hidden_from_the_coloured_text_and_the_menu(page):
    tab, record = page.route, _templated()
    assert route.default_token(record, 6) == 6  # the first generated token
    hidden = route.layer_detail(tab, record, MODULE, 6, None, None, True)
    assert [t["token"] for t in hidden[tab.coloured].value] == ["take", " it", " now", "took", "<eos>"]
    assert set(hidden[tab.coloured].color_map) == {"e0"}  # no legend for an expert of hidden tokens only
    assert [i for _, i in hidden[tab.token_pick].choices] == [2, 3, 4, 6, 7] and hidden[tab.token_pick].value == 6
    shown = route.layer_detail(tab, record, MODULE, 1, None, None, False)
    assert len(shown[tab.coloured].value) == 8 and [i for _, i in shown[tab.token_pick].choices] == list(range(8))
    linked = route.layer_detail(tab, record, MODULE, 1, None, None, True)  # a link's template token stays
    assert [i for _, i in linked[tab.token_pick].choices] == [1, 2, 3, 4, 6, 7]


def test_a_click_on_a_token_picks_the_record_token_it_shows(page):
    record = _templated()

    def click(index, hide):
        return route.clicked_token(record, hide, gr.SelectData(None, {"index": index, "value": ["x", None]}))

    assert click(0, True) == 2 and click(3, True) == 6  # the 4th shown token is the first generated one
    assert click(0, False) == 0 and click(5, False) == 5
    assert (
        click(9, True) == gr.skip()
        and route.clicked_token(None, True, gr.SelectData(None, {"index": 0, "value": None})) == gr.skip()
    )


def test_the_worker_marks_the_chat_templates_tokens_of_a_route(tiny_base, tiny_adapters, tmp_path):
    from conftest import build_library
    from transformers import AutoTokenizer

    base = tmp_path / "templated-base"
    shutil.copytree(tiny_base, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "SYSTEM: be brief. {% for m in messages %}USER: {{ m['content'] }}{% endfor %} ANSWER:"
    tok.save_pretrained(base)
    library = build_library(tmp_path / "lib", base, tiny_adapters[:2])
    request = RouteRequest(str(library.path), "fox dog", "arrow", 2, max_new_tokens=2)
    (done,) = [u for u in LocalWorker(device="cpu").route(request) if u.done]
    record = done.record
    own = [i for i in record.content_tokens() if i < done.n_prompt_tokens]
    assert "".join(record.tokens[i] for i in own).strip() == "fox dog"
    assert "".join(record.tokens[i] for i in record.template).replace(" ", "") == "SYSTEM:bebrief.USER:ANSWER:"
    assert route.default_token(record, done.n_prompt_tokens) == done.n_prompt_tokens  # the first generated


def test_the_menu_shows_each_examples_label_and_keeps_its_reference(page, worker_info):
    tab = page.route
    examples = [
        Example(
            "take (irregular) — ✓ arrow ✗ base, picked on validation rows", "P\n\ntake", "took", "t.irregular", "helps"
        ),
        Example("tell (irregular)", "P\n\ntell", "told", "t.irregular", "plain"),
    ]
    shown = route.opened(tab, worker_info, examples)
    assert shown[tab.example_pick].choices == [(e.label, e.prompt) for e in examples]
    assert route.reference(shown[tab.notes], "P\n\ntell") == "told" and route.reference(shown[tab.notes], "x") is None


@pytest.fixture
def worker_info(tiny_library):
    return LocalWorker(device="cpu").library(str(tiny_library.path))
