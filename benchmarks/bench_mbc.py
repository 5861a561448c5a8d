"""MBC speed: clustering a library of 256 experts, silhouette over k included.

    python benchmarks/bench_mbc.py [--experts 256] [--families 16] [--k 16]

Writes a library of random rank-4 bfloat16 LoRA experts (q, k, v, o of every layer of the
embedded SmolLM2-135M-Instruct's shapes) in `--families` groups: each expert is its family's
factors plus noise of the same size, so the clusters are there to be found. Then times what
`python -m lorlib_ui cluster LIBRARY --k K --no-train` computes: reading every adapter, the
embedding (flatten, sparsify, exact SVD, L2), k-means at k, and silhouette scores for
k = 2..16. Reports each part, the total and the adjusted Rand index against the families.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


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
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": list(TARGETS)}
    library = Library.create(path, info)
    entries = []
    for i in range(n):
        family = i % families
        factors = {}
        for m, (a, b) in centres[family].items():
            noisy_a = (a + torch.randn(a.shape, generator=gen)) / a.shape[1] ** 0.5
            noisy_b = (b + torch.randn(b.shape, generator=gen)) / b.shape[0] ** 0.5
            factors[m] = (noisy_a.to(torch.bfloat16), noisy_b.to(torch.bfloat16))
        adapter = LoraAdapter(config=dict(config), factors=factors, scales={m: 2.0 for m in factors})
        entry = expert_from_adapter(f"e{i:03d}", adapter, info.name, kind="private", family=f"f{family}")
        entries.append((entry, adapter))
    library.add_experts(entries)
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--families", type=int, default=16)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()

    from lorlib_ui.build.clusters import cluster_library, embed_library
    from lorlib_ui.build.mbc import adjusted_rand_index, mbc_cluster, silhouette_by_k

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        library = make_library(Path(tmp) / "lib", args.experts, args.families)
        setup = time.perf_counter() - start

        start = time.perf_counter()
        experts, embedding = embed_library(library)
        t_embed = time.perf_counter() - start
        start = time.perf_counter()
        labels = mbc_cluster(embedding, args.k)
        t_kmeans = time.perf_counter() - start
        start = time.perf_counter()
        scores = silhouette_by_k(embedding, range(2, 17))
        t_silhouette = time.perf_counter() - start
        ari = adjusted_rand_index(labels, [e.family for e in experts])

        start = time.perf_counter()
        clustering = cluster_library(library, args.k)
        t_total = time.perf_counter() - start
    best = max(scores, key=scores.get)
    print(
        f"Run {date.today()} on {platform.machine()}: {args.experts} experts in {args.families} families, "
        f"rank 4 on q, k, v, o of 30 layers (bf16), k = {args.k}; library written in {setup:.1f} s.\n"
    )
    print("| part | seconds |\n|---|---:|")
    print(f"| read adapters + embedding (sparsify, SVD, L2) | {t_embed:.2f} |")
    print(f"| k-means at k = {args.k} (n_init 10) | {t_kmeans:.2f} |")
    print(f"| silhouette for k = 2..16 (15 k-means) | {t_silhouette:.2f} |")
    print(f"| all of `cluster_library` | {t_total:.2f} |")
    print(f"\nARI against the families: {ari:.3f} (cluster_library: {clustering.ari:.3f}).")
    print(f"Highest silhouette at k = {best}.")


if __name__ == "__main__":
    main()
