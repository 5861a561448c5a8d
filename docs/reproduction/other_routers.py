"""README, "The paper's other routers, and what came after": every other router on the held-out
tasks' test rows, beside Arrow.

    python docs/reproduction/other_routers.py                  # print the tables from the committed records
    python docs/reproduction/other_routers.py --library COPY   # run them again (about 70 minutes on 2 cores)

On a copy of the library, with the shared expert marked general (for `arrow-gks`), the runs the
README gives: the weight merges and learned routers at their defaults, PhatGoose at its top-2 and
both PhatGoose and Arrow at top-2, and LoraHub on 10 training rows per task. Each run's record is
saved as `records/other_routers_{run}.json`; the tables pair them with the shipped library's
test-row record (`uniform`, `shared`), on the same rows. Evaluation is deterministic, so the
`arrow` rows of these runs equal the shipped record's.
"""

from __future__ import annotations

import argparse

import records
from records import cell, paired, rows

MEASURES = ("exact_match", "loglik", "mc")
RUNS = {  # run name: evaluate options
    "defaults": {"routers": ("arrow", "mean_delta", "ties", "arrow-gks", "spectral", "avg_act")},
    "phatgoose": {"routers": ("arrow", "phatgoose")},
    "top2": {"routers": ("arrow", "phatgoose"), "top_k": 2},
    "lorahub": {"routers": ("arrow", "lorahub"), "shots": 10},
}
ROWS = (  # label, run, router
    ("arrow", "defaults", "arrow"),
    ("mean_delta", "defaults", "mean_delta"),
    ("ties", "defaults", "ties"),
    ("arrow-gks", "defaults", "arrow-gks"),
    ("spectral", "defaults", "spectral"),
    ("avg_act", "defaults", "avg_act"),
    ("phatgoose (top-2)", "phatgoose", "phatgoose"),
    ("arrow, top-2", "top2", "arrow"),
    ("lorahub (10 shots)", "lorahub", "lorahub"),
)
PAIRS = (  # label, (run, router), (run, router); "shipped": the library's own test-row record
    ("phatgoose (top-2) − arrow", ("phatgoose", "phatgoose"), ("defaults", "arrow")),
    ("phatgoose − arrow, both top-2", ("top2", "phatgoose"), ("top2", "arrow")),
    ("lorahub (10 shots) − arrow", ("lorahub", "lorahub"), ("defaults", "arrow")),
    ("spectral − arrow", ("defaults", "spectral"), ("defaults", "arrow")),
    ("arrow-gks − arrow", ("defaults", "arrow-gks"), ("defaults", "arrow")),
    ("ties − arrow", ("defaults", "ties"), ("defaults", "arrow")),
    ("avg_act − arrow", ("defaults", "avg_act"), ("defaults", "arrow")),
    ("mean_delta − arrow", ("defaults", "mean_delta"), ("defaults", "arrow")),
    ("ties − uniform", ("defaults", "ties"), ("shipped", "uniform")),
    ("spectral − shared", ("defaults", "spectral"), ("shipped", "shared")),
    ("phatgoose (top-2) − shared", ("phatgoose", "phatgoose"), ("shipped", "shared")),
    ("lorahub (10 shots) − shared", ("lorahub", "lorahub"), ("shipped", "shared")),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=None, help="a copy of the library: run and save the records")
    args = parser.parse_args()
    if args.library:
        from lorlib_ui.core.library import Library

        Library.open(args.library).mark_general(["shared"])  # as `mark-general COPY shared` does
        for name, options in RUNS.items():
            records.save(f"other_routers_{name}", records.evaluate(args.library, **options))
    runs = {name: records.load(f"other_routers_{name}") for name in RUNS} | {"shipped": records.shipped()}
    print("| router | exact match (%) [rows] [tasks] | answer log-likelihood [rows] [tasks] | multiple choice (%) |")
    print("|---|---:|---:|---:|")
    for label, run, router in ROWS:
        print(f"| {label} | " + " | ".join(cell(rows(runs[run], router, m), m) for m in MEASURES) + " |")
    print()
    print("| paired difference, up/tied/down | exact match (points) | answer log-likelihood | multiple choice |")
    print("|---|---:|---:|---:|")
    for label, (run_a, a), (run_b, b) in PAIRS:
        cells = [paired(rows(runs[run_a], a, m), rows(runs[run_b], b, m), m) for m in MEASURES]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
