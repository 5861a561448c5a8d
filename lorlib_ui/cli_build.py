"""The library-building commands of the command line: `build`, `cluster` and `evaluate`.

Their options are parsed in `lorlib_ui.cli` with the others; these functions do the work, with a
tqdm bar per expert on stderr, and append each finished command to the library's `history`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lorlib_ui.errors import LorlibError


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
