"""The default library shipped in assets/library: `python -m lorlib_ui.cli.default_library`.

One command builds it from scratch on the embedded base model and the embedded BIG-bench tasks:
private experts for the tasks of seven families (one task per family held out), a shared expert,
MBC cluster experts, then the held-out evaluation. It runs the same CLI commands a user would, so
the library's manifest records each of them (`history`) and this recipe (`recipe`). Building is
resumable: run it again after an interruption and finished experts are kept.

Its adapters adapt q_proj and v_proj only (the choice of Hu et al., 2021), at rank 4 and in
bfloat16, so that 34 experts fit the 30 MB the repository allows for it.
"""

from __future__ import annotations

import argparse
import sys
import time

import lorlib_ui.cli.main as cli
from lorlib_ui.core.assets import asset
from lorlib_ui.core.library import Library

OUT = asset("library", must_exist=False)
FAMILIES = ("algorithmic", "arithmetic", "color_codes", "fact_checking", "inference", "morphology", "sentiment")
RECIPE = {
    "build": ["--families", ",".join(FAMILIES), "--holdout-per-family", "1", "--targets", "q_proj,v_proj"]
    + ["--rank", "4", "--steps", "60", "--shared-steps", "300", "--batch-size", "8", "--seed", "0"],
    "cluster": ["--k", str(len(FAMILIES)), "--steps", "80", "--seed", "0"],
    "evaluate": [],
}


def recipe(seed: int = 0) -> dict[str, list[str]]:
    """The steps with training and clustering seeded by `seed`; the held-out tasks stay those of
    seed 0, so that builds of several seeds are evaluated on the same tasks."""
    if seed == 0:
        return RECIPE
    seeded = {
        c: [str(seed) if o == "0" and i and options[i - 1] == "--seed" else o for i, o in enumerate(options)]
        for c, options in RECIPE.items()
    }
    seeded["build"] += ["--holdout-seed", "0"]
    return seeded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorlib_ui.cli.default_library", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default=str(OUT), help=f"library folder (default: {OUT})")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: build, cluster, evaluate, demo")
    parser.add_argument(
        "--seed", type=int, default=0, help="training and clustering seed; the held-out tasks stay seed 0's (default 0)"
    )
    args = parser.parse_args(argv)
    steps = recipe(args.seed)
    skip = {s for s in args.skip.split(",") if s}
    start = time.perf_counter()
    for command, options in steps.items():
        if command in skip:
            continue
        print(f"== {command} {args.out} {' '.join(options)}", file=sys.stderr, flush=True)
        code = cli.main([command, args.out, *options])
        if code:
            return code
    if "demo" not in skip:  # the example the Route tab opens on (`lorlib_ui.analysis.demo`)
        from lorlib_ui.analysis.demo import pick_demo

        print(f"== demo {args.out}", file=sys.stderr, flush=True)
        pick_demo(args.out)
    with Library.open(args.out).edit() as library:
        library.extra["recipe"] = {
            "command": "python -m lorlib_ui.cli.default_library",
            "steps": {c: ["python", "-m", "lorlib_ui", c, "LIBRARY", *o] for c, o in steps.items()},
            "seconds": round(time.perf_counter() - start, 1),
        }
    print(f"default library at {args.out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
