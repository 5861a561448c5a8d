"""The examples a library offers on the Route tab, the one it opens on first: where the library
visibly helps, and, for an honest demo, where it fails.

Among the validation rows of the library's held-out tasks (never its test rows: the evaluation's),
graded as the evaluation grades (`normalize`, exact match), `pick_demo` finds the prompts that the
router answers right and the base model wrong, and those the router gets wrong. The manifest keeps

- `demo`: the shortest prompt where the router helps, with both answers, so that the app can say in
  one line what the example shows (the Route tab opens on it);
- `examples`: per held-out task, its shortest prompt where the router helps (kind "helps"), then up
  to `FAILS` prompts where it is wrong, one per task, those the base model gets right first (kind
  "fails"); each with task, split, prompt, expected, router, answer, base_answer and kind.

Greedy decoding makes the stored answers those the app will produce. `menu_examples` turns them,
and other validation rows of the held-out tasks, into the Route tab's menu (`Worker.examples`),
each labelled by its question: what its prompt asks beyond what every row of its task shares.

    python -m lorlib_ui.analysis.demo LIBRARY [--router arrow]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from lorlib_ui.analysis.evaluation import answer_budget, normalize
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import generate_batch
from lorlib_ui.core.library import Library
from lorlib_ui.core.prompting import encode_prompt
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router
from lorlib_ui.training.data import load_tasks

MANIFEST_KEY = "demo"
EXAMPLES_KEY = "examples"
KINDS = ("helps", "fails")  # what the stored examples show: the router right and the base wrong, the router wrong
FAILS = 3  # stored examples where the router is wrong, one per task at most
PICKED = "picked on validation rows"
QUESTION_CHARS = 80  # of a menu label's question
STORED = ("task", "prompt", "expected", "router", "answer", "base_answer")  # the fields a stored example needs


def pick_demo(path: str, router: str = "arrow", device: str | None = None) -> dict | None:
    """Find the examples and store them in the library (see the module's docstring); returns the
    demo, or None (and no demo stored) if no validation row of a held-out task is answered right by
    the router and wrong by the base model."""
    library = Library.open(path)
    held = library.held_out
    if not held.tasks:
        raise LorlibError(f"library {library.path} holds out no task: nothing to show an unseen example of")
    data = load_tasks(library.data_source())
    rm = RoutedModel.load(library, device=device)
    routed, base = make_router(router, library.names, groups=library.groups()), make_router("base", library.names)
    helps, fails = [], []
    for task in held.tasks:
        rows = data.rows(task, "validation")
        if not rows:
            continue
        prompts = [encode_prompt(rm.tokenizer, row["input"]) for row in rows]
        budget = answer_budget(rm.tokenizer, data, task)
        answers = generate_batch(rm, prompts, routed, budget)
        plain = generate_batch(rm, prompts, base, budget)
        for row, ids, mine, theirs in zip(rows, prompts, answers, plain):
            pick = {"task": task, "split": "validation", "prompt": row["input"], "expected": row["output"]}
            pick |= {"router": router, "answer": mine, "base_answer": theirs}
            right, base_right = graded(mine, row["output"]), graded(theirs, row["output"])
            if right and not base_right:
                helps.append((len(ids), pick))
            elif not right:
                fails.append((not base_right, len(ids), pick))
    helps.sort(key=lambda x: x[0])
    fails.sort(key=lambda x: x[:2])
    examples = [{**pick, "kind": "helps"} for pick in _one_per_task(p for *_, p in helps)]
    examples += [{**pick, "kind": "fails"} for pick in _one_per_task(p for *_, p in fails)][:FAILS]
    demo = {**helps[0][1], "candidates": len(helps)} if helps else None
    with library.edit() as current:
        current.extra[EXAMPLES_KEY] = examples
        if demo:
            current.extra[MANIFEST_KEY] = demo
        else:  # an earlier pick's demo no longer holds
            current.extra.pop(MANIFEST_KEY, None)
    return demo


def graded(answer: str, expected: str) -> bool:
    """Whether an answer is the expected one, as the evaluation grades it: an exact match after
    `normalize`. The Route tab's marks come from here too (`Worker.route` with `expected`)."""
    return normalize(answer) == normalize(expected)


def _one_per_task(picks) -> list[dict]:
    """The first pick of each task, in order."""
    firsts: dict[str, dict] = {}
    for pick in picks:
        firsts.setdefault(pick["task"], pick)
    return list(firsts.values())


# ---- the Route tab's menu ------------------------------------------------------------------------


def stored_examples(record) -> list[dict]:
    """The well-formed stored examples (the manifest is untrusted: plain strings of bounded length
    and a known kind)."""
    if not isinstance(record, list):
        return []
    ok = [e for e in record if isinstance(e, dict) and all(isinstance(e.get(k), str) for k in STORED)]
    return [{**{k: e[k][:4000] for k in STORED}, "kind": e["kind"]} for e in ok if e.get("kind") in KINDS]


def question(prompt: str, siblings: list[str]) -> str:
    """What a prompt asks: its words without the leading and trailing words it shares with most
    other rows of its task (`siblings`: their preamble and closing line). Without other rows, its
    last paragraph."""
    words = prompt.split()
    others = [s.split() for s in siblings if s != prompt]
    if others:
        head = statistics.median_low(_shared(words, o) for o in others)
        tail = statistics.median_low(_shared(words[::-1], o[::-1]) for o in others)
        if head + tail < len(words):
            return " ".join(words[head : len(words) - tail])
    paragraphs = [p for p in prompt.strip().split("\n\n") if p.strip()]
    return " ".join(paragraphs[-1].split()) if paragraphs else ""


def _shared(a: list[str], b: list[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def example_label(prompt: str, task: str, siblings: list[str], verdict: str = "") -> str:
    """A menu entry: the prompt's question, the task's short name, and the verdict where known."""
    asked = question(prompt, siblings)
    if len(asked) > QUESTION_CHARS:
        asked = asked[: QUESTION_CHARS - 1].rstrip() + "…"
    label = f"{asked} ({task.rsplit('.', 1)[-1]})"
    return f"{label} — {verdict}" if verdict else label


def verdict(example: dict) -> str:
    """'✓ arrow ✗ base, picked on validation rows': how the router and the base model did."""
    marks = ["✓" if graded(example[k], example["expected"]) else "✗" for k in ("answer", "base_answer")]
    return f"{marks[0]} {example['router']} {marks[1]} base, {PICKED}"


def menu_examples(library: Library, data, per_task: int = 2) -> list[dict]:
    """The Route tab's examples, as dicts of `Worker.examples`' fields (label, prompt, expected,
    task, kind): the stored ones (helps, then fails; the demo alone where a library stored only
    it), then up to `per_task` other validation rows of each held-out task, with no verdict (kind
    "plain"). Never a test row: with `data` (the library's MultiTaskData, None where it cannot be
    read now), a stored example that is not a validation row of its held-out task is left out."""
    held = library.held_out.tasks
    siblings = {task: [row["input"] for row in data.rows(task, "validation")] for task in held} if data else {}
    stored = stored_examples(library.extra.get(EXAMPLES_KEY))
    demo = library.extra.get(MANIFEST_KEY)
    if EXAMPLES_KEY not in library.extra and isinstance(demo, dict):
        stored = stored_examples([{**demo, "kind": "helps"}])
    stored = [e for e in stored if e["task"] in held and (data is None or e["prompt"] in siblings[e["task"]])]
    out = [
        {
            "label": example_label(e["prompt"], e["task"], siblings.get(e["task"], []), verdict(e)),
            "prompt": e["prompt"],
            "expected": e["expected"],
            "task": e["task"],
            "kind": e["kind"],
        }
        for e in stored
    ]
    shown = {e["prompt"] for e in out}
    for task in siblings:
        rows = [row for row in data.rows(task, "validation") if row["input"] not in shown][:per_task]
        out += [
            {
                "label": example_label(row["input"], task, siblings[task]),
                "prompt": row["input"],
                "expected": row["output"],
                "task": task,
                "kind": "plain",
            }
            for row in rows
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library")
    parser.add_argument("--router", default="arrow")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:
        demo = pick_demo(args.library, args.router, args.device)
    except LorlibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stored = stored_examples(Library.open(args.library).extra.get(EXAMPLES_KEY))
    kinds = {kind: sum(e["kind"] == kind for e in stored) for kind in KINDS}
    print(f"stored {len(stored)} examples: {kinds['helps']} where the router helps, {kinds['fails']} where it fails")
    if demo is None:
        print("no validation row of a held-out task is answered right by the router and wrong by the base model")
        return 1
    print(f"{demo['task']}: {demo['prompt']!r} -> {demo['answer']!r} (base: {demo['base_answer']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
