"""The commands that make experts: `build`, `gates` and `activations`, `cluster`, `lorahub`.

Their options are parsed in `lorlib_ui.cli.main` with the others; these functions do the work, with a
tqdm bar per expert on stderr, and append each finished command to the library's `history`.
"""

from __future__ import annotations

import json
import sys

from lorlib_ui.cli.progress import csv_list, log, positive, record_history, task_bar, trainer, with_expert_bars
from lorlib_ui.core.errors import LorlibError


def cmd_build(args) -> None:
    from lorlib_ui.core.library import Library
    from lorlib_ui.training.building import build_library
    from lorlib_ui.training.config import TrainConfig

    positive(shared_steps=args.shared_steps)
    targets = tuple(csv_list(args.targets) or [])
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
    report = with_expert_bars(
        lambda progress: build_library(
            args.library,
            data=args.data,
            tasks=csv_list(args.tasks),
            families=csv_list(args.families),
            holdout_per_family=args.holdout_per_family,
            config=config,
            shared_steps=args.shared_steps,
            shared=not args.no_shared,
            force=args.force,
            base_model=args.base_model,
            trainer=trainer(args),
            progress=progress,
            log=log,
        )
    )
    record_history(args.library, args.argv, report.seconds)
    library = Library.open(args.library)
    print(
        f"library {library.path}: trained {len(report.trained)}, skipped {len(report.skipped)} already there; "
        f"{len(library.experts)} experts, {len(report.held_out)} tasks held out ({report.seconds:.0f} s)"
    )
    if args.gates:  # PhatGoose gates for every expert of the build that lacks them
        built = report.trained + report.skipped
        _compute_keys(args, "gates", built, args.data) if built else None


def _compute_keys(args, kind: str, experts: list[str] | None, data: str | None) -> None:
    from lorlib_ui.training.keys import compute_keys

    options = {"examples": args.examples} if kind == "activations" else {"steps": args.gate_steps}
    report = with_expert_bars(
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
        record_history(args.library, args.argv, report.seconds)
    print(
        f"library {args.library}: {kind} computed for {len(report.computed)} experts, "
        f"{len(report.skipped)} already had them ({report.seconds:.0f} s)"
    )


def cmd_keys(args) -> None:
    """`gates` and `activations`: the routing keys PhatGoose and the hidden-state router need."""
    _compute_keys(args, args.command, csv_list(args.experts), args.data)


def cmd_cluster(args) -> None:
    from lorlib_ui.training.clusters import cluster_and_train

    positive(steps=args.steps)
    _, report = with_expert_bars(
        lambda progress: cluster_and_train(
            args.library,
            args.k,
            steps=args.steps,
            train=not args.no_train,
            seed=args.seed,
            keep_quantile=args.keep_quantile,
            data=args.data,
            trainer=trainer(args),
            force=args.force,
            progress=progress,
            log=log,
            on_clustering=lambda summary: print(json.dumps(summary)) if args.json else _print_clustering(summary),
        )
    )
    if not args.no_train:
        print(f"trained {len(report.trained)} cluster experts, {len(report.skipped)} up to date", file=sys.stderr)
    record_history(args.library, args.argv, report.seconds)


def cmd_lorahub(args) -> None:
    from dataclasses import asdict

    from lorlib_ui.training.lorahub import lorahub_expert

    bar, bars = task_bar("lorahub search", "evaluation")  # made at the first progress event

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
        record_history(args.library, args.argv, report.seconds)
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
