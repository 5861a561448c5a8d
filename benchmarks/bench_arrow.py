"""Arrow routing speed and memory: lorlib against PEFT's `create_arrow_model`, in one run.

    python benchmarks/bench_arrow.py [--experts 8,64,256,1024] [--rounds 3] [--device cpu|cuda] [--out FILE]

On the embedded SmolLM2-135M-Instruct with random rank-4 LoRA experts on q, k, v and o, for the
base model, one plain PEFT LoRA, lorlib's Arrow and PEFT's Arrow (top-k 4, T 1) it measures:
prefill/scoring throughput on a batch of 8 x 128 tokens, greedy decode tokens/s at batch 1
(`model.generate` for every method, so the decode loop is the same), and peak resident memory.
Each measurement runs in a fresh subprocess so that peak memory (ru_maxrss) belongs to it alone.
It also times the prototypes of 256 experts (exact QR+SVD against PEFT's power iteration) and
reports how close PEFT's prototypes come to the exact ones. Prints one markdown table.

`lorlib_arrow_dense` is lorlib's Arrow with the many-token dispatch turned off (every expert's
projection for every token, the path before dispatching), to measure where dispatching pays.
With `--rounds R` every cell runs R times, the cells alternating within each round, and the table
gives each cell's median over rounds; the ratios to base are computed within each round, and
their median and range (min-max) are reported, since decoding is the noisiest figure.
On `--device cuda`, peak MB is torch's peak of allocated GPU memory instead of resident memory.

Memory: "resident MB" is the process after loading the model and experts; "peak MB" is the highest
resident size while prefilling and decoding (Linux VmHWM, reset after loading), so it holds the
weights, the experts and the largest transient tensors. "extra peak MB" is peak minus the base
model's peak; "transient MB" is peak minus resident (what the forward passes add). "setup s" is
the time to attach the experts to an already loaded base model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOP_K, BATCH, SEQ = 4, 8, 128


def make_experts(folder: Path, n: int, base_dir: Path, dtype: str = "bfloat16") -> list[Path]:
    """n random rank-4 PEFT adapters, written straight to safetensors (fast for hundreds)."""
    import torch

    from lorlib_ui.core.adapters import LoraAdapter, write_adapter
    from lorlib_ui.core.base_model import linear_shapes, load_base_model

    model, _ = load_base_model(str(base_dir), device="cpu")
    shapes = {m: s for m, s in linear_shapes(model).items() if m.rsplit(".", 1)[-1] in TARGETS}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "bias": "none",
        "base_model_name_or_path": str(base_dir),
    }
    gen = torch.Generator().manual_seed(0)
    folders = []
    for i in range(n):
        factors = {
            m: (
                (torch.randn(4, d_in, generator=gen) / d_in**0.5).to(getattr(torch, dtype)),
                (0.05 * torch.randn(d_out, 4, generator=gen) / 2).to(getattr(torch, dtype)),
            )
            for m, (d_out, d_in) in shapes.items()
        }
        folders.append(folder / f"expert{i:03d}")
        write_adapter(folders[-1], LoraAdapter(config=dict(config), factors=factors))
    return folders


def make_libraries(work: Path, folders: list[Path], counts: list[int], base_dir: Path, kind: str = "imported") -> None:
    """work/library<N>: a library of the first N adapter folders, for each N in `counts`."""
    from lorlib_ui.core.adapters import read_adapter
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import Library, expert_from_adapter

    info = base_model_info(str(base_dir))
    for n in counts:
        library = Library.create(work / f"library{n}", info)
        entries = []
        for folder in folders[:n]:
            adapter = read_adapter(folder)
            entries.append((expert_from_adapter(folder.name, adapter, info.name, kind=kind), adapter))
        library.add_experts(entries)  # prototypes cached here, as in normal use


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(model, decode_tokens: int, repeats: int) -> tuple[float, float]:
    """Prefill tokens/s on a batch of BATCH x SEQ random tokens, and greedy decode tokens/s at
    batch 1 from a 32-token prompt (`model.generate`), medians of `repeats` after a warm-up."""
    import torch

    ids = torch.randint(100, 40000, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ids = ids.to(next(model.parameters()).device)
    prompt = ids[:1, :32]
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    with torch.inference_mode():
        prefill_s = _timed(lambda: (model(input_ids=ids), sync()), repeats)
        decode_s = _timed(
            lambda: (
                model.generate(
                    input_ids=prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False
                ),
                sync(),
            ),
            max(1, repeats - 1),
        )
    return BATCH * SEQ / prefill_s, decode_tokens / decode_s


def run_cell(
    method: str, n: int, experts_dir: Path, base_dir: Path, decode_tokens: int, repeats: int, device: str = "cpu"
) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folders = sorted(experts_dir.glob("expert*"))[:n]
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval().to(device)
    start = time.perf_counter()
    routing = None
    if method == "peft_lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folders[0]).eval()
    elif method == "peft_arrow":
        from peft import ArrowConfig, create_arrow_model

        model = create_arrow_model(model, [str(f) for f in folders], ArrowConfig(top_k=TOP_K, router_temperature=1.0))
        model.eval()
    elif method in ("lorlib_arrow", "lorlib_arrow_dense"):
        from lorlib_ui.core import routed_model
        from lorlib_ui.core.library import Library
        from lorlib_ui.core.routed_model import RoutedModel
        from lorlib_ui.core.routers import make_router

        if method == "lorlib_arrow_dense":
            routed_model.DISPATCH_RATIO = float("inf")

        library = Library.open(experts_dir / f"library{n}")
        rm = RoutedModel(model, None, library)
        routing = rm.routing(make_router("arrow", rm.experts, top_k=TOP_K))
        routing.__enter__()
    if device == "cuda":
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - start
    setup_mb = _status_mb("VmRSS") if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    if device == "cpu":
        _reset_peak()
    else:
        torch.cuda.reset_peak_memory_stats()
    prefill_tok_s, decode_tok_s = throughput(model, decode_tokens, repeats)
    return {
        "method": method,
        "experts": n,
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "setup_s": setup_s,
        "setup_mb": setup_mb,
        "peak_mb": _status_mb("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20,
    }


def prototype_times(experts_dir: Path, base_dir: Path, n: int) -> dict:
    """Exact prototypes for n experts against PEFT's power iteration on the same factors."""
    import torch
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from lorlib_ui.core.adapters import read_adapter
    from lorlib_ui.core.prototypes import prototypes_for_adapter, top_right_singular_vectors

    adapters = [read_adapter(f) for f in sorted(experts_dir.glob("expert*"))[:n]]
    start = time.perf_counter()
    ours = [prototypes_for_adapter(a.factors) for a in adapters]
    ours_s = time.perf_counter() - start

    class _Cfg:  # the attributes ArrowLoraLinearLayer reads from an ArrowConfig
        top_k, router_temperature, rng_seed, use_gks = TOP_K, 1.0, 0, False
        task_adapter_names, gks_adapter_names = [], []

    peft_layer = ArrowLoraLinearLayer(576, _Cfg())
    cosines = []
    start = time.perf_counter()
    peft_vectors = [
        {m: peft_layer.top_right_singular_vec_from_BA(a, b) for m, (a, b) in adapter.factors.items()}
        for adapter in adapters
    ]
    peft_s = time.perf_counter() - start
    for adapter, exact, approx in zip(adapters, ours, peft_vectors):
        for m in adapter.factors:
            cosines.append(float((exact[m] @ approx[m]).abs() / approx[m].norm()))
    # the exact vectors themselves, against a full SVD of ΔW, on a sample
    a, b = adapters[0].factors[next(iter(adapters[0].factors))]
    full = torch.linalg.svd((b @ a).double())[2][0]
    exact_cos = float((top_right_singular_vectors(a[None], b[None])[0].double() @ full).abs())
    return {
        "experts": n,
        "modules": len(cosines) // n,
        "ours_s": ours_s,
        "peft_s": peft_s,
        "peft_cos_min": min(cosines),
        "peft_cos_median": statistics.median(cosines),
        "ours_cos_check": exact_cos,
    }


def _subprocess(args: list[str], method: str = "", n: int = 0) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "experts": n, "error": last[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", default="8,64,256,1024")
    parser.add_argument("--rounds", type=int, default=1, help="run every cell this many times, alternating")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peft-up-to", type=int, default=256, help="PEFT's Arrow only up to this many experts")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="base,peft_lora,lorlib_arrow,lorlib_arrow_dense,peft_arrow")
    parser.add_argument(
        "--adapter-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="how the random experts are stored on disk (the library stores trained experts in 16 bits)",
    )
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--cell", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--protos", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from lorlib_ui.core.base_model import fetch_embedded_model

    base_dir = fetch_embedded_model()
    if args.cell:
        result = run_cell(
            args.cell[0], int(args.cell[1]), Path(args.work), base_dir, args.decode_tokens, args.repeats, args.device
        )
        print(json.dumps(result))
        return
    if args.protos:
        print(json.dumps(prototype_times(Path(args.work), base_dir, args.protos)))
        return

    counts = [int(x) for x in args.experts.split(",")]
    with tempfile.TemporaryDirectory(prefix="lorlib-bench-") as tmp:
        work = Path(tmp)
        make_libraries(work, make_experts(work, max(counts), base_dir, args.adapter_dtype), counts, base_dir)

        common = ["--work", str(work), "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
        common += ["--device", args.device]
        methods = args.methods.split(",")
        cells = [(m, 1) for m in ("base", "peft_lora") if m in methods]
        arrows = ("lorlib_arrow", "lorlib_arrow_dense", "peft_arrow")
        cells += [
            (m, n) for n in counts for m in arrows if m in methods and (m != "peft_arrow" or n <= args.peft_up_to)
        ]
        runs: dict[tuple[str, int], list[dict]] = {cell: [] for cell in cells}
        for round_ in range(args.rounds):
            for method, n in cells:
                runs[(method, n)].append(_subprocess(["--cell", method, str(n), *common], method, n))
                print(f"round {round_ + 1}: done {method} at {n} experts", file=sys.stderr, flush=True)
        protos = _subprocess(["--protos", str(min(max(counts), 256)), "--work", str(work)])
    rows = [summarise(cell_runs, runs[cells[0]]) for cell_runs in runs.values()]
    print(render(rows, protos, args))
    if args.out:
        Path(args.out).write_text(render(rows, protos, args))


def summarise(cell_runs: list[dict], base_runs: list[dict]) -> dict:
    """One cell over the rounds: the median of each figure, and the ratios to the base model's
    run of the same round (median, min, max)."""
    ok = [(run, base) for run, base in zip(cell_runs, base_runs) if "error" not in run and "error" not in base]
    if not ok:
        return cell_runs[0]
    row = {key: statistics.median(run[key] for run, _ in ok) for key in ok[0][0] if key not in ("method", "experts")}
    row.update(method=cell_runs[0]["method"], experts=cell_runs[0]["experts"], rounds=len(ok))
    for kind in ("prefill", "decode"):
        ratios = [run[f"{kind}_tok_s"] / base[f"{kind}_tok_s"] for run, base in ok]
        row[f"{kind}_ratio"] = statistics.median(ratios)
        row[f"{kind}_spread"] = (min(ratios), max(ratios))
    return row


def render(rows: list[dict], protos: dict, args) -> str:
    base = rows[0]  # the table needs the base model's row first
    lines = [
        f"Run {date.today().isoformat()} on {platform.machine()} with {os.cpu_count()} cores, "
        f"torch {__import__('torch').__version__}, peft {__import__('peft').__version__}; top-k {TOP_K}, "
        f"prefill batch {BATCH} x {SEQ} tokens, decode {args.decode_tokens} tokens at batch 1; "
        f"experts stored in {args.adapter_dtype}, model in float32, on {args.device}; "
        f"medians of {args.rounds} alternating round(s), ratios to base within each round (range in brackets).",
        "",
        "| method | experts | setup s | prefill tok/s | x base | decode tok/s | x base "
        "| resident MB | peak MB | extra peak MB | transient MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(row: dict, kind: str) -> str:
        low, high = row[f"{kind}_spread"]
        return f"{row[f'{kind}_ratio']:.2f}" + (f" [{low:.2f}-{high:.2f}]" if row["rounds"] > 1 else "")

    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['experts']} | could not run: {row['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {row['method']} | {row['experts']} | {row['setup_s']:.1f} | {row['prefill_tok_s']:.0f} | "
            f"{ratio(row, 'prefill')} | {row['decode_tok_s']:.1f} | "
            f"{ratio(row, 'decode')} | {row['setup_mb']:.0f} | {row['peak_mb']:.0f} | "
            f"{row['peak_mb'] - base['peak_mb']:.0f} | {row['peak_mb'] - row['setup_mb']:.0f} |"
        )
    lines.append("")
    by = {(r.get("method"), r.get("experts")): r for r in rows}
    for n in sorted({r["experts"] for r in rows if r.get("method") == "lorlib_arrow"}):
        ours, peft, dense = by.get(("lorlib_arrow", n)), by.get(("peft_arrow", n)), by.get(("lorlib_arrow_dense", n))
        if ours and dense and "error" not in ours and "error" not in dense:
            lines.append(
                f"- {n} experts: prefill with dispatch {ours['prefill_tok_s'] / dense['prefill_tok_s']:.2f}x "
                "the dense path (lorlib_arrow_dense)."
            )
        if ours and peft and "error" not in peft and "error" not in ours:
            extra_ours = ours["peak_mb"] - base["peak_mb"]
            extra_peft = peft["peak_mb"] - base["peak_mb"]
            lines.append(
                f"- {n} experts: prefill {ours['prefill_tok_s'] / peft['prefill_tok_s']:.2f}x PEFT's Arrow, "
                f"decode {ours['decode_tok_s'] / peft['decode_tok_s']:.2f}x PEFT's Arrow and "
                f"{ours['decode_tok_s'] / base['decode_tok_s']:.2f}x base, extra memory "
                f"{extra_ours / max(extra_peft, 1):.2f}x PEFT's, transient memory "
                f"{(ours['peak_mb'] - ours['setup_mb']) / max(peft['peak_mb'] - peft['setup_mb'], 1):.2f}x PEFT's."
            )
    if "error" not in protos:
        lines.append(
            f"- Prototypes for {protos['experts']} experts x {protos['modules']} modules: exact QR+SVD "
            f"{protos['ours_s']:.2f} s, PEFT's power iteration {protos['peft_s']:.2f} s "
            f"({protos['peft_s'] / protos['ours_s']:.1f}x slower). PEFT's vectors against the exact ones: "
            f"|cos| median {protos['peft_cos_median']:.4f}, min {protos['peft_cos_min']:.4f} "
            f"(exact vs full SVD of ΔW: {protos['ours_cos_check']:.6f})."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
