"""Command line: `python -m lorlib_ui COMMAND`.

The command names, their options and the JSON they print are a contract (README).
Bad input exits non-zero with one line on stderr and no traceback.

Each command's flags come from the options dataclasses of the entry point it calls (`COMMANDS`):
their fields' names, types, defaults and help make the flags (`lorlib_ui.training.options`), and
the command reads the dataclasses back, which check themselves. The commands that make experts are
in `lorlib_ui.cli.training`, those that judge them in `lorlib_ui.cli.analysis`; the library's own
commands (new, info, route, ...) are here, with their options, and those that move libraries and
experts in and out (import-peft, pull, push, card, export) in `lorlib_ui.cli.sharing`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorlib_ui.analysis.adaptation_runs import AdaptOptions
from lorlib_ui.analysis.evaluation import EvaluateOptions
from lorlib_ui.analysis.routing_stats import RouterOptions, RoutingStatsOptions
from lorlib_ui.analysis.transfer import TransferOptions
from lorlib_ui.cli.analysis import cmd_adapt, cmd_evaluate, cmd_routing_stats, cmd_transfer
from lorlib_ui.cli.progress import TrainerOptions
from lorlib_ui.cli.routing import ExplainOptions, RouteBatchOptions, cmd_explain, cmd_route_batch, routed
from lorlib_ui.cli.sharing import (
    CardOptions,
    ExportOptions,
    ImportOptions,
    PullOptions,
    PushOptions,
    cmd_card,
    cmd_export,
    cmd_import_peft,
    cmd_pull,
    cmd_push,
)
from lorlib_ui.cli.training import cmd_build, cmd_cluster, cmd_keys, cmd_lorahub
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.building import BuildOptions
from lorlib_ui.training.clusters import ClusterOptions
from lorlib_ui.training.config import GATE_STEPS, TrainConfig
from lorlib_ui.training.keys import ActivationsOptions, GatesOptions
from lorlib_ui.training.lorahub import LoraHubOptions
from lorlib_ui.training.options import add_options, from_namespace, option


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise LorlibError(f"{self.prog}: {message}")


EMBEDDED = "default: the embedded SmolLM2-135M-Instruct"
NEW_BASE = "base model of a new library (default: embedded SmolLM2)"


@dataclass(frozen=True, kw_only=True)
class FetchModelOptions:
    """The base model `fetch-model` makes available."""

    base_model: str | None = option(None, EMBEDDED)


@dataclass(frozen=True, kw_only=True)
class NewOptions:
    """An empty library (`new`)."""

    base_model: str | None = option(None, EMBEDDED)
    exist_ok: bool = option(False, "succeed if a library on that base model exists")


@dataclass(frozen=True, kw_only=True)
class NamesOptions:
    """Experts named on the command line (`remove`, `mark-general`)."""

    names: tuple[str, ...] = option(help="experts of the library", positional=True, metavar="NAME")


@dataclass(frozen=True, kw_only=True)
class MarkGeneralOptions(NamesOptions):
    """Experts marked general, or no longer (`mark-general`)."""

    unmark: bool = option(False, "make them ordinary experts again")


@dataclass(frozen=True, kw_only=True)
class RouteOptions(RouterOptions):
    """A generation under a router (`route`)."""

    prompt: str = option(help="what to answer (in the chat template unless --raw)")
    max_new_tokens: int = option(64, "tokens to generate (default 64)")
    raw: bool = option(False, "do not wrap the prompt in the chat template")
    html: str | None = option(None, "also write the route as a self-contained HTML page (opens offline)")
    csv: str | None = option(None, "also write the routing record as CSV: a row per token and layer")

    def __post_init__(self):
        if not self.prompt.strip():  # before any model loads
            raise LorlibError("--prompt is empty")


@dataclass(frozen=True, kw_only=True)
class ScoreOptions(RouterOptions):
    """A text scored under a router (`score`)."""

    text: str = option(help="the text whose tokens are scored")

    def __post_init__(self):
        if not self.text.strip():
            raise LorlibError("--text is empty")


def cmd_fetch_model(args) -> None:
    from lorlib_ui.core.base_model import resolve_base_model

    print(resolve_base_model(from_namespace(FetchModelOptions, args).base_model))


def cmd_new(args) -> None:
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import MANIFEST, Library

    options = from_namespace(NewOptions, args)
    base = base_model_info(options.base_model)
    if options.exist_ok and (Path(args.library) / MANIFEST).is_file():
        library = Library.open(args.library)
        library.check_base(base)
        print(f"library {library.path} exists: {len(library.experts)} experts on {library.base_model}")
        return
    library = Library.create(args.library, base)
    print(f"created empty library {library.path} on {library.base_model}")


def cmd_mark_general(args) -> None:
    from lorlib_ui.core.library import Library

    o = from_namespace(MarkGeneralOptions, args)
    library = Library.open(args.library)
    library.mark_general(list(o.names), general=not o.unmark)
    for name in dict.fromkeys(o.names):
        print(f"{name} is {'no longer' if o.unmark else 'now'} general in {library.path}")


def cmd_remove(args) -> None:
    from lorlib_ui.core.library import Library

    names = list(dict.fromkeys(from_namespace(NamesOptions, args).names))
    library = Library.open(args.library)
    for name in names:
        library.expert(name)  # every name known before anything is removed
    with library.edit() as current:
        current.experts = [e for e in current.experts if e.name not in names]
    print(f"removed {', '.join(names)} from {library.path}")


def cmd_info(args) -> None:
    from lorlib_ui.core.library import Library

    library = Library.open(args.library)
    if args.json:
        print(json.dumps(library.manifest(), indent=1))
        return
    print(f"library {library.path}: {len(library.experts)} experts on {library.base_model}")
    for name, why in library.problems.items():
        print(f"warning: expert {name} cannot be used: {why}; remove it with `lorlib remove {library.path} {name}`")
    if not library.experts:
        return
    rows = [("name", "kind", "rank", "targets", "family", "tasks")]
    for e in library.experts:
        kind = e.kind + (" (general)" if e.general and e.kind != "general" else "")
        rows.append((e.name, kind, str(e.rank), ",".join(e.target_modules), e.family or "-", ",".join(e.tasks) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    from lorlib_ui.core.learned_routers import learned_routers, summary

    for name, record in learned_routers(library).items():
        print(f"learned router poly:{name}: {summary(record)}, mixing {len(record.experts)} experts")


def cmd_route(args) -> None:
    from lorlib_ui.core.generation import generate

    o = from_namespace(RouteOptions, args)
    rm, (router,) = routed(args.library, o)
    result = generate(rm, o.prompt, router, max_new_tokens=o.max_new_tokens, chat=not o.raw)
    _write_route_files(o, rm, router, result)
    if result.truncated:
        print("notice: the prompt was longer than the model's context and was cut from the left", file=sys.stderr)
    if args.json:
        print(json.dumps({"text": result.text, "truncated": result.truncated, **result.record.to_dict()}))
        return
    print(result.text)
    if not router.applies_experts:
        return
    print(f"\n[{router.describe()}] mean routing weight per expert over all layers and tokens:", file=sys.stderr)
    means = result.record.layer_expert_weights().mean(axis=0)
    for name, weight in sorted(zip(rm.experts, means), key=lambda x: -x[1])[:10]:
        print(f"  {name}: {weight:.3f}", file=sys.stderr)


def _write_route_files(o: RouteOptions, rm, router, result) -> None:
    """The --html page and the --csv record of one route."""
    from lorlib_ui.app.report import route_report

    settings = {"router": router.describe(), "top-k": o.top_k, "temperature": o.temperature, "mix": o.mix}
    settings |= {"max new tokens": o.max_new_tokens, "chat template": not o.raw}
    for path, text in (
        (
            o.html,
            lambda: route_report(
                result.record, o.prompt, result.text, settings, str(rm.library.path), rm.library.base_fingerprint
            ),
        ),
        (o.csv, lambda: result.record.to_csv()),
    ):
        if path:
            try:
                Path(path).write_text(text(), encoding="utf-8")
            except OSError as exc:
                raise LorlibError(f"cannot write {path}: {exc.strerror or exc}") from None


def cmd_score(args) -> None:
    from lorlib_ui.core.generation import score

    o = from_namespace(ScoreOptions, args)
    rm, (router,) = routed(args.library, o)
    result = score(rm, o.text, router)
    if args.json:
        print(json.dumps({"tokens": result.tokens, "logprobs": result.logprobs}))
        return
    for token, lp in zip(result.tokens, result.logprobs):
        print(f"{'' if lp is None else f'{lp:8.3f}':>8}  {token!r}")


@dataclass(frozen=True)
class Command:
    """A command: what runs it, its help, and the options dataclasses its flags are made from."""

    run: Callable[[argparse.Namespace], None]
    help: str
    options: tuple[type, ...] = ()
    library: bool = True  # the library folder comes first
    libraries: bool = False  # one or more library folders come first (`args.library` is then a list)
    json: str | None = None  # the help of its --json flag, where it prints one JSON object
    describe: bool = False  # its help is its description as well
    flags: Callable[[argparse.ArgumentParser], None] | None = None  # flags of the command line alone


def _then_gates(parser: argparse.ArgumentParser) -> None:
    help = f"then train PhatGoose gates for its experts ({GATE_STEPS} steps each)"
    parser.add_argument("--gates", action="store_true", help=help)


def _stored(parser: argparse.ArgumentParser) -> None:
    help = "run nothing: report the evaluations the libraries store (and, with several, their spread)"
    parser.add_argument("--stored", action="store_true", help=help)


MARK_GENERAL = (
    "mark experts general: arrow_gks (GenKnowSub) subtracts their mean from the others and never routes "
    "to them; their kind stays, and so does the mark when an expert is replaced"
)
ADAPT = "learn a new task from a few of its examples by reusing the library; compare the ways to"
COMMANDS = {
    "fetch-model": Command(
        cmd_fetch_model, "make the base model available and print its local path", (FetchModelOptions,), False
    ),
    "new": Command(cmd_new, "create an empty library on a base model", (NewOptions,)),
    "import-peft": Command(
        cmd_import_peft,
        "create or extend a library from PEFT LoRA adapters: folders, or hub ids owner/repo[:subfolder][@revision]",
        (ImportOptions,),
    ),
    "pull": Command(cmd_pull, "copy a library from the Hugging Face Hub into a folder", (PullOptions,), False),
    "push": Command(cmd_push, "publish a library on the Hugging Face Hub, with its cards", (PushOptions,)),
    "card": Command(cmd_card, "write or refresh the library's card and its experts' cards", (CardOptions,)),
    "export": Command(
        cmd_export,
        "export a static router's merge as a PEFT adapter, or as the base model with it folded in",
        (ExportOptions,),
    ),
    "mark-general": Command(cmd_mark_general, MARK_GENERAL, (MarkGeneralOptions,), describe=True),
    "remove": Command(cmd_remove, "remove experts from a library (in one atomic step)", (NamesOptions,), describe=True),
    "info": Command(cmd_info, "list the experts of a library", json="print the manifest as one JSON object"),
    "route": Command(
        cmd_route, "generate under a router and report the routing", (RouteOptions,), json="print one JSON object"
    ),
    "explain": Command(
        cmd_explain,
        "explain an answer token by token: its gain over the base model, and which expert carried it",
        (ExplainOptions,),
        json="print one JSON object",
    ),
    "route-batch": Command(
        cmd_route_batch,
        "route many prompts from a JSONL or CSV file: answers, top experts, weights",
        (RouteBatchOptions,),
    ),
    "build": Command(
        cmd_build,
        "train private experts per task (and a shared expert) into a library",
        (BuildOptions, TrainConfig, TrainerOptions),
        flags=_then_gates,
    ),
    "gates": Command(
        cmd_keys, "train PhatGoose gates for experts that lack them (base and experts frozen)", (GatesOptions,)
    ),
    "activations": Command(
        cmd_keys, "mean hidden states of experts' own examples, for the avg_act router", (ActivationsOptions,)
    ),
    "cluster": Command(
        cmd_cluster,
        "MBC: cluster the private experts, then train one expert per cluster",
        (ClusterOptions, TrainerOptions),
        json="print the clustering as one JSON object",
    ),
    "evaluate": Command(
        cmd_evaluate,
        "zero-shot evaluation of routers on held-out tasks; of several libraries of one design, with their spread",
        (EvaluateOptions,),
        libraries=True,
        json="print the results as one JSON object",
        flags=_stored,
    ),
    "lorahub": Command(
        cmd_lorahub,
        "LoraHub: search a merge of experts on a few examples of a task; store it as an expert",
        (LoraHubOptions,),
        json="print the stored expert as one JSON object",
    ),
    "adapt": Command(cmd_adapt, ADAPT, (AdaptOptions,), json="print the record as one JSON object", describe=True),
    "transfer": Command(
        cmd_transfer,
        "score every expert alone (and the base model) on every task",
        (TransferOptions,),
        json="print the matrix as one JSON object",
    ),
    "routing-stats": Command(
        cmd_routing_stats,
        "where a router sends each task's prompt tokens; is it right?",
        (RoutingStatsOptions,),
        json="print one JSON object",
    ),
    "score": Command(
        cmd_score,
        "log-probability of each token of a text under a router",
        (ScoreOptions,),
        json="print one JSON object",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lorlib_ui", description="Build and route a library of LoRA experts.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help if command.describe else None)
        if command.library:
            sub.add_argument("library", nargs="+" if command.libraries else None)
        for options in command.options:
            add_options(sub, options)
        if command.json is not None:
            sub.add_argument("--json", action="store_true", help=command.json)
        if command.flags is not None:
            command.flags(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes between libraries
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv
        _quiet_libraries()
        COMMANDS[args.command].run(args)
        return 0
    except LorlibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`info | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # 128 + SIGPIPE
    except Exception as exc:  # a bug, not bad input: still one line, full trace on request
        if os.environ.get("LORLIB_DEBUG"):
            raise
        line = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: unexpected {type(exc).__name__}: {line} (set LORLIB_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
