"""Command line: `python -m lorlib_ui COMMAND`.

The command names, their options and the JSON they print are a contract (README, issue #2).
Bad input exits non-zero with one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorlib_ui.errors import LorlibError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise LorlibError(f"{self.prog}: {message}")


def _router_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--router",
        default="arrow",
        help="arrow, uniform, mean_delta, base or expert:NAME; arrow@KIND (e.g. arrow@private) "
        "limits it to the experts of one kind",
    )
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (default 4, or all if fewer)")
    parser.add_argument("--temperature", type=float, default=1.0, help="arrow softmax temperature (> 0)")
    parser.add_argument(
        "--mix",
        default="outputs",
        choices=["outputs", "parameters"],
        help="combine the chosen experts' outputs (PEFT) or their parameters (paper's code)",
    )
    parser.add_argument("--base-model", default=None, help="override the library's base model (must fit it)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _training_options(parser: argparse.ArgumentParser, steps: int) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per expert")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated module names")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: if fast)")


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
    imp.add_argument("--kind", default="imported", choices=["private", "cluster", "shared", "imported"])
    imp.add_argument("--tasks", default="", help="comma-separated tasks the expert was trained on")
    imp.add_argument("--family", default=None)
    imp.add_argument("--force", action="store_true", help="replace experts of the same name")

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
    _training_options(build, steps=100)
    build.add_argument("--shared-steps", type=int, default=None, help="steps of the shared expert (default 4 x steps)")
    build.add_argument("--no-shared", action="store_true", help="do not train the shared (all tasks) expert")
    build.add_argument("--force", action="store_true", help="retrain experts that are already in the library")
    build.add_argument("--base-model", default=None, help="base model of a new library (default: embedded SmolLM2)")

    cluster = commands.add_parser("cluster", help="MBC: cluster the private experts, then train one expert per cluster")
    cluster.add_argument("library")
    cluster.add_argument("--k", type=int, required=True, help="number of clusters")
    cluster.add_argument("--steps", type=int, default=None, help="steps per cluster expert (default 2 x private)")
    cluster.add_argument("--no-train", action="store_true", help="only compute and record the clusters")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--keep-quantile", type=float, default=0.5, help="sparsify: keep |w| above this quantile")
    cluster.add_argument("--data", default=None, help="training data (default: what the library was built from)")
    cluster.add_argument("--device", default=None)
    cluster.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    cluster.add_argument("--force", action="store_true", help="retrain cluster experts that are up to date")
    cluster.add_argument("--json", action="store_true", help="print the clustering as one JSON object")

    evaluate = commands.add_parser("evaluate", help="zero-shot evaluation of routers on held-out tasks")
    evaluate.add_argument("library")
    evaluate.add_argument("--tasks", default="held-out", help="held-out (the library's) or comma-separated tasks")
    evaluate.add_argument(
        "--routers",
        default=None,
        help="comma-separated: base, uniform, arrow (over private experts), arrow-cluster, shared, oracle "
        "(default: all of these that the library allows), "
        "or any router spec such as arrow@cluster or expert:NAME",
    )
    evaluate.add_argument("--data", default=None, help="test data (default: what the library was built from)")
    evaluate.add_argument("--limit", type=int, default=None, help="at most this many test rows per task")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--dtype", default=None)
    evaluate.add_argument("--json", action="store_true", help="print the results as one JSON object")

    score = commands.add_parser("score", help="log-probability of each token of a text under a router")
    score.add_argument("library")
    score.add_argument("--text", required=True)
    _router_options(score)
    return parser


def cmd_fetch_model(args) -> None:
    from lorlib_ui.base_model import resolve_base_model

    print(resolve_base_model(args.base_model))


def cmd_new(args) -> None:
    from lorlib_ui.base_model import base_model_info
    from lorlib_ui.library import MANIFEST, Library

    base = base_model_info(args.base_model)
    if args.exist_ok and (Path(args.library) / MANIFEST).is_file():
        library = Library.open(args.library)
        library.check_base(base)
        print(f"library {library.path} exists: {len(library.experts)} experts on {library.base_model}")
        return
    library = Library.create(args.library, base)
    print(f"created empty library {library.path} on {library.base_model}")


def cmd_import_peft(args) -> None:
    from lorlib_ui.adapters import read_adapter
    from lorlib_ui.base_model import base_model_info
    from lorlib_ui.library import MANIFEST, Library, check_name, expert_from_adapter

    if args.name and len(args.adapters) > 1:
        raise LorlibError("--name can only be used with a single adapter folder")
    # Check everything before touching the library: a refused import leaves it byte-for-byte as it was.
    # (Library.add_experts checks again under its lock; these checks matter when the library is new.)
    names = [check_name(args.name or Path(d).resolve().name) for d in args.adapters]
    adapters = [read_adapter(d) for d in args.adapters]
    exists = (Path(args.library) / MANIFEST).is_file()
    library = Library.open(args.library) if exists else None
    if library is None or args.base_model:
        base = base_model_info(args.base_model)
        if library is not None:
            library.check_base(base)
    shapes = library.base_shapes if library else base.linear_shapes
    base_name = library.base_model if library else base.name
    for name, adapter in zip(names, adapters):
        adapter.check_fits(shapes, f"adapter {name}")
    tasks = [t for t in args.tasks.split(",") if t]
    entries = [
        (expert_from_adapter(n, a, base_name, kind=args.kind, tasks=tasks or [n], family=args.family), a)
        for n, a in zip(names, adapters)
    ]
    library = library or Library.create(args.library, base)
    stored = library.add_experts(entries, force=args.force)
    for e in stored:
        print(f"imported {e.name} (rank {e.rank}, {', '.join(e.target_modules)}) into {library.path}")


def cmd_info(args) -> None:
    from lorlib_ui.library import Library

    library = Library.open(args.library)
    if args.json:
        print(json.dumps(library.manifest(), indent=1))
        return
    print(f"library {library.path}: {len(library.experts)} experts on {library.base_model}")
    if not library.experts:
        return
    rows = [("name", "kind", "rank", "targets", "family", "tasks")]
    for e in library.experts:
        rows.append(
            (e.name, e.kind, str(e.rank), ",".join(e.target_modules), e.family or "-", ",".join(e.tasks) or "-")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _routed(args):
    from lorlib_ui.library import Library
    from lorlib_ui.routed_model import RoutedModel
    from lorlib_ui.routers import make_router

    library = Library.open(args.library)
    router = make_router(args.router, library.names, args.top_k, args.temperature, args.mix, groups=library.groups())
    return RoutedModel.load(library, base_model=args.base_model, device=args.device, dtype=args.dtype), router


def cmd_route(args) -> None:
    from lorlib_ui.generation import generate

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
    from lorlib_ui.generation import score

    _check_prompt(args.text, "--text")
    rm, router = _routed(args)
    result = score(rm, args.text, router)
    if args.json:
        print(json.dumps({"tokens": result.tokens, "logprobs": result.logprobs}))
        return
    for token, lp in zip(result.tokens, result.logprobs):
        print(f"{'' if lp is None else f'{lp:8.3f}':>8}  {token!r}")


def _positive(**values: float | None) -> None:
    for flag, value in values.items():
        if value is not None and not value > 0:
            raise LorlibError(f"--{flag.replace('_', '-')} must be positive, got {value}")


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


class _Bars:
    """A tqdm bar per expert on stderr, fed by the builder's progress events."""

    def __init__(self):
        self.bar = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.step == 0:
            self.close()
            desc = f"[{event.index}/{event.total}] {event.expert}"
            self.bar = tqdm(total=event.steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
            return
        self.bar.update(event.step - self.bar.n)
        self.bar.set_postfix(loss=f"{event.loss:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _trainer(base_model: str, device: str | None, bf16: str):
    from lorlib_ui.base_model import load_base_model
    from lorlib_ui.training import fast_bf16

    model, tokenizer = load_base_model(base_model, device=device, dtype="float32")
    use_bf16 = bf16 == "on" or (bf16 == "auto" and fast_bf16(model.device))
    return model, tokenizer, use_bf16


def _train(library, data, jobs, model, tokenizer, config, force: bool):
    from lorlib_ui.building import train_jobs

    bars = _Bars()
    try:
        return train_jobs(library, data, jobs, model, tokenizer, config, force=force, progress=bars)
    except KeyboardInterrupt:
        bars.close()
        print("interrupted: finished experts are kept; run the same command again to resume", file=sys.stderr)
        raise
    finally:
        bars.close()


def _record_history(library, argv: list[str], seconds: float) -> None:
    import shlex
    from datetime import UTC, datetime

    with library.edit() as current:
        current.extra.setdefault("history", []).append(
            {
                "command": "python -m lorlib_ui " + shlex.join(argv),
                "seconds": round(seconds, 1),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )


def cmd_build(args) -> None:
    import time

    from lorlib_ui.base_model import base_model_info
    from lorlib_ui.building import hold_out, private_jobs, shared_job
    from lorlib_ui.data import load_tasks
    from lorlib_ui.library import MANIFEST, Library
    from lorlib_ui.training import TrainConfig

    start = time.perf_counter()
    _positive(steps=args.steps, rank=args.rank, batch_size=args.batch_size, learning_rate=args.learning_rate)
    _positive(shared_steps=args.shared_steps)
    targets = tuple(_csv(args.targets) or [])
    if not targets:
        raise LorlibError("--targets is empty")
    data = load_tasks(args.data)
    tasks, families = _csv(args.tasks), _csv(args.families)
    if tasks == [] or families == []:
        raise LorlibError("--tasks or --families is empty")
    selected = data.select(tasks=tasks, families=families)
    exists = (Path(args.library) / MANIFEST).is_file()
    library = Library.open(args.library) if exists else None
    base = base_model_info(args.base_model) if library is None or args.base_model else None
    if library is not None and base is not None:
        library.check_base(base)
    shapes = library.base_shapes if library else base.linear_shapes
    for target in targets:
        if not any(m == target or m.endswith("." + target) for m in shapes):
            raise LorlibError(f"--targets: the base model has no linear layer named {target!r}")
    recorded = set((library.extra.get("held_out") or {}).get("tasks", [])) if library else set()
    held = sorted(recorded | set(hold_out(selected, args.holdout_per_family, args.seed)))
    if tasks and (asked := [t for t in tasks if t in recorded]):
        raise LorlibError(f"task {asked[0]!r} is held out of library {args.library} for evaluation")
    train_tasks = [t for t in selected.tasks if t not in held]
    if not train_tasks:
        raise LorlibError("no tasks left to train after holding out")
    library = library or Library.create(args.library, base)
    local = args.data != "default" and Path(args.data).exists()
    source = str(Path(args.data).resolve()) if local else args.data  # else "default" or a hub id
    with library.edit() as current:
        current.extra["held_out"] = {"data": source, "tasks": held}
    config = TrainConfig(
        rank=args.rank,
        targets=targets,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    model, tokenizer, config.bf16 = _trainer(library.base_model, args.device, args.bf16)
    if held:
        print(f"held out for evaluation: {', '.join(held)}", file=sys.stderr)
    report = _train(library, data, private_jobs(data, train_tasks), model, tokenizer, config, args.force)
    if not args.no_shared:
        job = shared_job(library, data, args.shared_steps or 4 * args.steps)
        shared = _train(library, data, [job], model, tokenizer, config, args.force)
        report.trained += shared.trained
        report.skipped += shared.skipped
    _record_history(library, args.argv, time.perf_counter() - start)
    print(
        f"library {library.path}: trained {len(report.trained)}, skipped {len(report.skipped)} already there; "
        f"{len(library.experts)} experts, {len(held)} tasks held out ({time.perf_counter() - start:.0f} s)"
    )


def cmd_cluster(args) -> None:
    import time

    from lorlib_ui.building import cluster_jobs, cluster_library, record_clustering, task_experts
    from lorlib_ui.data import load_tasks
    from lorlib_ui.library import Library
    from lorlib_ui.training import TrainConfig

    start = time.perf_counter()
    _positive(steps=args.steps)
    library = Library.open(args.library)
    clustering = cluster_library(library, args.k, seed=args.seed, keep_quantile=args.keep_quantile)
    recipe = task_experts(library)[0].training or {}
    steps = args.steps or 2 * int(recipe.get("steps", 100))
    jobs = cluster_jobs(library, clustering, steps)
    data = None
    if not args.no_train:  # every task of every cluster must be in the data before anything is written
        data = load_tasks(args.data or (library.extra.get("held_out") or {}).get("data") or "default")
        for task in {t for job in jobs for t in job.tasks}:
            data.family_of(task)
    dropped = record_clustering(library, clustering, jobs, drop_stale=not args.no_train)
    summary = library.clusters
    if args.json:
        print(json.dumps(summary))
    else:
        _print_clustering(summary)
    if dropped:
        print(f"removed cluster experts of an earlier clustering: {', '.join(dropped)}", file=sys.stderr)
    if data is not None:
        config = TrainConfig(
            rank=int(recipe.get("rank", 4)),
            targets=tuple(recipe.get("targets", TrainConfig.targets)),
            steps=steps,
            batch_size=int(recipe.get("batch_size", 8)),
            learning_rate=float(recipe.get("learning_rate", 1e-3)),
            seed=args.seed,
        )
        model, tokenizer, config.bf16 = _trainer(library.base_model, args.device, args.bf16)
        report = _train(library, data, jobs, model, tokenizer, config, args.force)
        print(f"trained {len(report.trained)} cluster experts, {len(report.skipped)} up to date", file=sys.stderr)
    _record_history(library, args.argv, time.perf_counter() - start)


def cmd_evaluate(args) -> None:
    import time

    from tqdm import tqdm

    from lorlib_ui.data import load_tasks
    from lorlib_ui.evaluation import DEFAULT_ROUTERS, evaluate, format_table, resolve_routers, result_record
    from lorlib_ui.library import Library
    from lorlib_ui.routed_model import RoutedModel

    start = time.perf_counter()
    _positive(limit=args.limit)
    library = Library.open(args.library)
    if not library.experts:
        raise LorlibError(f"library {library.path} has no experts to evaluate")
    recorded = library.extra.get("held_out") or {}
    source = args.data or recorded.get("data") or "default"
    if args.tasks == "held-out":
        tasks = recorded.get("tasks") or []
        if not tasks:
            raise LorlibError(f"library {library.path} holds no tasks out; name them with --tasks T1,T2")
    else:
        tasks = _csv(args.tasks) or []
        if not tasks:
            raise LorlibError("--tasks is empty")
    names = list(DEFAULT_ROUTERS) if args.routers is None else _csv(args.routers)
    if not names:
        raise LorlibError("--routers is empty")
    routers, notes = resolve_routers(library, names, explicit=args.routers is not None)
    data = load_tasks(source)
    for task in tasks:
        data.family_of(task)  # an unknown task fails here, before the model loads
    rm = RoutedModel.load(library, device=args.device, dtype=args.dtype)
    with tqdm(total=len(routers) * len(tasks), desc="evaluate", unit="task", file=sys.stderr) as bar:

        def progress(done, total, router, task):
            bar.set_postfix_str(f"{router} on {task}", refresh=False)
            bar.update(done - bar.n)

        scores = evaluate(rm, data, tasks, routers, limit=args.limit, progress=progress)
    record = result_record(scores, routers, source, args.limit, time.perf_counter() - start)
    with library.edit() as current:
        current.extra["evaluation"] = record
    _record_history(library, args.argv, time.perf_counter() - start)
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps(record))
        return
    print(f"zero-shot on {len(tasks)} tasks ({', '.join(tasks)}), {record['seconds']:.0f} s:")
    print(format_table(record["summary"]))


def _print_clustering(summary: dict) -> None:
    scores = {int(k): v for k, v in summary["silhouette"].items()}
    print(f"MBC with k={summary['k']}:")
    for name, members in summary["members"].items():
        print(f"  {name}: {', '.join(members)}")
    if summary["ari_vs_families"] is not None:
        print(f"adjusted Rand index against the task families: {summary['ari_vs_families']:.3f}")
    if scores:
        best = max(scores, key=scores.get)
        print("silhouette by k: " + ", ".join(f"{k}: {v:.3f}" for k, v in scores.items()))
        print(f"suggested k (highest silhouette): {best}")


def _check_prompt(text: str, flag: str) -> None:
    """Fail fast, before loading a model, on an empty prompt."""
    if not text.strip():
        raise LorlibError(f"{flag} is empty")


COMMANDS = {
    "fetch-model": cmd_fetch_model,
    "new": cmd_new,
    "import-peft": cmd_import_peft,
    "info": cmd_info,
    "route": cmd_route,
    "score": cmd_score,
    "build": cmd_build,
    "cluster": cmd_cluster,
    "evaluate": cmd_evaluate,
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
    except Exception as exc:  # a bug, not bad input: still one line, full trace on request
        if os.environ.get("LORLIB_DEBUG"):
            raise
        line = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: unexpected {type(exc).__name__}: {line} (set LORLIB_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
