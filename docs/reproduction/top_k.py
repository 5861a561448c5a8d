"""Findings 4 and 5 of REPRODUCTION.md, an ablation: how many experts should Arrow mix per token?

    python docs/reproduction/top_k.py                       # print the tables from the committed records
    python docs/reproduction/top_k.py --library COPY [--top-k 1,2,4,7,26] [--limit 20]   # run them again

Evaluates Arrow over the private experts and over the MBC cluster experts at each top-k (the
cluster router only up to its number of experts), and the shared expert once, on validation rows
of the held-out tasks (an ablation chooses nothing on test rows), each with `evaluate` on a copy
of the library (its stored evaluation is replaced). Saves the records as
`records/top_k_validation_shared.json` and `records/top_k_validation_k{K}.json`, and prints exact
match and answer log-likelihood, and the paired differences arrow − shared and arrow-cluster −
arrow at every k, as `records.py` formats them.

Then `--test-k 2`: the k these validation rows favour, run once on the held-out tasks' test rows
(`records/top_k_test_k2.json`), against the shipped library's test-row record of the shared expert.
"""

from __future__ import annotations

import argparse

import records
from records import cell, paired, rows

MEASURES = ("exact_match", "loglik")


def validation_table(shared: dict, by_k: dict[int, dict]) -> str:
    lines = [
        "| top-k | arrow: exact match | arrow: log-lik. | arrow-cluster: exact match | arrow-cluster: log-lik. "
        "| arrow − shared: EM | arrow − shared: LL | arrow-cluster − arrow: EM | arrow-cluster − arrow: LL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, record in sorted(by_k.items()):
        cells = [cell(rows(record, router, m), m) for router in ("arrow", "arrow-cluster") for m in MEASURES]
        for (a, ra), (b, rb) in (
            ((("arrow", record), ("shared", shared))),
            (("arrow-cluster", record), ("arrow", record)),
        ):
            cells += [paired(rows(ra, a, m), rows(rb, b, m), m) for m in MEASURES]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += [f"\nshared, {m}: {cell(rows(shared, 'shared', m), m)}" for m in MEASURES]
    return "\n".join(lines)


def test_table(k2: dict, shipped: dict) -> str:
    lines = ["| test rows, top-2 | exact match (%) | answer log-likelihood |", "|---|---:|---:|"]
    for router, record in (("arrow", k2), ("arrow-cluster", k2), ("shared", shipped)):
        lines.append(f"| {router} | " + " | ".join(cell(rows(record, router, m), m) for m in MEASURES) + " |")
    for (a, ra), (b, rb) in ((("arrow", k2), ("shared", shipped)), (("arrow-cluster", k2), ("arrow", k2))):
        lines.append(
            f"| {a} − {b} (paired) | " + " | ".join(paired(rows(ra, a, m), rows(rb, b, m), m) for m in MEASURES) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=None, help="a copy of the library: run and save the records")
    parser.add_argument("--top-k", default="1,2,4,7,26", help="7 and 26: every cluster / private expert here")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--test-k", type=int, default=2, help="the k run once on test rows")
    args = parser.parse_args()
    ks = [int(k) for k in args.top_k.split(",")]
    if args.library:
        from lorlib_ui.core.library import Library

        clusters = sum(e.kind == "cluster" for e in Library.open(args.library).experts)
        common = {"limit": args.limit, "split": "validation"}
        records.save("top_k_validation_shared", records.evaluate(args.library, routers=("shared",), **common))
        for k in ks:
            routers = ("arrow", "arrow-cluster") if k <= clusters else ("arrow",)
            records.save(f"top_k_validation_k{k}", records.evaluate(args.library, routers=routers, top_k=k, **common))
        test = records.evaluate(args.library, routers=("arrow", "arrow-cluster"), top_k=args.test_k)
        records.save(f"top_k_test_k{args.test_k}", test)
    shared = records.load("top_k_validation_shared")
    print(validation_table(shared, {k: records.load(f"top_k_validation_k{k}") for k in ks}))
    print()
    print(test_table(records.load(f"top_k_test_k{args.test_k}"), records.shipped()))


if __name__ == "__main__":
    main()
