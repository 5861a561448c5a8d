"""Building a library: private experts per task, a shared expert, and MBC cluster experts.

The recipe of Ostapenko et al. (2024): train one "private" LoRA per task (Sec. 5), cluster the
tasks by their experts' weights and train one expert per cluster (MBC, Sec. 4.1), and train one
"shared" LoRA on all tasks at once as the multi-task baseline. Some tasks of each family can be
held out of the library, so that routing is judged zero-shot on tasks no expert has seen
(`lorlib_ui.evaluation`).

Every expert is written to the library the moment it is trained (one atomic step each), so an
interrupted build loses at most the expert in training, and running the same build again resumes:
experts that are already there, trained on the same tasks, are skipped unless forced.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from lorlib_ui.data import MultiTaskData
from lorlib_ui.errors import LorlibError
from lorlib_ui.library import Expert, Library, check_name, expert_from_adapter
from lorlib_ui.mbc import adjusted_rand_index, embed, expert_vector, mbc_cluster, silhouette_by_k
from lorlib_ui.training import TrainConfig, train_expert

SHARED = "shared"
TASK_KINDS = ("private", "imported")  # the experts MBC clusters


@dataclass
class Job:
    """One expert to train: its name, kind and the tasks whose training rows it learns."""

    name: str
    kind: str
    tasks: list[str]
    family: str | None = None
    steps: int | None = None  # None: the config's


@dataclass
class Progress:
    """Where a build stands: expert `index` of `total` (from 1), at `step` of `steps`."""

    expert: str
    index: int
    total: int
    step: int
    steps: int
    loss: float | None


@dataclass
class BuildReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    seconds: float = 0.0


def expert_name(task: str) -> str:
    """A valid expert (folder) name for a task: other characters become '_', and a short hash of
    the task keeps two tasks that differ only in those characters apart."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", task).replace("..", "._")
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)
    if name != task or not name:
        name = f"{name[:90]}-{hashlib.sha1(task.encode()).hexdigest()[:8]}".lstrip("-")
    return check_name(name[:100])


def hold_out(data: MultiTaskData, per_family: int, seed: int = 0) -> list[str]:
    """`per_family` tasks of each family, drawn with a fixed seed, kept out of the library."""
    if per_family < 0:
        raise LorlibError(f"--holdout-per-family must be 0 or more, got {per_family}")
    if per_family == 0:
        return []
    held = []
    for family in data.families:
        tasks = data.tasks_in(family)
        if per_family >= len(tasks):
            raise LorlibError(
                f"family {family!r} has {len(tasks)} task(s): holding out {per_family} would leave none to train"
            )
        held += random.Random(f"{seed}:{family}").sample(tasks, per_family)
    return sorted(held)


def examples(data: MultiTaskData, tasks: list[str], split: str = "train") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the tasks' rows in one split."""
    pairs = [(row["input"], row["output"]) for task in tasks for row in data.rows(task, split)]
    if not pairs:
        raise LorlibError(f"{data.origin}: no {split} rows for {', '.join(tasks)}")
    return pairs


def _family(data: MultiTaskData, tasks: list[str]) -> str | None:
    families = {data.family_of(t) for t in tasks}
    return families.pop() if len(families) == 1 else None


def private_jobs(data: MultiTaskData, tasks: list[str]) -> list[Job]:
    return [Job(expert_name(t), "private", [t], data.family_of(t)) for t in tasks]


def shared_job(library: Library, data: MultiTaskData, steps: int | None) -> Job:
    """One expert on every task of the library's private experts."""
    tasks = sorted({t for e in library.experts if e.kind == "private" for t in e.tasks})
    if not tasks:
        raise LorlibError(f"library {library.path} has no private experts to train a shared expert on")
    return Job(SHARED, "shared", tasks, _family(data, tasks), steps)


def _up_to_date(library: Library, job: Job) -> bool:
    existing = next((e for e in library.experts if e.name == job.name), None)
    return existing is not None and existing.kind == job.kind and sorted(existing.tasks) == sorted(job.tasks)


def train_jobs(
    library: Library,
    data: MultiTaskData,
    jobs: list[Job],
    model,
    tokenizer,
    config: TrainConfig,
    force: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> BuildReport:
    """Train each job's expert and store it at once; skip those already in the library (same
    name, kind and tasks) unless `force`. An expert of the same name but other tasks is replaced
    only with `force`, except cluster and shared experts, which follow their tasks."""
    report = BuildReport()
    for job in jobs:  # refuse clashes before any training
        existing = next((e for e in library.experts if e.name == job.name), None)
        clash = existing is not None and not _up_to_date(library, job) and job.kind == "private"
        if clash and not force:
            raise LorlibError(
                f"library {library.path} already has an expert {job.name!r} ({existing.kind}, tasks "
                f"{', '.join(existing.tasks) or '-'}); use --force to replace it"
            )
    todo = [j for j in jobs if force or not _up_to_date(library, j)]
    report.skipped = [j.name for j in jobs if j not in todo]
    for index, job in enumerate(todo, 1):
        job_config = TrainConfig(**{**asdict(config), "steps": job.steps or config.steps})

        def step(done: int, total: int, loss: float, job=job, index=index) -> None:
            if progress is not None:
                progress(Progress(job.name, index, len(todo), done, total, loss))

        if progress is not None:
            progress(Progress(job.name, index, len(todo), 0, job_config.steps, None))
        result = train_expert(model, tokenizer, examples(data, job.tasks), job_config, step, cancel)
        training = {**asdict(job_config), "targets": list(job_config.targets), "data": data.origin}
        entry = expert_from_adapter(
            job.name,
            result.adapter,
            library.base_model,
            kind=job.kind,
            tasks=job.tasks,
            family=job.family,
            training=training,
            metrics=result.metrics,
        )
        library.add_experts([(entry, result.adapter)], force=True)
        report.trained.append(job.name)
    return report


# ---- MBC -----------------------------------------------------------------------------------------


@dataclass
class Clustering:
    """MBC over a library's task experts: who is in which cluster, and how good k looks."""

    experts: list[str]
    labels: list[int]
    k: int
    seed: int
    keep_quantile: float
    silhouette: dict[int, float]  # k -> score, a suggestion for k
    families: list[str | None]
    ari: float | None  # against the families, when every expert has one
    similarity: np.ndarray
    vectors: np.ndarray

    def groups(self) -> list[list[str]]:
        """The experts of each cluster, clusters numbered from 0 in order of first appearance."""
        out: dict[int, list[str]] = {}
        for name, label in zip(self.experts, self.labels):
            out.setdefault(label, []).append(name)
        return [out[label] for label in sorted(out)]

    def to_manifest(self, names: list[str]) -> dict:
        """The manifest's record of it, with `names[i]` the expert trained for cluster i."""
        return {
            "method": "mbc",
            "k": self.k,
            "seed": self.seed,
            "keep_quantile": self.keep_quantile,
            "assignment": {e: names[label] for e, label in zip(self.experts, self.labels)},
            "members": dict(zip(names, self.groups())),
            "silhouette": {str(k): round(v, 4) for k, v in self.silhouette.items()},
            "ari_vs_families": None if self.ari is None else round(self.ari, 4),
        }


def task_experts(library: Library) -> list[Expert]:
    experts = [e for e in library.experts if e.kind in TASK_KINDS]
    if len(experts) < 2:
        raise LorlibError(f"library {library.path} has {len(experts)} private expert(s); clustering needs 2 or more")
    return experts


def embed_library(library: Library, keep_quantile: float = 0.5, seed: int = 0):
    """The MBC embedding of the library's task experts (private and imported)."""
    experts = task_experts(library)
    modules = sorted(library.load_adapter(experts[0].name).factors)
    vectors = []
    for e in experts:
        factors = library.load_adapter(e.name).factors
        if sorted(factors) != modules:
            raise LorlibError(f"expert {e.name} adapts other modules than {experts[0].name}; MBC needs the same")
        arrays = {m: (a.float().numpy(), b.float().numpy()) for m, (a, b) in factors.items()}
        vectors.append(expert_vector(arrays, modules))
    return experts, embed([e.name for e in experts], vectors, keep_quantile, seed)


def cluster_library(library: Library, k: int, seed: int = 0, keep_quantile: float = 0.5) -> Clustering:
    experts, embedding = embed_library(library, keep_quantile, seed)
    raw = mbc_cluster(embedding, k, seed)
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
        families,
        ari,
        embedding.similarity,
        embedding.vectors,
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


def family_cluster(library: Library, family: str) -> str | None:
    """The cluster expert trained on most of a family's library tasks: the oracle for a held-out
    task of that family (None when no cluster expert has a task of it)."""
    family_of = {t: e.family for e in library.experts if e.kind in TASK_KINDS for t in e.tasks}
    votes = {e.name: sum(family_of.get(t) == family for t in e.tasks) for e in library.experts if e.kind == "cluster"}
    best = max(sorted(votes), key=lambda name: votes[name], default=None)
    return best if best is not None and votes[best] > 0 else None
