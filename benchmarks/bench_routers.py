"""Per-token routers against Arrow, in one run: prefill and decode throughput at 64 experts.

    python benchmarks/bench_routers.py [--experts 64] [--rounds 3] [--out FILE]

On the embedded SmolLM2-135M-Instruct with random rank-4 LoRA experts on q, k, v and o (those of
`bench_arrow.py`), random PhatGoose gates and mean activations stored for every expert, and four
experts marked general for GenKnowSub, it measures for the base model and each per-token router
(top-k 4; PhatGoose at its default 2, and again at 4 so that it does the same work as Arrow):
prefill/scoring throughput on a batch of 8 x 128 tokens and greedy decode tokens/s at batch 1
(`model.generate`). Each cell runs in a fresh subprocess; the cells run in `--rounds` alternating
rounds and each figure is the median over rounds, the spread (min-max of the ratio to Arrow in
the same round) beside it, because decode on a shared CPU is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from bench_arrow import BATCH, SEQ, TOP_K, make_experts, throughput

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUTERS = {  # row name -> (router spec, top-k)
    "arrow": ("arrow", TOP_K),
    "spectral": ("spectral", TOP_K),
    "avg_act": ("avg_act", TOP_K),
    "phatgoose (k 2)": ("phatgoose", 2),
    "phatgoose (k 4)": ("phatgoose", TOP_K),
    "arrow_gks": ("arrow_gks", TOP_K),
}
GENERAL = 4  # experts marked general for arrow_gks


def make_library(work: Path, n: int, base_dir: Path) -> Path:
    import torch

    from lorlib_ui.core.adapters import read_adapter
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import Library, expert_from_adapter

    folders = make_experts(work, n, base_dir)
    info = base_model_info(str(base_dir))
    library = Library.create(work / "library", info)
    entries = [(expert_from_adapter(f.name, a, info.name), a) for f in folders for a in [read_adapter(f)]]
    library.add_experts(entries)
    gen = torch.Generator().manual_seed(0)
    for kind in ("gates", "activations"):
        for expert, adapter in entries:
            keys = {m: torch.randn(a.shape[1], generator=gen) for m, (a, _) in adapter.factors.items()}
            library.derived.write_expert(
                kind, expert.name, keys, {"random": True}, library.expert(expert.name).weights_hash
            )
    library.mark_general([e.name for e, _ in entries[:GENERAL]])
    return work / "library"


def run_cell(row: str, library_dir: Path, base_dir: Path, decode_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if row != "base":
        from lorlib_ui.core.library import Library
        from lorlib_ui.core.routed_model import RoutedModel
        from lorlib_ui.core.routers import make_router

        library = Library.open(library_dir)
        rm = RoutedModel(model, None, library)
        spec, k = ROUTERS[row]
        routing = rm.routing(make_router(spec, rm.experts, top_k=k, groups=library.groups()))
        routing.__enter__()  # held in `routing` until the end: a collected context manager would exit
    prefill_tok_s, decode_tok_s = throughput(model, decode_tokens, repeats)
    if row != "base" and rm.state.router is None:
        raise RuntimeError("the router was not active while measuring")
    return {"row": row, "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s}


def _subprocess(args: list[str], row: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        return {"row": row, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from lorlib_ui.core.base_model import fetch_embedded_model

    base_dir = fetch_embedded_model()
    if args.cell:
        print(json.dumps(run_cell(args.cell, Path(args.library), base_dir, args.decode_tokens, args.repeats)))
        return
    rows = ["base", *ROUTERS]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="lorlib-bench-routers-") as tmp:
        library_dir = make_library(Path(tmp), args.experts, base_dir)
        common = ["--library", str(library_dir), "--decode-tokens", str(args.decode_tokens)]
        for r in range(args.rounds):
            cells = {}
            for row in rows if r % 2 == 0 else rows[::-1]:  # alternate the order between rounds
                cells[row] = _subprocess(["--cell", row, *common, "--repeats", str(args.repeats)], row)
                print(f"round {r + 1}: {row} done", file=sys.stderr, flush=True)
            rounds.append(cells)
    table = render(rows, rounds, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def render(rows: list[str], rounds: list[dict], args) -> str:
    def values(row: str, key: str, over: str | None = None) -> list[float]:
        out = []
        for cells in rounds:
            cell, ref = cells[row], cells[over] if over else None
            if "error" in cell or (ref is not None and "error" in ref):
                continue
            out.append(cell[key] / ref[key] if ref else cell[key])
        return out

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"

    lines = [
        f"Run {date.today().isoformat()} on {platform.machine()} with {os.cpu_count()} cores, "
        f"torch {__import__('torch').__version__}; {args.experts} random rank-4 experts on q, k, v, o "
        f"({GENERAL} of them general for arrow_gks); prefill batch {BATCH} x {SEQ} tokens, decode "
        f"{args.decode_tokens} tokens at batch 1; medians of {len(rounds)} alternating rounds, "
        "ratios within each round (min-max over rounds).",
        "",
        "| router | prefill tok/s | prefill x Arrow | prefill x base | decode tok/s | decode x Arrow | decode x base |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        errors = [c[row]["error"] for c in rounds if "error" in c[row]]
        if errors:
            lines.append(f"| {row} | could not run: {errors[0]} |" + " |" * 5)
            continue
        pre, dec = values(row, "prefill_tok_s"), values(row, "decode_tok_s")
        lines.append(
            f"| {row} | {statistics.median(pre):.0f} | {spread(values(row, 'prefill_tok_s', 'arrow'))} | "
            f"{spread(values(row, 'prefill_tok_s', 'base'))} | {statistics.median(dec):.1f} | "
            f"{spread(values(row, 'decode_tok_s', 'arrow'))} | {spread(values(row, 'decode_tok_s', 'base'))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
