"""Command line: `python -m lorlib_ui COMMAND`.

The command names, their options and the JSON they print are a contract (README).
Bad input exits non-zero with one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorlib_ui.cli.analysis import cmd_adapt, cmd_evaluate, cmd_routing_stats, cmd_transfer
from lorlib_ui.cli.training import cmd_build, cmd_cluster, cmd_keys, cmd_lorahub
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers import DEFAULT_TOP_K, MIXES, ROUTERS, help_text, presets
from lorlib_ui.core.routers.lorahub import DEFAULT_BUDGET, DEFAULT_SHOTS
from lorlib_ui.training.config import (
    ACTIVATION_EXAMPLES,
    ADAPT_METHODS,
    ANALYSIS_ROWS,
    GATE_STEPS,
    KEEP_QUANTILE,
    TrainConfig,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise LorlibError(f"{self.prog}: {message}")


def _router_options(parser: argparse.ArgumentParser, default: str = "arrow") -> None:
    parser.add_argument("--router", default=default, help=help_text())
    parser.add_argument(
        "--top-k", type=int, default=None, help=f"experts per token (default {DEFAULT_TOP_K}, or all if fewer)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="arrow softmax temperature (> 0)")
    parser.add_argument(
        "--mix",
        default="outputs",
        choices=MIXES,
        help="combine the chosen experts' outputs (PEFT) or their parameters (paper's code)",
    )
    parser.add_argument(
        "--density", type=float, default=None, help="ties: share of each expert's entries kept (default 0.2)"
    )
    parser.add_argument("--base-model", default=None, help="override the library's base model (must fit it)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _dataset_options(parser: argparse.ArgumentParser, limit: int | None, limit_help: str) -> None:
    """Which tasks' test rows a command reads (evaluate, transfer, routing-stats)."""
    parser.add_argument(
        "--tasks", default="held-out", help="held-out, seen (tasks the library trained on), all, or comma-separated"
    )
    parser.add_argument("--data", default=None, help="test data (default: what the library was built from)")
    parser.add_argument("--limit", type=int, default=limit, help=limit_help)


def _training_options(parser: argparse.ArgumentParser) -> None:
    """TrainConfig's settings, with its defaults (it checks the values)."""
    defaults = TrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per expert")
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--targets", default=",".join(defaults.targets), help="comma-separated module names")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    _trainer_options(parser)


def _trainer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: if fast)")
    parser.add_argument(
        "--backend",
        choices=["local", "ray"],
        default=os.environ.get("LORLIB_BACKEND", "local"),
        help="local: one expert after another in this process; ray: one Ray task per expert, in parallel "
        "(default: $LORLIB_BACKEND or local)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("LORLIB_RAY_ADDRESS"),
        help="Ray cluster address host:port (default: $LORLIB_RAY_ADDRESS, else a private Ray on this machine)",
    )
    parser.add_argument("--cpus-per-task", type=float, default=1, help="Ray: CPUs per expert's task (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lorlib_ui", description="Build and route a library of LoRA experts.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fetch = commands.add_parser("fetch-model", help="make the base model available and print its local path")
    fetch.add_argument("--base-model", default=None)

    new = commands.add_parser("new", help="create an empty library on a base model")
    new.add_argument("library")
    new.add_argument("--base-model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    new.add_argument("--exist-ok", action="store_true", help="succeed if a library on that base model exists")

    imp = commands.add_parser("import-peft", help="create or extend a library from PEFT LoRA adapter folders")
    imp.add_argument("library")
    imp.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR")
    imp.add_argument("--base-model", default=None, help="base model of a new library (default: embedded SmolLM2)")
    imp.add_argument("--name", default=None, help="expert name (one adapter only; default: the folder name)")
    imp.add_argument(
        "--kind",
        default="imported",
        choices=["private", "cluster", "shared", "imported", "general"],
        help="general: general knowledge, which arrow_gks subtracts from the other experts (default imported)",
    )
    imp.add_argument("--tasks", default="", help="comma-separated tasks the expert was trained on")
    imp.add_argument("--family", default=None)
    imp.add_argument("--force", action="store_true", help="replace experts of the same name")

    about = (
        "mark experts general: arrow_gks (GenKnowSub) subtracts their mean from the others and never routes "
        "to them; their kind stays, and so does the mark when an expert is replaced"
    )
    mark = commands.add_parser("mark-general", help=about, description=about)
    mark.add_argument("library")
    mark.add_argument("names", nargs="+", metavar="NAME", help="experts of the library")
    mark.add_argument("--unmark", action="store_true", help="make them ordinary experts again")

    about = "remove experts from a library (in one atomic step)"
    remove = commands.add_parser("remove", help=about, description=about)
    remove.add_argument("library")
    remove.add_argument("names", nargs="+", metavar="NAME", help="experts of the library")

    info = commands.add_parser("info", help="list the experts of a library")
    info.add_argument("library")
    info.add_argument("--json", action="store_true")

    route = commands.add_parser("route", help="generate under a router and report the routing")
    route.add_argument("library")
    route.add_argument("--prompt", required=True)
    route.add_argument("--max-new-tokens", type=int, default=64)
    route.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    _router_options(route)

    build = commands.add_parser("build", help="train private experts per task (and a shared expert) into a library")
    build.add_argument("library")
    build.add_argument("--data", default="default", help="default (embedded BIG-bench), a file, a folder or a hub id")
    pick = build.add_mutually_exclusive_group()
    pick.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    pick.add_argument("--families", default=None, help="comma-separated families")
    build.add_argument("--holdout-per-family", type=int, default=0, help="tasks per family kept out for evaluation")
    _training_options(build)
    build.add_argument("--shared-steps", type=int, default=None, help="steps of the shared expert (default 4 x steps)")
    build.add_argument("--no-shared", action="store_true", help="do not train the shared (all tasks) expert")
    build.add_argument("--force", action="store_true", help="retrain experts that are already in the library")
    build.add_argument("--base-model", default=None, help="base model of a new library (default: embedded SmolLM2)")
    build.add_argument(
        "--gates", action="store_true", help=f"then train PhatGoose gates for its experts ({GATE_STEPS} steps each)"
    )
    build.set_defaults(gate_steps=GATE_STEPS)

    for kind, helptext in (
        ("gates", "train PhatGoose gates for experts that lack them (base and experts frozen)"),
        ("activations", "mean hidden states of experts' own examples, for the avg_act router"),
    ):
        keys = commands.add_parser(kind, help=helptext)
        keys.add_argument("library")
        keys.add_argument("--experts", default=None, help="a kind (private, cluster, ...) or comma-separated experts")
        keys.add_argument("--data", default=None, help="training data (default: what the library was built from)")
        if kind == "gates":
            keys.add_argument("--gate-steps", "--steps", type=int, default=GATE_STEPS, help="steps per expert")
        else:
            keys.add_argument("--examples", type=int, default=ACTIVATION_EXAMPLES, help="examples per expert")
        keys.add_argument("--seed", type=int, default=0)
        keys.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
        keys.add_argument("--force", dest="force_keys", action="store_true", help="compute again where present")

    cluster = commands.add_parser("cluster", help="MBC: cluster the private experts, then train one expert per cluster")
    cluster.add_argument("library")
    cluster.add_argument("--k", type=int, required=True, help="number of clusters")
    cluster.add_argument("--steps", type=int, default=None, help="steps per cluster expert (default 2 x private)")
    cluster.add_argument("--no-train", action="store_true", help="only compute and record the clusters")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument(
        "--keep-quantile", type=float, default=KEEP_QUANTILE, help="sparsify: keep |w| above this quantile"
    )
    cluster.add_argument("--data", default=None, help="training data (default: what the library was built from)")
    _trainer_options(cluster)
    cluster.add_argument("--force", action="store_true", help="retrain cluster experts that are up to date")
    cluster.add_argument("--json", action="store_true", help="print the clustering as one JSON object")

    evaluate = commands.add_parser("evaluate", help="zero-shot evaluation of routers on held-out tasks")
    evaluate.add_argument("library")
    _dataset_options(evaluate, None, "at most this many test rows per task (default: all)")
    by_name = [cls.name for cls in ROUTERS.values() if cls.per_task and cls.name not in presets().values()]
    evaluate.add_argument(
        "--routers",
        default=None,
        help=f"comma-separated: {', '.join(f'{name} ({spec})' for name, spec in presets().items())} "
        "(default: all of these that the library allows), or any router spec such as arrow@cluster "
        f"or {' or '.join(by_name)} (per task, few-shot: see --shots)",
    )
    evaluate.add_argument(
        "--shots",
        type=int,
        default=DEFAULT_SHOTS,
        help=f"training rows per task that few-shot routers (lorahub) learn from (default {DEFAULT_SHOTS})",
    )
    evaluate.add_argument(
        "--split", default="test", choices=["test", "validation"], help="validation: for ablations (default test)"
    )
    evaluate.add_argument(
        "--top-k", type=int, default=None, help=f"experts per token for arrow (default {DEFAULT_TOP_K})"
    )
    evaluate.add_argument(
        "--density", type=float, default=None, help="ties: share of each expert's entries kept (default 0.2)"
    )
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--dtype", default=None)
    evaluate.add_argument("--json", action="store_true", help="print the results as one JSON object")

    lorahub = commands.add_parser(
        "lorahub", help="LoraHub: search a merge of experts on a few examples of a task; store it as an expert"
    )
    lorahub.add_argument("library")
    _task_options(lorahub, "the task whose training rows are the examples")
    lorahub.add_argument("--shots", type=int, default=DEFAULT_SHOTS, help=f"examples (default {DEFAULT_SHOTS})")
    lorahub.add_argument(
        "--budget", type=int, default=DEFAULT_BUDGET, help=f"evaluations of the search (default {DEFAULT_BUDGET})"
    )
    lorahub.add_argument("--seed", type=int, default=0, help="draws the examples and seeds the search")
    lorahub.add_argument("--experts", default=None, help="a kind to merge (default: private and imported experts)")
    lorahub.add_argument("--force", action="store_true", help="search again when the expert is already there")
    lorahub.add_argument("--device", default=None)
    lorahub.add_argument("--dtype", default=None)
    lorahub.add_argument("--json", action="store_true", help="print the stored expert as one JSON object")

    about = "learn a new task from a few of its examples by reusing the library; compare the ways to"
    adapt = commands.add_parser("adapt", help=about, description=about)
    adapt.add_argument("library")
    _task_options(adapt, "the task to learn (a held-out task, or one of --data)")
    adapt.add_argument("--shots", default="32", help="training examples, or several for a learning curve: 8,32,128")
    adapt.add_argument("--methods", default=None, help=f"comma-separated, of {','.join(ADAPT_METHODS)} (default: all)")
    adapt.add_argument("--steps", type=int, default=None, help="training steps (default: the library's experts')")
    adapt.add_argument("--budget", type=int, default=None, help=f"LoraHub's evaluations (default {DEFAULT_BUDGET})")
    adapt.add_argument("--seed", type=int, default=0, help="draws the examples and seeds the training")
    adapt.add_argument("--limit", type=int, default=None, help="test rows scored (default: all)")
    adapt.add_argument("--force", action="store_true", help="train again what the library already holds")
    adapt.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    adapt.add_argument("--json", action="store_true", help="print the record as one JSON object")

    transfer = commands.add_parser("transfer", help="score every expert alone (and the base model) on every task")
    transfer.add_argument("library")
    _dataset_options(transfer, ANALYSIS_ROWS, f"test rows per task (default {ANALYSIS_ROWS})")
    transfer.add_argument("--experts", default=None, help="a kind (private, cluster, ...) or comma-separated experts")
    transfer.add_argument("--exact-match", action="store_true", help="also generate answers for exact match (slower)")
    transfer.add_argument("--device", default=None)
    transfer.add_argument("--dtype", default=None)
    transfer.add_argument("--json", action="store_true", help="print the matrix as one JSON object")

    stats = commands.add_parser("routing-stats", help="where a router sends each task's prompt tokens; is it right?")
    stats.add_argument("library")
    _dataset_options(stats, ANALYSIS_ROWS, f"test prompts per task (default {ANALYSIS_ROWS})")
    _router_options(stats, default="arrow@private")

    score = commands.add_parser("score", help="log-probability of each token of a text under a router")
    score.add_argument("library")
    score.add_argument("--text", required=True)
    _router_options(score)
    return parser


def _task_options(parser, task_help: str) -> None:
    """--task and --data of the commands that learn from a few rows of one task (lorahub, adapt)."""
    parser.add_argument("--task", required=True, help=task_help)
    parser.add_argument(
        "--data",
        default=None,
        help="tasks' data as for build, or a file of the task's rows alone (default: what the library was built from)",
    )


def cmd_fetch_model(args) -> None:
    from lorlib_ui.core.base_model import resolve_base_model

    print(resolve_base_model(args.base_model))


def cmd_new(args) -> None:
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import MANIFEST, Library

    base = base_model_info(args.base_model)
    if args.exist_ok and (Path(args.library) / MANIFEST).is_file():
        library = Library.open(args.library)
        library.check_base(base)
        print(f"library {library.path} exists: {len(library.experts)} experts on {library.base_model}")
        return
    library = Library.create(args.library, base)
    print(f"created empty library {library.path} on {library.base_model}")


def cmd_import_peft(args) -> None:
    from lorlib_ui.core.library import Library, import_adapters
    from lorlib_ui.training.clusters import keep_gram

    if args.name and len(args.adapters) > 1:
        raise LorlibError("--name can only be used with a single adapter folder")
    stored = import_adapters(
        args.library,
        args.adapters,
        names=[args.name] if args.name else None,
        base_model=args.base_model,
        kind=args.kind,
        tasks=[t for t in args.tasks.split(",") if t] or None,
        family=args.family,
        force=args.force,
    )
    keep_gram(Library.open(args.library))
    for e in stored:
        print(f"imported {e.name} (rank {e.rank}, {', '.join(e.target_modules)}) into {args.library}")


def cmd_mark_general(args) -> None:
    from lorlib_ui.core.library import Library

    library = Library.open(args.library)
    library.mark_general(args.names, general=not args.unmark)
    for name in dict.fromkeys(args.names):
        print(f"{name} is {'no longer' if args.unmark else 'now'} general in {library.path}")


def cmd_remove(args) -> None:
    from lorlib_ui.core.library import Library

    library = Library.open(args.library)
    for name in dict.fromkeys(args.names):
        library.expert(name)  # every name known before anything is removed
    with library.edit() as current:
        current.experts = [e for e in current.experts if e.name not in args.names]
    print(f"removed {', '.join(dict.fromkeys(args.names))} from {library.path}")


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


def _routed(args):
    from lorlib_ui.core.library import Library
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.core.routers import make_router

    library = Library.open(args.library)
    router = make_router(
        args.router,
        library.names,
        args.top_k,
        args.temperature,
        args.mix,
        groups=library.groups(),
        density=args.density,
    )
    if (problem := library.lacks_for(router)) is not None:  # before the model loads
        raise LorlibError(problem)
    return RoutedModel.load(library, base_model=args.base_model, device=args.device, dtype=args.dtype), router


def cmd_route(args) -> None:
    from lorlib_ui.core.generation import generate

    _check_prompt(args.prompt, "--prompt")
    rm, router = _routed(args)
    result = generate(rm, args.prompt, router, max_new_tokens=args.max_new_tokens, chat=not args.raw)
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


def cmd_score(args) -> None:
    from lorlib_ui.core.generation import score

    _check_prompt(args.text, "--text")
    rm, router = _routed(args)
    result = score(rm, args.text, router)
    if args.json:
        print(json.dumps({"tokens": result.tokens, "logprobs": result.logprobs}))
        return
    for token, lp in zip(result.tokens, result.logprobs):
        print(f"{'' if lp is None else f'{lp:8.3f}':>8}  {token!r}")


def _check_prompt(text: str, flag: str) -> None:
    """Fail fast, before loading a model, on an empty prompt."""
    if not text.strip():
        raise LorlibError(f"{flag} is empty")


COMMANDS = {
    "fetch-model": cmd_fetch_model,
    "new": cmd_new,
    "import-peft": cmd_import_peft,
    "mark-general": cmd_mark_general,
    "remove": cmd_remove,
    "info": cmd_info,
    "route": cmd_route,
    "score": cmd_score,
    "build": cmd_build,
    "cluster": cmd_cluster,
    "evaluate": cmd_evaluate,
    "lorahub": cmd_lorahub,
    "adapt": cmd_adapt,
    "transfer": cmd_transfer,
    "routing-stats": cmd_routing_stats,
    "gates": cmd_keys,
    "activations": cmd_keys,
}


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
        COMMANDS[args.command](args)
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
