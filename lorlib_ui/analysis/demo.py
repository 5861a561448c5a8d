"""The example a library opens the Route tab on: one where the library visibly helps.

Among the validation rows of the library's held-out tasks (never its test rows: the evaluation's),
the prompts that the router answers exactly right and the base model gets wrong; the shortest is
kept in the manifest (`demo`), with both answers, so that the app can say in one line what the
example shows. Greedy decoding makes the stored answers those the app will produce.

    python -m lorlib_ui.analysis.demo LIBRARY [--router arrow]
"""

from __future__ import annotations

import argparse
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


def pick_demo(path: str, router: str = "arrow", device: str | None = None) -> dict | None:
    """Find the example and store it in the library (see the module's docstring); None if no
    validation row of a held-out task is answered right by the router and wrong by the base model."""
    library = Library.open(path)
    held = library.held_out
    if not held.tasks:
        raise LorlibError(f"library {library.path} holds out no task: nothing to show an unseen example of")
    data = load_tasks(library.data_source())
    rm = RoutedModel.load(library, device=device)
    routed, base = make_router(router, library.names, groups=library.groups()), make_router("base", library.names)
    found = []
    for task in held.tasks:
        rows = data.rows(task, "validation")
        if not rows:
            continue
        prompts = [encode_prompt(rm.tokenizer, row["input"]) for row in rows]
        budget = answer_budget(rm.tokenizer, data, task)
        answers = generate_batch(rm, prompts, routed, budget)
        plain = generate_batch(rm, prompts, base, budget)
        for row, ids, mine, theirs in zip(rows, prompts, answers, plain):
            expected = normalize(row["output"])
            if normalize(mine) == expected and normalize(theirs) != expected:
                found.append((len(ids), task, row, mine, theirs))
    if not found:
        return None
    _, task, row, mine, theirs = min(found, key=lambda x: x[0])
    demo = {
        "task": task,
        "split": "validation",
        "prompt": row["input"],
        "expected": row["output"],
        "router": router,
        "answer": mine,
        "base_answer": theirs,
        "candidates": len(found),
    }
    with library.edit() as current:
        current.extra[MANIFEST_KEY] = demo
    return demo


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
    if demo is None:
        print("no validation row of a held-out task is answered right by the router and wrong by the base model")
        return 1
    print(f"{demo['task']}: {demo['prompt']!r} -> {demo['answer']!r} (base: {demo['base_answer']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
