"""Section 5 of issue #31 in REPRODUCTION.md: ablations that test the causes the findings state.

    python docs/reproduction/ablations.py                   # print the tables from the committed records
    python docs/reproduction/ablations.py --library COPY    # run them again (a copy: records are replaced)

All on validation rows of the held-out tasks (20 per task, as the top-k table), so that nothing is
chosen on test rows; each against Arrow over the private experts at its defaults (top-4, T = 1,
outputs mixed), the record `top_k_validation_k4` of `top_k.py`, on the same rows:

- mix: Arrow mixing the chosen experts' *parameters* (the paper's code: one merged A and B per
  token) instead of their outputs (lorlib's and PEFT's);
- temperature: Arrow's softmax at T = 0.25, 0.5, 2 and 4 (top-4 weights are nearly uniform at T = 1);
- without the attractor: Arrow over the private experts with `misconceptions` removed (a copy);
- random clusters: cluster experts trained, as the MBC ones were (80 steps, seed 0), on random
  groups of MBC's sizes (`cluster --grouping random`, on a copy), then Arrow over them, against
  Arrow over the MBC cluster experts: is finding 4's loss specific to MBC's grouping?
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import records
from records import cell, paired, rows

MEASURES = ("exact_match", "loglik")
TEMPERATURES = (0.25, 0.5, 2.0, 4.0)
ATTRACTOR = "misconceptions"
COMMON = {"split": "validation", "limit": 20}


def run(library: str) -> None:
    from lorlib_ui.core.library import Library
    from lorlib_ui.training.clusters import ClusterOptions, cluster_and_train

    records.save("ablation_mix_parameters", records.evaluate(library, routers=("arrow",), mix="parameters", **COMMON))
    for t in TEMPERATURES:
        records.save(
            f"ablation_temperature_{t:g}", records.evaluate(library, routers=("arrow",), temperature=t, **COMMON)
        )
    without = Path(f"{library}-without-{ATTRACTOR}")
    shutil.rmtree(without, ignore_errors=True)
    shutil.copytree(library, without)
    Library.open(without).remove_expert(ATTRACTOR)
    records.save("ablation_without_attractor", records.evaluate(str(without), routers=("arrow",), **COMMON))
    shuffled = Path(f"{library}-random-clusters")
    shutil.rmtree(shuffled, ignore_errors=True)
    shutil.copytree(library, shuffled)
    clusters = Library.open(library).clusters
    options = ClusterOptions(k=clusters["k"], steps=80, seed=clusters["seed"], grouping="random")
    recorded, _ = cluster_and_train(str(shuffled), options)
    record = records.evaluate(str(shuffled), routers=("arrow-cluster",), **COMMON)
    record["clusters"] = recorded
    records.save("ablation_random_clusters", record)


def table(label: str, variants: list[tuple[str, dict, str]], reference: tuple[str, dict, str]) -> str:
    """Each variant's scores, then its paired difference from the reference, on the same rows."""
    name, ref, ref_router = reference
    lines = [
        f"| {label} | exact match (%) | answer log-likelihood | − {name}: exact match (points) | − {name}: log-lik. |",
        "|---|---:|---:|---:|---:|",
        f"| {name} | " + " | ".join(cell(rows(ref, ref_router, m), m) for m in MEASURES) + " | | |",
    ]
    for variant, record, router in variants:
        cells = [cell(rows(record, router, m), m) for m in MEASURES]
        cells += [paired(rows(record, router, m), rows(ref, ref_router, m), m) for m in MEASURES]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=None, help="a copy of the library: run and save the records")
    args = parser.parse_args()
    if args.library:
        run(args.library)
    default = ("arrow (outputs, T = 1, top-4)", records.load("top_k_validation_k4"), "arrow")
    print(table("mixing", [("arrow, parameters mixed", records.load("ablation_mix_parameters"), "arrow")], default))
    print()
    temperatures = [(f"arrow, T = {t:g}", records.load(f"ablation_temperature_{t:g}"), "arrow") for t in TEMPERATURES]
    print(table("temperature", temperatures, default))
    print()
    without = records.load("ablation_without_attractor")
    print(table("attractor", [(f"arrow without {ATTRACTOR}", without, "arrow")], default))
    print()
    random = records.load("ablation_random_clusters")
    mbc = ("arrow over MBC clusters", records.load("top_k_validation_k4"), "arrow-cluster")
    print(table("clusters", [("arrow over random clusters", random, "arrow-cluster")], mbc))
    print()
    print(table("clusters", [("arrow over random clusters", random, "arrow-cluster")], default))
    groups = random["clusters"]["members"]
    print("\nrandom groups: " + "; ".join(f"{name}: {', '.join(tasks)}" for name, tasks in groups.items()))


if __name__ == "__main__":
    main()
