"""Finding 1 of REPRODUCTION.md: does MBC group tasks by the similarity of their experts?

    python docs/reproduction/mbc_stability.py [--library assets/library] [--k 7] [--seeds 20]

Embeds the library's private experts as `cluster` does (read-only: nothing is written), clusters
them at k with k-means seeds 0..S-1, and reports the adjusted Rand index against the task families
(mean and range over seeds), against the 95th percentile of the ARI of the same clustering with the
family labels shuffled (1,000 permutations: what chance agreement looks like for these group
sizes), and the silhouette by k.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default=str(ROOT / "assets" / "library"))
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()

    from lorlib_ui.core.library import Library
    from lorlib_ui.training.clusters import embed_library
    from lorlib_ui.training.mbc import adjusted_rand_index, mbc_cluster, silhouette_by_k

    experts, embedding = embed_library(Library.open(args.library))
    families = [e.family for e in experts]
    aris = [adjusted_rand_index(mbc_cluster(embedding, args.k, seed), families) for seed in range(args.seeds)]
    labels = mbc_cluster(embedding, args.k, 0)
    rng = np.random.default_rng(0)
    null = [adjusted_rand_index(labels, list(rng.permutation(families))) for _ in range(1000)]
    silhouette = silhouette_by_k(embedding, range(2, min(len(experts) - 1, 16) + 1))
    best = max(silhouette, key=silhouette.get)
    print(f"{len(experts)} private experts, {len(set(families))} families, k = {args.k}")
    print(
        f"ARI against families over {args.seeds} k-means seeds: mean {np.mean(aris):.3f}, "
        f"min {min(aris):.3f}, max {max(aris):.3f}"
    )
    print(
        f"ARI with shuffled families (seed 0 clustering): 95th percentile {np.percentile(null, 95):.3f}, "
        f"max {max(null):.3f} of 1000"
    )
    print("silhouette by k: " + ", ".join(f"{k}: {v:.3f}" for k, v in silhouette.items()) + f" (best k = {best})")


if __name__ == "__main__":
    main()
