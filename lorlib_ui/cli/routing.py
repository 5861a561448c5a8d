"""The commands that look into routing one answer or many: explain and route-batch."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lorlib_ui.analysis.routing_stats import RouterOptions
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.options import from_namespace, option


@dataclass(frozen=True, kw_only=True)
class ExplainOptions(RouterOptions):
    """One answer explained token by token under a router (`explain`)."""

    prompt: str = option(help="the prompt (in the chat template unless --raw)")
    answer: str | None = option(None, "the answer to explain (default: the router's own greedy answer)")
    compare: str | None = option(None, "also score the answer under this router, token by token")
    max_new_tokens: int = option(32, "length of the router's own answer, when --answer is not given (default 32)")
    raw: bool = option(False, "do not wrap the prompt in the chat template")
    per_layer: bool = option(False, "with --json: also each token's top experts at every layer")

    def __post_init__(self):
        if not self.prompt.strip():
            raise LorlibError("--prompt is empty")
        if self.answer is not None and not self.answer.strip():
            raise LorlibError("--answer is empty")


@dataclass(frozen=True, kw_only=True)
class RouteBatchOptions(RouterOptions):
    """Many prompts routed at once (`route-batch`)."""

    file: str = option(help="a .jsonl or .csv file with a prompt column", positional=True)
    out: str | None = option(None, "write the results to this CSV file (default: print them)")
    column: str = option("prompt", "the column that holds the prompts (default prompt)")
    max_new_tokens: int = option(32, "tokens to generate per prompt (default 32)")
    batch_size: int = option(8, "prompts per batch (default 8)")
    raw: bool = option(False, "do not wrap the prompts in the chat template")

    def __post_init__(self):
        if self.batch_size < 1:
            raise LorlibError(f"--batch-size must be at least 1, got {self.batch_size}")


def routed(path: str, o: RouterOptions, spec: str | None = None):
    """The library's routed model and the routers `o.router` (and `spec`, if given) over it, each
    checked for the keys it needs before the model loads: the commands that route (`route`,
    `score`, `explain`, `route-batch`) start here."""
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router

    library = Library.open(path)
    routers = [
        make_router(s, library.names, o.top_k, o.temperature, o.mix, groups=library.groups(), density=o.density)
        for s in (o.router, spec)
        if s is not None
    ]
    for router in routers:
        if (problem := library.derived.lacks_for(router)) is not None:  # before the model loads
            raise LorlibError(problem)
    return RoutedModel.load(library, base_model=o.base_model, device=o.device, dtype=o.dtype), routers


def cmd_explain(args) -> None:
    from lorlib_ui.core.explain import explain, explain_ids, format_explanation
    from lorlib_ui.core.generation import generate

    o = from_namespace(ExplainOptions, args)
    rm, (router, *other) = routed(args.library, o, o.compare)
    compare = other[0] if other else None
    if o.answer is not None:
        shown = explain(rm, o.prompt, o.answer, router, compare=compare, chat=not o.raw)
    else:  # the router's own answer, by its own token ids
        own = generate(rm, o.prompt, router, max_new_tokens=o.max_new_tokens, record=False, chat=not o.raw)
        if not own.answer_ids:
            raise LorlibError(f"router {router.describe()} answers nothing to this prompt; give --answer")
        shown = explain_ids(rm, own.prompt_ids, own.answer_ids, router, compare, prompt=o.prompt, answer=own.text)
    print(json.dumps(shown.to_dict(o.per_layer)) if args.json else format_explanation(shown))


def cmd_route_batch(args) -> None:
    from lorlib_ui.cli.progress import Bars
    from lorlib_ui.core.batch import read_prompts, route_prompts, rows_to_csv
    from lorlib_ui.training.reporter import Count

    o = from_namespace(RouteBatchOptions, args)
    rows = read_prompts(o.file, o.column)  # the file's problems before the model loads
    rm, (router,) = routed(args.library, o)
    with Bars("routed", "prompt") as bars:
        route_prompts(
            rm,
            rows,
            router,
            o.max_new_tokens,
            chat=not o.raw,
            batch_size=o.batch_size,
            done=lambda done, total: bars.progress(Count(done, total, "")),
        )
    table = rows_to_csv(rows, rm.experts)
    bad = sum(1 for r in rows if r.error)
    if o.out:
        try:
            Path(o.out).write_text(table, encoding="utf-8")
        except OSError as exc:
            raise LorlibError(f"cannot write {o.out}: {exc.strerror or exc}") from None
        print(f"routed {len(rows) - bad} prompts ({bad} rows with errors) into {o.out}")
    else:
        sys.stdout.write(table)
    for r in rows:
        if r.error:
            print(f"row {r.row}: {r.error}", file=sys.stderr)
