"""REPRODUCTION.md, three seeds: do the headline comparisons hold for other builds of the same recipe?

    python docs/reproduction/seeds.py                                   # print from the committed records
    python docs/reproduction/seeds.py --libraries runs/seed1 runs/seed2  # record builds of seeds 1 and 2

The shipped library is seed 0 of `python -m lorlib_ui.cli.default_library`; seeds 1 and 2 are the
same recipe with `--seed 1` and `--seed 2`, which reseeds the training of every expert and MBC's
k-means, and keeps seed 0's held-out tasks (`build --holdout-seed 0`). Their weights are not
committed; their manifests are (`records/seed{1,2}_manifest.json`), with the recipe's test-row
evaluation in them. `--libraries` also runs, on each, the top-2 evaluation of Arrow that the
shipped library has in `records/top_k_test_k2.json` (top-2 was chosen on validation rows of seed
0's copy, `top_k.py`), saved as `records/seed{S}_top_k_test_k2.json`.

For each headline comparison, per seed: the paired difference on the held-out tasks' test rows
with its 95% interval over tasks (two-level bootstrap) and the up/tied/down count over tasks; then
the mean, standard deviation and range over the three seeds. The first three comparisons are the
claims the paper makes (the `DIFFERENCES` of `lorlib_ui.analysis.evaluation`), two measures each:
six confirmatory tests, judged at a family-wise 5% by Bonferroni: per seed, its 99.2% interval
over tasks; pooled, the same interval of the three seeds' mean difference on each row (the seeds
share their held-out tasks and test rows, so each row's difference is averaged over the seeds and
the tasks, then the rows within them, are resampled). Everything else in REPRODUCTION.md is
exploratory.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import records
from records import RECORDS, rows

SEEDS = (0, 1, 2)
MEASURES = (("exact_match", 100, 1, "points of exact match"), ("loglik", 1, 3, "answer log-likelihood"))
# (label, (router, record), (router, record)): record "eval" is the seed's evaluation, "k2" its top-2 run
COMPARISONS = (
    ("arrow − µ (uniform)", ("arrow", "eval"), ("uniform", "eval")),
    ("arrow − shared", ("arrow", "eval"), ("shared", "eval")),
    ("arrow-cluster − arrow", ("arrow-cluster", "eval"), ("arrow", "eval")),
    ("oracle − arrow", ("oracle", "eval"), ("arrow", "eval")),
    ("arrow top-2 − shared", ("arrow", "k2"), ("shared", "eval")),
    ("arrow top-2 − arrow top-4", ("arrow", "k2"), ("arrow", "eval")),
    ("arrow-cluster top-2 − arrow top-2", ("arrow-cluster", "k2"), ("arrow", "k2")),
)
CONFIRMATORY = 3  # the first three comparisons, two measures each
FAMILY_LEVEL = 1 - 0.05 / (2 * CONFIRMATORY)


def seed_records(seed: int) -> dict[str, dict]:
    if seed == 0:
        return {"eval": records.shipped(), "k2": records.load("top_k_test_k2"), "clusters": records.shipped("clusters")}
    manifest = records.load(f"seed{seed}_manifest")
    return {
        "eval": manifest["evaluation"],
        "k2": records.load(f"seed{seed}_top_k_test_k2"),
        "clusters": manifest["clusters"],
    }


def save(library: Path, seed: int) -> None:
    from lorlib_ui.core.library import Library

    manifest = Library.open(library).manifest() | Library.open(library).extra
    if "evaluation" not in manifest:
        raise SystemExit(f"{library} has no evaluation: run its recipe to the end first")
    RECORDS.mkdir(exist_ok=True)
    shutil.copyfile(library / "manifest.json", RECORDS / f"seed{seed}_manifest.json")
    top2 = records.evaluate(str(library), routers=("arrow", "arrow-cluster"), top_k=2)
    records.save(f"seed{seed}_top_k_test_k2", top2)


def row_differences(by: dict[str, dict], left: tuple[str, str], right: tuple[str, str], measure: str):
    """Per task both sides have, the per-row differences left − right."""
    a, b = rows(by[left[1]], left[0], measure), rows(by[right[1]], right[0], measure)
    return {t: np.asarray(a[t], dtype=float) - np.asarray(b[t], dtype=float) for t in a if t in b}


def difference(per_task: dict[str, np.ndarray]):
    """The mean difference over tasks, its 95% and family-wise intervals over tasks, and the sign
    count over tasks."""
    from lorlib_ui.analysis.stats import bootstrap_interval, signs, task_mean

    values = list(per_task.values())
    low, high = bootstrap_interval(values, tasks=True)
    wide = bootstrap_interval(values, tasks=True, level=FAMILY_LEVEL)
    return task_mean(values), (low, high), wide, signs(values, [np.zeros_like(v) for v in values])


def pooled(by_seed: dict[int, dict], left: tuple[str, str], right: tuple[str, str], measure: str):
    """`difference` of each row's difference averaged over the seeds (the same tasks and rows)."""
    per_seed = [row_differences(by, left, right, measure) for by in by_seed.values()]
    tasks = [t for t in per_seed[0] if all(t in d and len(d[t]) == len(per_seed[0][t]) for d in per_seed)]
    return difference({t: np.mean([d[t] for d in per_seed], axis=0) for t in tasks})


def table(by_seed: dict[int, dict]) -> str:
    from lorlib_ui.analysis.summaries import format_value

    lines = [
        "| comparison | measure | "
        + " | ".join(f"seed {s}: difference [tasks] up/tied/down" for s in by_seed)
        + " | mean ± sd over seeds (range) | pooled over seeds: [tasks] [family-wise] up/tied/down |",
        "|---|---|" + "---:|" * (len(by_seed) + 2),
    ]

    def shown(result, confirmatory: bool, scale: float, digits: int, wide: bool = False) -> str:
        d, ci, wide_ci, s = result
        mark = ""
        if confirmatory:  # holds at family-wise 5%: its Bonferroni interval excludes 0
            mark = " ✓" if wide_ci[0] > 0 or wide_ci[1] < 0 else " ·"
        cis = (ci, wide_ci) if wide else (ci,)
        return f"{format_value(d, cis, scale, digits, signed=True)} {s['up']}/{s['tied']}/{s['down']}{mark}"

    for i, (label, left, right) in enumerate(COMPARISONS):
        for measure, scale, digits, _ in MEASURES:
            results = [difference(row_differences(by, left, right, measure)) for by in by_seed.values()]
            cells = [shown(r, i < CONFIRMATORY, scale, digits) for r in results]
            v = scale * np.array([r[0] for r in results])
            spread = (
                f"{v.mean():+.{digits}f} ± {v.std(ddof=1):.{digits}f} ({v.min():+.{digits}f} to {v.max():+.{digits}f})"
            )
            together = shown(pooled(by_seed, left, right, measure), i < CONFIRMATORY, scale, digits, wide=True)
            lines.append(f"| {label} | {measure} | " + " | ".join(cells) + f" | {spread} | {together} |")
    return "\n".join(lines)


def scores_table(by_seed: dict[int, dict]) -> str:
    from lorlib_ui.analysis.stats import task_mean

    lines = ["| router | " + " | ".join(f"seed {s}: EM % / LL" for s in by_seed) + " | mean ± sd EM | mean ± sd LL |"]
    lines.append("|---|" + "---:|" * (len(by_seed) + 2))
    for router, key in (
        ("base", "eval"),
        ("uniform", "eval"),
        ("arrow", "eval"),
        ("arrow-cluster", "eval"),
        ("shared", "eval"),
        ("oracle", "eval"),
        ("arrow", "k2"),
        ("arrow-cluster", "k2"),
    ):
        em = [100 * task_mean(list(rows(by[key], router, "exact_match").values())) for by in by_seed.values()]
        ll = [task_mean(list(rows(by[key], router, "loglik").values())) for by in by_seed.values()]
        name = router + (" (top-2)" if key == "k2" else "")
        cells = " | ".join(f"{e:.1f} / {x:.3f}" for e, x in zip(em, ll))
        lines.append(
            f"| {name} | {cells} | {np.mean(em):.1f} ± {np.std(em, ddof=1):.1f} "
            f"| {np.mean(ll):.3f} ± {np.std(ll, ddof=1):.3f} |"
        )
    return "\n".join(lines)


def clusterings(by_seed: dict[int, dict]) -> str:
    lines = ["| seed | ARI against families | cluster sizes |", "|---:|---:|---|"]
    for seed, by in by_seed.items():
        sizes = sorted((len(m) for m in by["clusters"]["members"].values()), reverse=True)
        lines.append(f"| {seed} | {by['clusters']['ari_vs_families']:.3f} | {', '.join(map(str, sizes))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", nargs="*", default=(), help="seed libraries, in seed order from 1")
    args = parser.parse_args()
    for seed, library in enumerate(args.libraries, start=1):
        save(Path(library), seed)
    by_seed = {seed: seed_records(seed) for seed in SEEDS}  # a seed's missing record: says so and stops
    same = {json.dumps(by["eval"]["tasks"]) for by in by_seed.values()}
    if len(same) != 1:
        raise SystemExit("the seeds' evaluations are on different tasks")
    print(scores_table(by_seed))
    print()
    print(table(by_seed))
    print(
        f"\n✓: the {FAMILY_LEVEL:.2%} interval over tasks excludes 0 (Bonferroni over the 6 confirmatory "
        "tests); ·: it does not"
    )
    print()
    print(clusterings(by_seed))


if __name__ == "__main__":
    main()
