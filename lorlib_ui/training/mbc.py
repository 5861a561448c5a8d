"""Model-based clustering (MBC): group tasks by the similarity of their experts' weights.

Ostapenko et al. (2024, Sec. 4.1) cluster the private experts of a library and train one expert
per cluster. Following the paper's code, each expert becomes one vector:

1. flatten and concatenate all its A and B factors (every expert must adapt the same modules
   with the same ranks, so that entries line up);
2. sparsify: keep the entries whose |w| is above the expert's own `keep_quantile` of |w|, zero
   the rest;
3. reduce to at most 64 dimensions by SVD (exact, from the experts' Gram matrix; the paper's
   code uses sklearn's randomized TruncatedSVD) and L2-normalise;
4. cosine similarity between experts, and k-means (k-means++, n_init=10, fixed seed) on the rows
   of that similarity matrix.

The paper's code offers no way to choose k; `silhouette_by_k` reports silhouette scores over a
range of k as a suggestion, and `adjusted_rand_index` says how well clusters recover known task
families. Plain numpy in and out: no torch, so the UI can call it through the worker cheaply.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.config import KEEP_QUANTILE

MAX_DIMENSIONS = 64


@dataclass
class Embedding:
    names: list[str]
    vectors: np.ndarray  # (experts, dims), unit rows
    similarity: np.ndarray  # (experts, experts), cosine


def check_quantile(keep_quantile: float) -> None:
    if not 0.0 <= keep_quantile < 1.0:
        raise LorlibError(f"the sparsity quantile must be in [0, 1), got {keep_quantile}")


def check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise LorlibError(f"k must be between 1 and the number of clustered experts ({n}), got {k}")


def threshold(row: np.ndarray, keep_quantile: float) -> float:
    """The |w| at and under which step 2 zeroes an entry of this expert's vector."""
    return float(np.quantile(np.abs(row), keep_quantile))


def zero_small(row: np.ndarray, at_most: float) -> None:
    """Zero, in place, the entries of `row` whose |w| is at most `at_most` (step 2). Multiplying by
    the mask is ten times faster than numpy's masked copy (`np.copyto(..., where=)`) on rows this
    long; an entry zeroed this way may be -0.0, which no product tells from 0."""
    np.multiply(row, np.abs(row) > at_most, out=row)


def sparsify(vectors: np.ndarray, keep_quantile: float) -> np.ndarray:
    """Zero, in place, the entries whose |w| is not above the `keep_quantile` of their row's |w|.

    In place and one row per thread because the rows are long (921,600 weights per expert for
    rank 4 on SmolLM2's attention): a copy costs seconds, and numpy's partition releases the GIL,
    so threads share out the quantiles."""
    rows = vectors.reshape(-1, vectors.shape[-1])

    def one(row: np.ndarray) -> None:
        zero_small(row, threshold(row, keep_quantile))

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(one, rows))
    return vectors


def gram_coordinates(gram: np.ndarray, dims: int) -> np.ndarray:
    """U_k Σ_k of the exact SVD of X, from its Gram matrix G = X Xᵀ (n x n): G = U Σ² Uᵀ.

    What sklearn's TruncatedSVD.fit_transform approximates, computed by hand because experts are
    few and their vectors long (256 x 921,600 for rank 4 on SmolLM2's attention): G takes one pass
    over the weights, can be summed block by block without holding X (`build.clusters`), and its
    eigenvectors are exact, where the randomized SVD needs several passes over X, took 13 s
    instead of 0.3 s at 256 experts and put cosines off by up to 0.12."""
    eigenvalues, u = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
    top = np.argsort(eigenvalues)[::-1][:dims]
    return u[:, top] * np.sqrt(np.clip(eigenvalues[top], 0.0, None))


def embed_gram(names: list[str], gram: np.ndarray) -> Embedding:
    """The embedding (steps 3 and 4) from the Gram matrix of the sparsified expert vectors."""
    from sklearn.preprocessing import normalize

    if len(names) < 2:
        raise LorlibError("clustering needs at least 2 experts")
    unit = normalize(gram_coordinates(gram, min(MAX_DIMENSIONS, len(names))))
    return Embedding(list(names), unit, unit @ unit.T)


def embed(names: list[str], vectors, keep_quantile: float = KEEP_QUANTILE) -> Embedding:
    """Sparsified, SVD-reduced, unit-norm expert vectors and their cosine similarities, from the
    vectors in memory (a library is embedded block by block instead: `build.clusters`).

    `vectors`: one flattened expert per row. A float32 array is sparsified in place (no copy);
    anything else is copied first. The SVD is exact, so nothing here is random: the seed of MBC
    is k-means' (`mbc_cluster`)."""
    if len(names) < 2:
        raise LorlibError("clustering needs at least 2 experts")
    if len({np.shape(v) for v in vectors}) != 1:
        raise LorlibError("clustering needs experts that adapt the same modules with the same ranks")
    check_quantile(keep_quantile)
    matrix = sparsify(np.asarray(vectors, dtype=np.float32), keep_quantile)
    return embed_gram(names, (matrix @ matrix.T).astype(np.float64))


def mbc_cluster(embedding: Embedding, k: int, seed: int = 0) -> np.ndarray:
    """Cluster index per expert: k-means on the rows of the similarity matrix S = V Vᵀ.

    Computed on n x d features instead of S's n x n rows, with the same distances: row i of S is
    V v_i, so ‖S_i − S_j‖² = (v_i − v_j)ᵀ VᵀV (v_i − v_j) = ‖L v_i − L v_j‖² with L = (VᵀV)^½, and
    the k-means of the rows V L (d ≤ 64 columns) is the k-means of S's rows (same objective, same
    k-means++ draws), at a cost that grows with n·d rather than n² per iteration."""
    from sklearn.cluster import KMeans

    check_k(k, len(embedding.names))
    return KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed).fit_predict(similarity_rows(embedding))


def similarity_rows(embedding: Embedding) -> np.ndarray:
    """V (VᵀV)^½: rows as far apart as the similarity matrix's rows (`mbc_cluster`)."""
    vectors = np.asarray(embedding.vectors, dtype=np.float64)
    eigenvalues, q = np.linalg.eigh(vectors.T @ vectors)
    return vectors @ (q * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ q.T


def silhouette_by_k(embedding: Embedding, ks: range | list[int], seed: int = 0) -> dict[int, float]:
    """Silhouette score (cosine distance on the embedding) for each k with 2 <= k < experts."""
    from sklearn.metrics import silhouette_score

    n = len(embedding.names)
    scores = {}
    for k in ks:
        if 2 <= k < n:
            labels = mbc_cluster(embedding, k, seed)
            scores[k] = float(silhouette_score(embedding.vectors, labels, metric="cosine"))
    return scores


def adjusted_rand_index(labels: np.ndarray | list[int], families: list[str]) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(families, labels))
