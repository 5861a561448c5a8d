"""The README's supervised-adaptation results: every method over the held-out tasks, with intervals.

    python docs/reproduction/adaptation.py [--shots 32]          # from the committed record
    python docs/reproduction/adaptation.py --library LIB [--library LIB2 ...] [--shots 32]

With `--library`, reads what `python -m lorlib_ui adapt LIB --task T --shots ...` recorded in each library's
manifest (`adaptation`; nothing is trained or scored here) and merges the tasks of several
libraries (runs split over copies of one library). For the given shots it prints, over the tasks
that have every method: each method's exact match, answer log-likelihood and multiple-choice
accuracy (mean over tasks of each task's mean, 95% bootstrap interval over test rows), its paired
difference from a scratch LoRA and from zero-shot Arrow (each also with its interval over tasks and
the tasks where it is up/tied/down), its training time per task (median and
range; the run's own wall clock) and its training loss along the run, then exact match and
training seconds task by task. Tasks with runs at several shot counts also get a learning curve
(exact match and log-likelihood with intervals), and with two or more such tasks each method's
difference from scratch at each point of the curves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = ["scratch", "mu", "shared", "poly-router", "poly-full", "lorahub"]
METRICS = [("exact_match", "EM %"), ("loglik", "LL"), ("mc", "MC %")]


def records(libraries: list[str]) -> dict[str, dict]:
    from lorlib_ui.core.library import Library

    out: dict[str, dict] = {}
    for path in libraries:
        for task, record in Library.open(path).extra.get("adaptation", {}).items():
            if task not in out:
                out[task] = record
                continue
            # One task's methods split over copies: keep one zero-shot record, join the runs.
            runs = {(run["method"], run["shots"]): run for run in out[task]["runs"] + record["runs"]}
            out[task] = {**out[task], "runs": list(runs.values())}
    return out


def rows_of(record: dict, shots: int) -> dict[str, dict]:
    """label -> score rows of one task: arrow, base, and each method at `shots`."""
    out = {z["router"]: z["rows"] for z in record["zero_shot"]}
    for run in record["runs"]:
        if run["shots"] == shots:
            out[run["method"]] = run["rows"] if "rows" in run else run["score"]["rows"]
    return out


def cell(value: float, cis: list[tuple[float, float]], scale: float, signed: bool = False) -> str:
    """A value and its intervals, in points (scale 100, one decimal) or log-likelihood (scale 1,
    three decimals), as every table of the reproduction writes them."""
    from lorlib_ui.analysis.summaries import format_value

    return format_value(value, tuple(list(ci) for ci in cis), scale, 3 if scale == 1 else 1, signed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", action="append", default=None, help="read these libraries; save the record")
    parser.add_argument("--shots", type=int, default=32)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import records as saved

    from lorlib_ui.analysis.stats import bootstrap_interval, proportion_interval

    if args.library:  # the `adaptation` records of the libraries, merged: saved to be checked later
        saved.save("adaptation", records(args.library))
    found = saved.load("adaptation")
    labels = ["base", "arrow", *METHODS]
    tasks = sorted(t for t, r in found.items() if set(labels) <= set(rows_of(r, args.shots)))
    left_out = sorted(set(found) - set(tasks))
    scores = {t: rows_of(found[t], args.shots) for t in tasks}
    print(
        f"{len(tasks)} tasks with every method at {args.shots} shots"
        + (f" (not: {', '.join(left_out)})" if left_out else "")
    )
    print()
    print(
        "| method | "
        + " | ".join(f"{name} [rows] [tasks]" for _, name in METRICS)
        + " | EM − scratch, up/tied/down | EM − Arrow | LL − scratch | training s (median, range) |"
    )
    print("|---|" + "---|" * (len(METRICS) + 4))
    for label in labels:
        cells = []
        for key, _ in METRICS:
            per_task = {t: scores[t][label][key] for t in tasks if scores[t][label].get(key)}  # MC: tasks with options
            count = "" if len(per_task) == len(tasks) else f" ({len(per_task)} tasks)"
            cells.append(saved.cell(per_task, key) + count)
        for other, key in (("scratch", "exact_match"), ("arrow", "exact_match"), ("scratch", "loglik")):
            if label == other or label == "base" or (other == "scratch" and label == "arrow"):
                cells.append("")
                continue
            ours, theirs = ({t: scores[t][name][key] for t in tasks} for name in (label, other))
            cells.append(saved.paired(ours, theirs, key))
        seconds = [
            run["training_seconds"]
            for t in tasks
            for run in found[t]["runs"]
            if run["method"] == label and run["shots"] == args.shots and run["training_seconds"] is not None
        ]
        cells.append(f"{statistics.median(seconds):.0f} ({min(seconds):.0f}–{max(seconds):.0f})" if seconds else "")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print(
        "Training loss (the answer tokens' cross-entropy on the batch; at step 1, then the mean of the five"
        " steps ending at each step shown; mean over tasks):\n"
    )
    shortest = min(len(r["loss_curve"]) for t in tasks for r in found[t]["runs"] if r.get("loss_curve"))
    marks = [m for m in (10, 20, 30, 45, 60) if m <= shortest]  # runs of other --steps: as far as all go
    print("| method | step 1 | " + " | ".join(f"step {m}" for m in marks) + " | final (stored), range over tasks |")
    print("|---|" + "---:|" * (len(marks) + 2))
    for method in METHODS:
        runs = [r for t in tasks for r in found[t]["runs"] if r["method"] == method and r["shots"] == args.shots]
        curves = [r["loss_curve"] for r in runs if r.get("loss_curve")]
        cells = [statistics.mean(c[0] for c in curves)] if curves else [None]
        for m in marks:
            cells.append(statistics.mean(statistics.mean(c[m - 5 : m]) for c in curves) if curves else None)
        finals = [r["final_loss"] for r in runs if r.get("final_loss") is not None]
        cells.append(statistics.mean(finals) if finals else None)
        spread = f" ({min(finals):.2f}–{max(finals):.2f})" if finals else ""
        print(f"| {method} | " + " | ".join("–" if x is None else f"{x:.3f}" for x in cells) + spread + " |")
    print()
    print("Exact match (%) task by task:\n")
    print("| task | rows | " + " | ".join(labels) + " |")
    print("|---|---:|" + "---:|" * len(labels))
    for t in tasks:
        n = len(scores[t]["arrow"]["exact_match"])
        print(
            f"| {t} | {n} | "
            + " | ".join(f"{100 * statistics.mean(scores[t][label]['exact_match']):.0f}" for label in labels)
            + " |"
        )
    print("\nTraining seconds task by task (each run's wall clock):\n")
    print("| task | " + " | ".join(METHODS) + " |")
    print("|---|" + "---:|" * len(METHODS))
    for t in tasks:
        seconds = {r["method"]: r["training_seconds"] for r in found[t]["runs"] if r["shots"] == args.shots}
        print(f"| {t} | " + " | ".join(f"{seconds[m]:.0f}" if seconds.get(m) else "–" for m in METHODS) + " |")
    every_run = [r["training_seconds"] or 0 for record in found.values() for r in record["runs"]]
    hours = sum(every_run) / 3600
    print(f"\nTraining summed over all {len(every_run)} runs of the record (every shot count): {hours:.1f} h")
    curves = {t: r for t, r in found.items() if len({run["shots"] for run in r["runs"]}) > 1}
    for t, record in sorted(curves.items()):
        shots = sorted({run["shots"] for run in record["runs"]})
        zero = {z["router"]: z for z in record["zero_shot"]}
        print(
            f"\nLearning curve on {t} ({len(zero['arrow']['rows']['exact_match'])} test rows): exact match %, "
            f"then answer log-likelihood, each [95% CI]; zero-shot Arrow {100 * zero['arrow']['exact_match']:.0f}%, "
            f"{zero['arrow']['loglik']:.3f}:\n"
        )
        print("| method | " + " | ".join(f"{s} shots" for s in shots) + " |")
        print("|---|" + "---:|" * len(shots))
        for method in METHODS:
            by_shots = {run["shots"]: run["score"] for run in record["runs"] if run["method"] == method}
            print(
                f"| {method} | "
                + " | ".join(
                    cell(by_shots[s]["exact_match"], [proportion_interval([by_shots[s]["rows"]["exact_match"]])], 100)
                    + "; "
                    + cell(by_shots[s]["loglik"], [bootstrap_interval([by_shots[s]["rows"]["loglik"]])], 1)
                    if s in by_shots
                    else "–"
                    for s in shots
                )
                + " |"
            )

    if len(curves) > 1:
        _curve_differences(curves)


def _curve_differences(curves: dict[str, dict]) -> None:
    """Each method minus scratch at each point of the learning curves, over the tasks that have one
    (paired over test rows, with the tasks up/tied/down: two tasks are too few for an interval over
    tasks; exact match in points, then log-likelihood). The curves' points are
    matched by rank: the largest may differ between tasks (a task with fewer training rows)."""
    from lorlib_ui.analysis.stats import paired_interval, signs

    points = {t: sorted({run["shots"] for run in r["runs"]}) for t, r in curves.items()}
    if len({len(p) for p in points.values()}) != 1:
        return
    rows = {
        t: {(run["method"], points[t].index(run["shots"])): run["score"]["rows"] for run in r["runs"]}
        for t, r in curves.items()
    }
    labels = [
        "/".join(str(n) for n in sorted({p[i] for p in points.values()}))
        for i in range(len(next(iter(points.values()))))
    ]
    print(
        f"\nMinus scratch over the {len(curves)} learning-curve tasks, exact match (points); log-likelihood;"
        " each [95% CI over rows] and the tasks where it is up/tied/down:\n"
    )
    print("| method | " + " | ".join(f"{label} shots" for label in labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for method in METHODS[1:]:
        cells = []
        for i in range(len(labels)):
            if not all((method, i) in r and ("scratch", i) in r for r in rows.values()):
                cells.append("–")
                continue
            ours = {key: [r[(method, i)][key] for r in rows.values()] for key in ("exact_match", "loglik")}
            theirs = {key: [r[("scratch", i)][key] for r in rows.values()] for key in ours}
            em, ll = (paired_interval(ours[key], theirs[key]) for key in ("exact_match", "loglik"))
            up = {key: "{up}/{tied}/{down}".format(**signs(ours[key], theirs[key])) for key in ours}
            cells.append(
                cell(em[0], [em[1:]], 100, signed=True)
                + f" {up['exact_match']}; "
                + cell(ll[0], [ll[1:]], 1, signed=True)
                + f" {up['loglik']}"
            )
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
