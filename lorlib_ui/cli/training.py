"""The commands that make experts: `build`, `gates` and `activations`, `cluster`, `lorahub`.

Their flags are made in `lorlib_ui.cli.main` from the options dataclasses of the entry points they
call (`BuildOptions` and `TrainConfig`, `GatesOptions`, `ActivationsOptions`, `ClusterOptions`,
`LoraHubOptions`, and `TrainerOptions` for where to train); these functions read the dataclasses
back from the parsed flags, run with tqdm bars on stderr, and append each finished command to the
library's `history`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from lorlib_ui.cli.progress import Bars, TrainerOptions, record_history
from lorlib_ui.core.library import Library
from lorlib_ui.training.building import BuildOptions, build_library
from lorlib_ui.training.clusters import ClusterOptions, cluster_and_train
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.keys import ActivationsOptions, GatesOptions, KeysOptions, compute_keys
from lorlib_ui.training.lorahub import LoraHubOptions, lorahub_expert
from lorlib_ui.training.options import from_namespace

KEYS = {options.kind: options for options in (GatesOptions, ActivationsOptions)}  # command -> its options


def cmd_build(args) -> None:
    options, config = from_namespace(BuildOptions, args), from_namespace(TrainConfig, args)
    trainer = from_namespace(TrainerOptions, args).trainer()
    with Bars(resumable=True) as reporter:
        report = build_library(args.library, options, config, trainer, reporter)
    record_history(args.library, args.argv, report.seconds)
    library = Library.open(args.library)
    print(
        f"library {library.path}: trained {len(report.trained)}, skipped {len(report.skipped)} already there; "
        f"{len(library.experts)} experts, {len(report.held_out)} tasks held out ({report.seconds:.0f} s)"
    )
    if args.gates and (built := report.trained + report.skipped):  # PhatGoose gates for the build's experts
        gates = GatesOptions(experts=tuple(built), data=options.data, seed=config.seed, device=args.device)
        _compute_keys(args, gates)


def _compute_keys(args, options: KeysOptions) -> None:
    with Bars(resumable=True) as reporter:
        report = compute_keys(args.library, options, reporter)
    if report.computed:
        record_history(args.library, args.argv, report.seconds)
    print(
        f"library {args.library}: {options.kind} computed for {len(report.computed)} experts, "
        f"{len(report.skipped)} already had them ({report.seconds:.0f} s)"
    )


def cmd_keys(args) -> None:
    """`gates` and `activations`: the routing keys PhatGoose and the hidden-state router need."""
    _compute_keys(args, from_namespace(KEYS[args.command], args))


def cmd_cluster(args) -> None:
    options = from_namespace(ClusterOptions, args)
    trainer = from_namespace(TrainerOptions, args).trainer()

    def show(summary: dict) -> None:
        if args.json:
            print(json.dumps(summary))
        else:
            _print_clustering(summary)

    with Bars(resumable=True) as reporter:
        _, report = cluster_and_train(args.library, options, trainer, reporter, on_clustering=show)
    if options.train:
        print(f"trained {len(report.trained)} cluster experts, {len(report.skipped)} up to date", file=sys.stderr)
    record_history(args.library, args.argv, report.seconds)


def cmd_lorahub(args) -> None:
    with Bars() as reporter:  # LoraHub's evaluations are the steps of the expert it makes
        report = lorahub_expert(args.library, from_namespace(LoraHubOptions, args), reporter)
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
