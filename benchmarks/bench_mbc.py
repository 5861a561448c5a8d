"""MBC speed and memory: clustering libraries of 256 to 4,096 experts.

    python benchmarks/bench_mbc.py [--experts 256,1024] [--families 16] [--k 16] [--reference-up-to 1024]

Writes a library of random rank-4 bfloat16 LoRA experts (q, k, v, o of every layer of the
embedded SmolLM2-135M-Instruct's shapes) in `--families` groups: each expert is its family's
factors plus noise of the same size, so the clusters are there to be found. Then, in a fresh
process per measurement (so that peak memory, ru_maxrss, is its own), times what
`python -m lorlib_ui cluster LIBRARY --k K --no-train` computes: the embedding (the Gram matrix
summed block by block over the adapters, exact eigendecomposition, L2), k-means at k, and
silhouette scores for k = 2..16. Up to `--reference-up-to` experts it also runs the in-memory
path (the n x D weight matrix, as lorlib did before streaming) and reports the adjusted Rand index
between the two clusterings, and each clustering's ARI against the families.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
BATCH = 128  # experts written per atomic add: a batch is held in memory (1.8 MB each in bf16)


CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": list(TARGETS)}


def write_random_adapter(folder: Path, seed: int) -> Path:
    """One more expert of the same shapes, of no family, as a PEFT folder (to import)."""
    import torch

    from lorlib_ui.core.adapters import LoraAdapter, write_adapter
    from lorlib_ui.core.base_model import base_model_info

    gen = torch.Generator().manual_seed(seed)
    factors = {
        m: (
            (torch.randn(4, d_in, generator=gen) / d_in**0.5).to(torch.bfloat16),
            (torch.randn(d_out, 4, generator=gen) / d_out**0.5).to(torch.bfloat16),
        )
        for m, (d_out, d_in) in base_model_info(None).linear_shapes.items()
        if m.rsplit(".", 1)[-1] in TARGETS
    }
    write_adapter(folder, LoraAdapter(config=dict(CONFIG), factors=factors, scales={m: 2.0 for m in factors}))
    return folder


def make_library(path: Path, n: int, families: int, seed: int = 0):
    import torch

    from lorlib_ui.core.adapters import LoraAdapter
    from lorlib_ui.core.base_model import base_model_info
    from lorlib_ui.core.library import Library, expert_from_adapter

    info = base_model_info(None)
    shapes = {m: s for m, s in info.linear_shapes.items() if m.rsplit(".", 1)[-1] in TARGETS}
    gen = torch.Generator().manual_seed(seed)
    centres = []
    for _ in range(families):
        pairs = {
            m: (torch.randn(4, d_in, generator=gen), torch.randn(d_out, 4, generator=gen))
            for m, (d_out, d_in) in shapes.items()
        }
        centres.append(pairs)
    library = Library.create(path, info)
    for first in range(0, n, BATCH):
        entries = []
        for i in range(first, min(n, first + BATCH)):
            family = i % families
            factors = {}
            for m, (a, b) in centres[family].items():
                noisy_a = (a + torch.randn(a.shape, generator=gen)) / a.shape[1] ** 0.5
                noisy_b = (b + torch.randn(b.shape, generator=gen)) / b.shape[0] ** 0.5
                factors[m] = (noisy_a.to(torch.bfloat16), noisy_b.to(torch.bfloat16))
            adapter = LoraAdapter(config=dict(CONFIG), factors=factors, scales={m: 2.0 for m in factors})
            entry = expert_from_adapter(f"e{i:04d}", adapter, info.name, kind="private", family=f"f{family}")
            entries.append((entry, adapter))
        library.add_experts(entries)
    return library


def measure(path: str, k: int, how: str) -> dict:
    """One clustering of the library at `path` in this process: `streamed` (lorlib's path) or
    `in-memory` (the n x D matrix, the reference)."""
    import numpy as np
    import torch

    from lorlib_ui.core.library import Library
    from lorlib_ui.training.clusters import embed_library, task_experts
    from lorlib_ui.training.mbc import embed, mbc_cluster, silhouette_by_k

    library = Library.open(path)
    start = time.perf_counter()
    if how == "streamed":
        experts, embedding = embed_library(library)
    else:
        experts = task_experts(library)
        rows = []
        for e in experts:
            factors = library.load_adapter(e.name).factors
            rows.append(torch.cat([t.float().reshape(-1) for m in sorted(factors) for t in factors[m]]))
        matrix = torch.stack(rows).numpy()
        del rows
        embedding = embed([e.name for e in experts], matrix)
        del matrix
    t_embed = time.perf_counter() - start
    start = time.perf_counter()
    labels = mbc_cluster(embedding, k)
    t_kmeans = time.perf_counter() - start
    start = time.perf_counter()
    silhouette_by_k(embedding, range(2, 17))
    t_silhouette = time.perf_counter() - start
    return {
        "embed_s": t_embed,
        "kmeans_s": t_kmeans,
        "silhouette_s": t_silhouette,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "labels": np.asarray(labels).tolist(),
        "families": [e.family for e in experts],
    }


def in_subprocess(path: Path, k: int, how: str) -> dict:
    command = [sys.executable, __file__, "--measure", str(path), "--k", str(k), "--how", how]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="256,1024")
    parser.add_argument("--families", type=int, default=16)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--reference-up-to", type=int, default=1024)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--how", default="streamed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.k, args.how)))
        return

    from lorlib_ui.training.mbc import adjusted_rand_index

    rows = []
    for n in [int(x) for x in args.experts.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            make_library(Path(tmp) / "lib", n, args.families)
            written = time.perf_counter() - start
            runs = {"streamed": in_subprocess(Path(tmp) / "lib", args.k, "streamed")}
            if n <= args.reference_up_to:
                runs["in-memory"] = in_subprocess(Path(tmp) / "lib", args.k, "in-memory")
        agree = adjusted_rand_index(runs["streamed"]["labels"], runs["in-memory"]["labels"]) if len(runs) > 1 else None
        for how, run in runs.items():
            rows.append((n, how, run, adjusted_rand_index(run["labels"], run["families"]), agree, written))
        print(f"{n} experts done", file=sys.stderr)

    print(
        f"Run {date.today()} on {platform.machine()}: random rank-4 experts (bf16) on q, k, v, o of 30 layers "
        f"in {args.families} families, k = {args.k}; one process per row.\n"
    )
    print(
        "| experts | path | embedding s | k-means s | silhouette k=2..16 s | total s | peak MB "
        "| ARI vs families | ARI streamed vs in-memory | library written s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, how, run, ari, agree, written in rows:
        total = run["embed_s"] + run["kmeans_s"] + run["silhouette_s"]
        print(
            f"| {n} | {how} | {run['embed_s']:.1f} | {run['kmeans_s']:.2f} | {run['silhouette_s']:.1f} | {total:.1f} "
            f"| {run['peak_mb']:.0f} | {ari:.3f} | {'' if agree is None else f'{agree:.3f}'} | {written:.0f} |"
        )


if __name__ == "__main__":
    main()
