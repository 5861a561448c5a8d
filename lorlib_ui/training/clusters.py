"""MBC over a library: cluster its task experts by their weights, then train one expert per cluster.

Ostapenko et al. (2024, Sec. 4.1): the private experts' weights are embedded and clustered
(`lorlib_ui.training.mbc`); the tasks of each cluster are pooled and one expert is trained on them. This
module connects that to a library: which experts are clustered (private and imported ones), how
the assignment is recorded in the manifest, and how cluster experts are named and kept up to
date. (Which cluster expert is a held-out task's oracle: `lorlib_ui.core.routers.oracle`.)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from lorlib_ui.core.adapters import WEIGHTS_FILE, factor_spans, read_spans
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import TASK_KINDS, Expert, Library
from lorlib_ui.training.config import KEEP_QUANTILE, TrainConfig
from lorlib_ui.training.mbc import (
    adjusted_rand_index,
    check_k,
    check_quantile,
    embed_gram,
    mbc_cluster,
    silhouette_by_k,
    threshold,
    zero_small,
)
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import QUIET, Reporter
from lorlib_ui.training.trainers import BuildReport, Job, LocalTrainer, Trainer


@dataclass
class Clustering:
    """MBC over a library's task experts: who is in which cluster, and how good k looks."""

    experts: list[str]
    labels: list[int]
    k: int
    seed: int
    keep_quantile: float
    silhouette: dict[int, float]  # k -> score, a suggestion for k
    ari: float | None  # against the families, when every expert has one
    method: str = "mbc"  # or "random": a control, MBC's cluster sizes with experts assigned at random

    def groups(self) -> list[list[str]]:
        """The experts of each cluster, clusters numbered from 0 in order of first appearance."""
        out: dict[int, list[str]] = {}
        for name, label in zip(self.experts, self.labels):
            out.setdefault(label, []).append(name)
        return [out[label] for label in sorted(out)]

    def to_manifest(self, names: list[str]) -> dict:
        """The manifest's record of it, with `names[i]` the expert trained for cluster i."""
        return {
            "method": self.method,
            "k": self.k,
            "seed": self.seed,
            "keep_quantile": self.keep_quantile,
            "assignment": {e: names[label] for e, label in zip(self.experts, self.labels)},
            "members": dict(zip(names, self.groups())),
            "silhouette": {str(k): round(v, 4) for k, v in self.silhouette.items()},
            "ari_vs_families": None if self.ari is None else round(self.ari, 4),
        }


def task_experts(library: Library) -> list[Expert]:
    """The experts MBC clusters, by name: the clusters (and their numbering) do not depend on the
    order experts were added in, which a parallel build does not fix."""
    experts = sorted((e for e in library.experts if e.kind in TASK_KINDS), key=lambda e: e.name)
    if len(experts) < 2:
        raise LorlibError(f"library {library.path} has {len(experts)} private expert(s); clustering needs 2 or more")
    return experts


BLOCK_BYTES = 256 << 20  # one column block of all experts' vectors, in float32


def weight_gram(library: Library, experts: list[Expert], keep_quantile: float) -> np.ndarray:
    """G[i, j] = x_i · x_j in float64, x_i expert i's sparsified weight vector: its A and B
    factors flattened module by module in sorted order, entries at or under its threshold zeroed
    (`lorlib_ui.training.mbc`, steps 1 and 2).

    G[i, j] depends only on the two experts' weights, so the library keeps G at the default
    quantile, which the Clusters tab uses (derived data of kind `GRAM`: rows keyed by weights hash, with each
    expert's threshold), and only the rows of the experts it lacks are computed: n x D
    multiply-adds each, where the whole matrix is n² x D (10¹² at 1,024 experts, 24 s on 2 cores).
    `keep_gram` brings it up to date after experts are added. Another quantile is computed whole
    each time, and never replaces the kept matrix."""
    check_quantile(keep_quantile)
    hashes = [e.weights_hash for e in experts]
    kept = keep_quantile == KEEP_QUANTILE
    stored = _stored_gram(library) if kept else _StoredGram.empty()
    known = [i for i, digest in enumerate(hashes) if digest in stored.rows]
    new = sorted(set(range(len(experts))) - set(known))
    at = [stored.rows[hashes[i]] for i in known]
    gram = np.empty((len(experts), len(experts)))
    gram[np.ix_(known, known)] = stored.gram[np.ix_(at, at)]
    if not new:
        return gram
    thresholds = np.full(len(experts), np.nan)
    thresholds[known] = stored.thresholds[at]
    rows = _gram_rows(library, experts, new, thresholds, keep_quantile, reference=known[0] if known else 0)
    gram[new, :] = rows
    gram[:, new] = rows.T
    if kept and all(hashes):  # an expert without a hash (a hand-edited manifest) could not be looked up again
        once = list({digest: i for i, digest in enumerate(hashes)}.values())  # experts stored twice: one row
        library.derived.write(
            GRAM,
            {"gram": torch.from_numpy(gram[np.ix_(once, once)]), "thresholds": torch.from_numpy(thresholds[once])},
            {
                "format": GRAM_FORMAT,
                "hashes": json.dumps([hashes[i] for i in once]),
                "keep_quantile": repr(keep_quantile),
            },
        )
    return gram


def keep_gram(library: Library) -> None:
    """Bring the library's kept MBC Gram matrix up to date with its task experts, after a build
    or an import, so that the next cluster view computes nothing. A library with fewer than two
    task experts, or with experts MBC cannot cluster together, has nothing to keep. It is only a
    cache: whatever goes wrong here (an expert removed meanwhile, memory) is logged, never the
    failure of the build or import that has already succeeded, and the next view computes it."""
    try:
        weight_gram(library, task_experts(library), KEEP_QUANTILE)
    except LorlibError:
        pass
    except Exception as exc:  # a cache's refresh must not fail what called it
        logging.getLogger(__name__).warning("the MBC Gram matrix of %s was not kept: %r", library.path, exc)


@dataclass
class _StoredGram:
    rows: dict[str, int]  # weights hash -> row and column
    gram: np.ndarray
    thresholds: np.ndarray

    @staticmethod
    def empty() -> _StoredGram:
        return _StoredGram({}, np.empty((0, 0)), np.empty(0))


GRAM = "mbc-gram"  # its kind of derived data (`lorlib_ui.core.derived`)
GRAM_FORMAT = "1"  # what the kept matrix holds; a change to the MBC vectors or thresholds bumps it


def _stored_gram(library: Library) -> _StoredGram:
    """What the library keeps of the Gram matrix: nothing where the cache is missing, of another
    format or quantile, or fails its checks (a Gram matrix has a finite, non-negative diagonal)."""
    nothing = _StoredGram.empty()
    tensors, metadata = library.derived.read(GRAM) or ({}, {})
    try:
        if metadata.get("format") != GRAM_FORMAT or metadata.get("keep_quantile") != repr(KEEP_QUANTILE):
            return nothing
        hashes = json.loads(metadata["hashes"])
        gram, thresholds = tensors["gram"].double().numpy(), tensors["thresholds"].double().numpy()
        if (
            not all(isinstance(digest, str) for digest in hashes)
            or gram.shape != (len(hashes), len(hashes))
            or thresholds.shape != (len(hashes),)
            or not (np.isfinite(gram).all() and np.isfinite(thresholds).all())
            or (np.diag(gram) < 0).any()
            or (thresholds < 0).any()
        ):
            return nothing
        return _StoredGram({digest: i for i, digest in enumerate(hashes)}, gram, thresholds)
    except (KeyError, ValueError, TypeError):
        return nothing


def _gram_rows(
    library: Library,
    experts: list[Expert],
    new: list[int],
    thresholds: np.ndarray,
    keep_quantile: float,
    reference: int,
) -> np.ndarray:
    """Rows `new` of the Gram matrix (len(new) x n), without holding the n x D matrix of the x_i
    (3.7 MB per expert for rank 4 on SmolLM2's attention: 15 GB at 4,096 experts). Two passes
    over the adapters, one thread per core (reading files, bf16-to-float32 copies and numpy's
    partition release the GIL):

    1. the new experts whole, checked (each lines up with the `reference` expert: a stored one
       where there are any, as those were checked when they were stored) and their thresholds
       filled into `thresholds`; every expert's header, for where its tensors are;
    2. column blocks of whole modules, each sized so that all n experts' block is BLOCK_BYTES:
       only those tensors are read, sparsified with the thresholds, and the block's X_new X_bᵀ
       is added. Memory grows as n² + BLOCK_BYTES, not as n x D.
    """
    folders = [library.path / e.path for e in experts]
    first = library.load_adapter(experts[reference].name).factors
    modules = sorted(first)
    layout = {m: (a.numel(), b.numel()) for m, (a, b) in first.items()}
    stamps, spans = [None] * len(experts), [None] * len(experts)
    is_new = set(new)

    def measure(i: int) -> None:
        stamps[i] = _stamp(folders[i])
        if i in is_new:
            factors = library.load_adapter(experts[i].name).factors
            if sorted(factors) != modules:
                raise LorlibError(
                    f"expert {experts[i].name} adapts other modules than {experts[reference].name}; MBC needs the same"
                )
            if any((factors[m][0].numel(), factors[m][1].numel()) != layout[m] for m in modules):
                raise LorlibError("clustering needs experts that adapt the same modules with the same ranks")
            row = torch.cat([t.reshape(-1).float() for m in modules for t in factors[m]]).numpy()
            thresholds[i] = threshold(row, keep_quantile)
        spans[i] = factor_spans(folders[i], modules)

    rows = np.zeros((len(new), len(experts)))
    everyone = len(new) == len(experts)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(measure, range(len(experts))))
        stop = 0
        for block in _column_blocks(modules, layout, max(1, BLOCK_BYTES // (4 * len(experts)))):
            first, stop = stop, stop + len(block)  # the block's modules, by position in `modules`
            width = sum(sum(layout[m]) for m in block)
            matrix = np.empty((len(experts), width), dtype=np.float32)

            def fill(i: int, first=first, stop=stop, matrix=matrix) -> None:
                pieces = read_spans(folders[i], spans[i], 2 * first, 2 * stop)  # A and B of each module
                if _stamp(folders[i]) != stamps[i]:
                    raise LorlibError(f"expert {experts[i].name} changed on disk while it was clustered; run again")
                torch.from_numpy(matrix[i]).copy_(torch.cat(pieces))  # mixed dtypes: cat promotes
                zero_small(matrix[i], thresholds[i])

            list(pool.map(fill, range(len(experts))))
            # X Xᵀ is one symmetric BLAS call (half the work) where every row is new
            rows += matrix @ matrix.T if everyone else matrix[new] @ matrix.T
    return rows


def _column_blocks(modules: list[str], layout: dict[str, tuple[int, int]], width: int) -> list[list[str]]:
    """Consecutive runs of modules, each as wide as `width` columns or just one module."""
    blocks, current, used = [], [], 0
    for m in modules:
        if current and used + sum(layout[m]) > width:
            blocks.append(current)
            current, used = [], 0
        current.append(m)
        used += sum(layout[m])
    return blocks + [current]


def _stamp(folder) -> tuple[int, int, int]:
    """What changes when an adapter's weights file is replaced (the library replaces, never edits)."""
    stat = (folder / WEIGHTS_FILE).stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def embed_library(library: Library, keep_quantile: float = KEEP_QUANTILE):
    """The MBC embedding of the library's task experts (private and imported)."""
    experts = task_experts(library)
    return experts, embed_gram([e.name for e in experts], weight_gram(library, experts, keep_quantile))


GROUPINGS = ("mbc", "random")


def cluster_library(
    library: Library, k: int, seed: int = 0, keep_quantile: float = KEEP_QUANTILE, grouping: str = "mbc"
) -> Clustering:
    """MBC at k over the library's task experts. `grouping="random"` is its control: the same
    cluster sizes as MBC's, with the experts dealt into them at random (seeded), so that an
    evaluation can tell whether what cluster experts gain or lose comes from MBC's grouping or
    from grouping at all."""
    if grouping not in GROUPINGS:
        raise LorlibError(f"unknown grouping {grouping!r}; use {' or '.join(GROUPINGS)}")
    check_k(k, len(task_experts(library)))  # before the embedding, which may take a while
    experts, embedding = embed_library(library, keep_quantile)
    raw = mbc_cluster(embedding, k, seed)
    if grouping == "random":
        raw = np.random.default_rng(seed).permutation(raw)
    order = {label: i for i, label in enumerate(dict.fromkeys(raw.tolist()))}  # number by first appearance
    labels = [order[label] for label in raw.tolist()]
    families = [e.family for e in experts]
    ari = adjusted_rand_index(labels, families) if all(families) and len(set(families)) > 1 else None
    ks = range(2, min(len(experts) - 1, 16) + 1)
    return Clustering(
        [e.name for e in experts],
        labels,
        k,
        seed,
        keep_quantile,
        silhouette_by_k(embedding, ks, seed),
        ari,
        grouping,
    )


def cluster_jobs(library: Library, clustering: Clustering, steps: int | None = None) -> list[Job]:
    """One job per cluster, on the union of its experts' tasks. A cluster expert already in the
    library with exactly those tasks keeps its name (and is not retrained); new ones take the
    first free name cluster0, cluster1, ..."""
    by_tasks = {tuple(sorted(e.tasks)): e.name for e in library.experts if e.kind == "cluster"}
    task_sets = [sorted({t for n in names for t in library.expert(n).tasks}) for names in clustering.groups()]
    names = [by_tasks.get(tuple(tasks)) for tasks in task_sets]
    taken = set(library.names)
    free = (f"cluster{i}" for i in range(10**6) if f"cluster{i}" not in taken)
    names = [name or next(free) for name in names]
    families = [{library.expert(n).family for n in group} for group in clustering.groups()]
    return [
        Job(name, "cluster", tasks, fams.pop() if len(fams) == 1 else None, steps)
        for name, tasks, fams in zip(names, task_sets, families)
    ]


def record_clustering(library: Library, clustering: Clustering, jobs: list[Job], drop_stale: bool = True) -> list[str]:
    """Store the assignment in the manifest and (with `drop_stale`) drop the cluster experts of
    an earlier clustering that no cluster of this one reuses. Returns the names dropped."""
    keep = {job.name for job in jobs}
    with library.edit() as current:
        stale = [e.name for e in current.experts if e.kind == "cluster" and e.name not in keep and drop_stale]
        current.experts = [e for e in current.experts if e.name not in stale]
        current.clusters = clustering.to_manifest([job.name for job in jobs])
    return stale


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """MBC and its cluster experts (the `cluster` command's flags and a cluster job's keys)."""

    k: int = option(help="number of clusters")
    steps: int | None = option(None, "steps per cluster expert (default 2 x private)")
    train: bool = option(True, "only compute and record the clusters")  # its flag: --no-train
    seed: int = option(0, "seeds the clustering and the training")
    keep_quantile: float = option(KEEP_QUANTILE, "sparsify: keep |w| above this quantile")
    data: str | None = option(None, "training data (default: what the library was built from)")
    force: bool = option(False, "retrain cluster experts that are up to date")
    grouping: str = option(
        "mbc",
        "mbc, or random: a control with MBC's cluster sizes and the experts assigned at random",
        choices=GROUPINGS,
    )

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise LorlibError(f"steps must be positive, got {self.steps}")
        check_quantile(self.keep_quantile)
        if self.grouping not in GROUPINGS:
            raise LorlibError(f"unknown grouping {self.grouping!r}; use {' or '.join(GROUPINGS)}")


def cluster_and_train(
    path: str,
    options: ClusterOptions,
    trainer: Trainer | None = None,
    reporter: Reporter = QUIET,
    on_clustering: Callable[[dict], None] | None = None,
) -> tuple[dict, BuildReport]:
    """MBC at k over the library's task experts, recorded in its manifest; then (with `train`)
    one expert per cluster, with the private experts' training settings and `steps` (default:
    twice theirs), trained by `trainer` (default: a `LocalTrainer`). Returns the manifest's
    clustering record (also handed to `on_clustering` as soon as it is recorded, before training)
    and what was trained."""
    from lorlib_ui.training.data import load_tasks

    start = time.perf_counter()
    library = Library.open(path)
    clustering = cluster_library(library, options.k, options.seed, options.keep_quantile, options.grouping)
    recipe = task_experts(library)[0].training or {}
    steps = options.steps or 2 * int(recipe.get("steps", 100))
    jobs = cluster_jobs(library, clustering, steps)
    loaded = None
    if options.train:  # every task of every cluster must be in the data before anything is written
        loaded = load_tasks(library.data_source(options.data))
        for task in {t for job in jobs for t in job.tasks}:
            loaded.family_of(task)
    dropped = record_clustering(library, clustering, jobs, drop_stale=options.train)
    if on_clustering is not None:
        on_clustering(library.clusters)
    if dropped:
        reporter.log(f"removed cluster experts of an earlier clustering: {', '.join(dropped)}")
    report = BuildReport()
    if loaded is not None:
        settings = {key: recipe[key] for key in ("rank", "targets", "batch_size", "learning_rate") if key in recipe}
        config = TrainConfig.from_options(settings, steps=steps, seed=options.seed)
        report = (trainer or LocalTrainer()).train(library, loaded, jobs, config, options.force, reporter)
    report.seconds = time.perf_counter() - start
    return library.clusters, report


def umap_coords(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D UMAP (cosine) of expert embeddings, for the cluster view; the first two coordinates
    when there are too few experts for UMAP."""
    n = len(vectors)
    if n < 5:  # UMAP's spectral layout needs a few more points than dimensions
        out = np.zeros((n, 2))
        out[:, : min(2, vectors.shape[1])] = vectors[:, :2]
        return out
    import umap

    reducer = umap.UMAP(n_neighbors=min(15, n - 1), n_components=2, metric="cosine", random_state=seed)
    return reducer.fit_transform(vectors).astype(np.float64)
