"""The library-building commands of the command line: `build`, `cluster`, `evaluate`, `lorahub`, `adapt`.

Their options are parsed in `lorlib_ui.cli.main` with the others; these functions do the work, with a
tqdm bar per expert on stderr, and append each finished command to the library's `history`.
"""

from __future__ import annotations

import json
import sys

from lorlib_ui.core.errors import LorlibError


def _positive(**values: float | None) -> None:
    for flag, value in values.items():
        if value is not None and not value > 0:
            raise LorlibError(f"--{flag.replace('_', '-')} must be positive, got {value}")


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


class _Bars:
    """On stderr, a tqdm bar of the experts trained so far and one per expert in training, fed by
    the builder's progress events (several at once in a Ray build; an expert whose worker died
    starts again from step 0)."""

    def __init__(self):
        self.bars = {}
        self.overall = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if self.overall is None:
            self.overall = tqdm(total=event.total, desc="experts trained", unit="expert", file=sys.stderr)
        bar = self.bars.get(event.expert)
        if bar is None or event.step < bar.n:
            if bar is not None:
                bar.close()
            where = f" on {event.worker}" if event.worker else ""
            desc = f"[{event.index}/{event.total}] {event.expert}{where}"
            bar = self.bars[event.expert] = tqdm(
                total=event.steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True
            )
        bar.update(event.step - bar.n)
        if event.loss is not None:
            bar.set_postfix(loss=f"{event.loss:.3f}", refresh=False)
        if event.step >= event.steps:
            bar.close()
            del self.bars[event.expert]
            self.overall.update()

    def close(self) -> None:
        for bar in [*self.bars.values(), self.overall]:
            if bar is not None:
                bar.close()
        self.bars, self.overall = {}, None


def _bar(desc: str, unit: str):
    """A progress callback drawing a tqdm bar on stderr from its first event, and the bars to close."""
    from tqdm import tqdm

    bars = []

    def progress(done: int, total: int, what: str) -> None:
        if not bars:
            bars.append(tqdm(desc=desc, unit=unit, total=total, file=sys.stderr))
        bars[0].set_postfix_str(what, refresh=False)
        bars[0].update(done - bars[0].n)

    return progress, bars


def _trainer(args):
    """The trainer the flags ask for: this process, or one Ray task per expert."""
    from lorlib_ui.build.trainers import LocalTrainer

    if args.backend == "ray":
        from lorlib_ui.worker.ray import RayTrainer

        return RayTrainer(args.address, args.device, args.bf16, cpus_per_task=args.cpus_per_task)
    if args.address:
        raise LorlibError("--address names a Ray cluster: use it with --backend ray")
    return LocalTrainer(args.device, args.bf16)


def _progress_bars(run):
    """Run `run(progress)` with a tqdm bar per expert; on Ctrl-C say how to resume."""
    bars = _Bars()
    try:
        return run(bars)
    except KeyboardInterrupt:
        bars.close()
        print("interrupted: finished experts are kept; run the same command again to resume", file=sys.stderr)
        raise
    finally:
        bars.close()


def _record_history(path: str, argv: list[str], seconds: float) -> None:
    import shlex

    from lorlib_ui.core.library import Library

    Library.open(path).record_history("python -m lorlib_ui " + shlex.join(argv), seconds)


def _log(line: str) -> None:
    print(line, file=sys.stderr)


def cmd_build(args) -> None:
    from lorlib_ui.build.building import build_library
    from lorlib_ui.build.config import TrainConfig
    from lorlib_ui.core.library import Library

    _positive(shared_steps=args.shared_steps)
    targets = tuple(_csv(args.targets) or [])
    if not targets:
        raise LorlibError("--targets is empty")
    config = TrainConfig(  # it checks the values
        rank=args.rank,
        targets=targets,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    report = _progress_bars(
        lambda progress: build_library(
            args.library,
            data=args.data,
            tasks=_csv(args.tasks),
            families=_csv(args.families),
            holdout_per_family=args.holdout_per_family,
            config=config,
            shared_steps=args.shared_steps,
            shared=not args.no_shared,
            force=args.force,
            base_model=args.base_model,
            trainer=_trainer(args),
            progress=progress,
            log=_log,
        )
    )
    _record_history(args.library, args.argv, report.seconds)
    library = Library.open(args.library)
    print(
        f"library {library.path}: trained {len(report.trained)}, skipped {len(report.skipped)} already there; "
        f"{len(library.experts)} experts, {len(report.held_out)} tasks held out ({report.seconds:.0f} s)"
    )
    if args.gates:  # PhatGoose gates for every expert of the build that lacks them
        built = report.trained + report.skipped
        _compute_keys(args, "gates", built, args.data) if built else None


def _compute_keys(args, kind: str, experts: list[str] | None, data: str | None) -> None:
    from lorlib_ui.build.keys import compute_keys

    options = {"examples": args.examples} if kind == "activations" else {"steps": args.gate_steps}
    report = _progress_bars(
        lambda progress: compute_keys(
            args.library,
            kind,
            data=data,
            experts=experts,
            seed=args.seed,
            force=getattr(args, "force_keys", False),
            device=args.device,
            progress=progress,
            **options,
        )
    )
    if report.computed:
        _record_history(args.library, args.argv, report.seconds)
    print(
        f"library {args.library}: {kind} computed for {len(report.computed)} experts, "
        f"{len(report.skipped)} already had them ({report.seconds:.0f} s)"
    )


def cmd_keys(args) -> None:
    """`gates` and `activations`: the routing keys PhatGoose and the hidden-state router need."""
    _compute_keys(args, args.command, _csv(args.experts), args.data)


def cmd_cluster(args) -> None:
    from lorlib_ui.build.clusters import cluster_and_train

    _positive(steps=args.steps)
    _, report = _progress_bars(
        lambda progress: cluster_and_train(
            args.library,
            args.k,
            steps=args.steps,
            train=not args.no_train,
            seed=args.seed,
            keep_quantile=args.keep_quantile,
            data=args.data,
            trainer=_trainer(args),
            force=args.force,
            progress=progress,
            log=_log,
            on_clustering=lambda summary: print(json.dumps(summary)) if args.json else _print_clustering(summary),
        )
    )
    if not args.no_train:
        print(f"trained {len(report.trained)} cluster experts, {len(report.skipped)} up to date", file=sys.stderr)
    _record_history(args.library, args.argv, report.seconds)


def cmd_evaluate(args) -> None:
    from lorlib_ui.build.config import TASK_SETS
    from lorlib_ui.build.evaluation import evaluate_library, format_differences, format_table

    tasks = args.tasks if args.tasks in TASK_SETS else (_csv(args.tasks) or [])
    routers = None if args.routers is None else (_csv(args.routers) or [])
    _positive(limit=args.limit)
    bar, bars = _bar("evaluate", "task")  # made at the first progress event: a refusal prints one line only

    def progress(done, total, router, task):
        bar(done, total, f"{router} on {task}")

    try:
        record, notes = evaluate_library(
            args.library,
            tasks,
            routers,
            args.data,
            args.limit,
            args.device,
            args.dtype,
            progress,
            split=args.split,
            top_k=args.top_k,
            shots=args.shots,
            density=args.density,
        )
    finally:
        for bar in bars:
            bar.close()
    _record_history(args.library, args.argv, record["seconds"])
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps(record))
        return
    rows = "" if record["split"] == "test" else f", on {record['split']} rows"
    print(f"zero-shot on {len(record['tasks'])} tasks ({', '.join(record['tasks'])}){rows}, {record['seconds']:.0f} s")
    print("means over tasks; [95% bootstrap interval over test rows]")
    for kind, summary in (record.get("summary_by") or {"": record["summary"]}).items():
        print(f"\n{kind} tasks:" if kind else "")
        print(format_table(summary))
    if record["differences"]:
        print("\npaired differences, over the same test rows:")
        print(format_differences(record["differences"]))


def cmd_lorahub(args) -> None:
    from dataclasses import asdict

    from lorlib_ui.build.lorahub import lorahub_expert

    bar, bars = _bar("lorahub search", "evaluation")  # made at the first progress event

    def progress(done, total, best):
        bar(done, total, f"best objective {best:.3f}")

    try:
        report = lorahub_expert(
            args.library,
            args.task,
            data=args.data,
            shots=args.shots,
            budget=args.budget,
            seed=args.seed,
            experts=args.experts,
            force=args.force,
            device=args.device,
            dtype=args.dtype,
            progress=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    if not report.reused:
        _record_history(args.library, args.argv, report.seconds)
    expert, training = report.expert, report.expert.training
    if args.json:
        print(json.dumps({"reused": report.reused, "seconds": round(report.seconds, 1), "expert": asdict(expert)}))
        return
    how = "already in the library (--force searches again)" if report.reused else f"stored ({report.seconds:.0f} s)"
    print(
        f"answer loss on {training['shots']} training rows of {training['task']}: "
        f"{training['loss_uniform']:.4f} with uniform weights, {training['loss']:.4f} with LoraHub's"
    )
    top = sorted(training["weights"].items(), key=lambda item: -abs(item[1]))[:5]
    print("largest weights: " + ", ".join(f"{name} {weight:+.3f}" for name, weight in top))
    print(f"expert {expert.name}: {how}; route with --router expert:{expert.name}")


def cmd_adapt(args) -> None:
    from lorlib_ui.build.adapt import adapt_library, format_curve, format_runs
    from lorlib_ui.build.evaluation import format_differences, format_table

    try:
        shots = [int(x) for x in _csv(args.shots) or []]
    except ValueError:
        raise LorlibError(f"--shots takes whole numbers separated by commas, got {args.shots!r}") from None
    _positive(steps=args.steps, budget=args.budget, limit=args.limit)
    record, notes = _progress_bars(
        lambda progress: adapt_library(
            args.library,
            args.task,
            data=args.data,
            shots=shots,
            methods=_csv(args.methods),
            steps=args.steps,
            seed=args.seed,
            limit=args.limit,
            budget=args.budget,
            force=args.force,
            device=args.device,
            progress=progress,
            log=_log,
        )
    )
    _record_history(args.library, args.argv, record["seconds"])
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps(record))
        return
    rows = record["zero_shot"][0]["examples"]
    print(f"{record['task']}: {rows} test rows, {record['steps']} training steps, seed {record['seed']}")
    print("[95% bootstrap interval over test rows]")
    print(format_table(record["summary"]))
    print("\npaired differences, over the same test rows:")
    print(format_differences(record["differences"]))
    print("\ntraining:")
    print(format_runs(record))
    if curve := format_curve(record):
        print("\nlearning curve, exact match % (answer log-likelihood):")
        print(curve)


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
