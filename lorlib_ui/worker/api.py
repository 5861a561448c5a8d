"""The model worker interface: everything the UI may ask of the model side, in plain data.

The UI never touches a model and never imports torch; it holds a `Worker` and calls these
methods. What crosses the boundary is plain: dataclasses of strings, numbers, lists, dicts and
numpy arrays (the routing record), so that a worker can live in another process or on another
machine (the Ray backend) behind the same interface as the in-process one (`LocalWorker`).

Errors a user can cause come back as `LorlibError` with a one-line message for the UI to show.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorlib_ui.core.prompting import MAX_NEW_TOKENS as MAX_NEW_TOKENS  # the UI's limit is the worker's
from lorlib_ui.core.record import RoutingRecord
from lorlib_ui.training.config import ADAPT_METHODS as ADAPT_METHODS  # the ways an adapt job learns a task
from lorlib_ui.training.config import TASK_SETS as TASK_SETS  # the sets of tasks jobs take by name

DOWNLOAD_KEEP_S = 60  # a worker's download zip is copied by the app as it is returned: older ones go


def duration(seconds: float) -> str:
    """`about 55 min`, `about 2 h 10 min`, `under a minute`: rough, as an estimate is. The one way
    the worker and the UI say how long something takes."""
    if seconds < 60:
        return "under a minute"
    minutes = round(seconds / 60) if seconds < 3600 else 10 * round(seconds / 600)
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return f"about {minutes} min"
    return f"about {hours} h" + (f" {minutes} min" if minutes else "")


def download_folder(root: str | Path) -> Path:
    """A new private folder under `root` for one download, after removing the downloads that have
    not been written to for `DOWNLOAD_KEEP_S` (one still being zipped is being written to)."""
    now = time.time()
    for folder in Path(root).glob("download-*"):
        try:
            newest = max((f.stat().st_mtime for f in folder.iterdir()), default=folder.stat().st_mtime)
        except OSError:
            continue  # removed meanwhile
        if now - newest > DOWNLOAD_KEEP_S:
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="download-", dir=root))


@dataclass
class LibraryInfo:
    path: str
    base_model: str
    experts: list[dict]  # manifest entries, plus "cluster" (MBC assignment) where known
    modules: list[str]  # short names of the base model's per-layer linear modules: what LoRA can adapt
    new_targets: list[str]  # what new experts adapt by default: as most task experts do (MBC needs
    new_rank: int  # the same modules and rank for all), or the trainer's defaults in an empty library
    held_out: list[str]
    clusters: dict
    evaluation: dict | None
    history: list[dict]
    routers: list[str] = field(default_factory=list)  # router specs to offer, from the router registry
    router_notes: dict[str, str] = field(default_factory=dict)  # spec -> one line on what it does
    routers_missing: dict[str, str] = field(default_factory=dict)  # spec it cannot run yet -> what it lacks
    adaptation: dict = field(default_factory=dict)  # task -> the last `adapt` record on it
    learned_routers: list[dict] = field(default_factory=list)  # manifest entries of its learned routers
    problems: dict[str, str] = field(default_factory=dict)  # expert -> why it cannot be used (remove it)
    fingerprint: str = ""  # of the base model's linear shapes: which base model the library fits
    demo: dict | None = None  # the example the Route tab opens on (`lorlib_ui.analysis.demo`), if stored


@dataclass
class Example:
    """A prompt the Route tab offers (`Worker.examples`): a validation row of a held-out task,
    never a test row (those are the evaluation's)."""

    label: str  # what the menu shows: the row's question, the task's short name, the verdict if known
    prompt: str
    expected: str  # the row's reference answer
    task: str
    kind: str  # "helps": the router right, the base model wrong; "fails": the router wrong (both
    # picked on validation rows by `lorlib_ui.analysis.demo`); "plain": a row with no verdict known


@dataclass
class RouteRequest:
    library: str
    prompt: str
    router: str = "arrow"  # a router spec: arrow, arrow@private, uniform, base, expert:NAME ...
    top_k: int | None = None
    temperature: float = 1.0
    mix: str = "outputs"
    max_new_tokens: int = 48
    chat: bool = True
    density: float | None = None  # ties: the share of each expert's entries kept (None: its default)
    expected: str | None = None  # a reference answer: the worker grades the answer by it (`RouteUpdate.correct`)


@dataclass
class RouteUpdate:
    """One step of a streamed generation; the last has `done` set and carries the record."""

    text: str
    done: bool = False
    record: RoutingRecord | None = None
    n_prompt_tokens: int = 0
    truncated: bool = False
    first_token_s: float | None = None  # seconds from the request to the first generated token
    total_s: float | None = None
    prompt_limit: int | None = None  # the longest prompt the worker prefills (a cut one is `truncated`)
    answer_tokens: int | None = None  # the answer's tokens, the stop token not counted (0: the first one stopped)
    correct: bool | None = None  # whether the answer is the request's `expected`, graded as the evaluation grades


@dataclass
class ClusterView:
    """MBC over the task experts at one k, with a 2-D UMAP of the same embedding."""

    names: list[str]
    kinds: list[str]
    families: list[str | None]
    tasks: list[list[str]]
    labels: list[int]  # MBC cluster per expert; -1 for experts outside the clustering
    k: int
    coords: np.ndarray  # (experts, 2)
    similarity: np.ndarray  # (clustered experts, clustered experts), cosine
    clustered: list[str]  # the experts MBC clustered (private and imported), in similarity order
    silhouette: dict[int, float]
    ari: float | None


@dataclass
class ExpertDetail:
    """One expert up close: its ΔW = s·B·A layer by layer, its nearest experts, its training."""

    name: str
    kind: str
    tasks: list[str]
    family: str | None
    modules: list[str]  # the LoRA'd layers, in the model's order
    norms: list[float]  # per module: Frobenius norm of ΔW
    singular_values: list[list[float]]  # per module: the singular values of ΔW, descending (r of them)
    nearest: list[tuple[str, float]]  # the most similar other experts by MBC cosine, most similar first
    loss_curve: list[float] | None  # training loss per step; None where none was recorded
    metrics: dict  # the manifest's training metrics, without the curve
    nearest_note: str = ""  # why `nearest` is empty, where it is


@dataclass
class InsightView:
    """What judges routing, as stored in the library: the transfer matrix (each expert alone on
    each task) and the last routing statistics of each router, in one order for both.

    Results computed before the library's experts changed are kept, stale, until they are
    computed again: `stale` says which and why, and whatever shows them must say so too."""

    tasks: list[str]  # by family, then name
    families: list[str | None]
    experts: list[str]  # by MBC cluster (task experts), then cluster and shared experts
    groups: list[str]  # per expert: its cluster, or its kind outside the clustering
    transfer: dict | None  # TransferMatrix.to_dict(), or None when none is stored
    routing: dict[str, dict]  # router spec -> {"all": ..., "content": ...} (RoutingStats.to_dict)
    routers: list[str] = field(default_factory=list)  # what the library can route with (the Route menu)
    # "transfer" or a router spec -> why what is shown of it is stale ("1 expert added since")
    stale: dict[str, str] = field(default_factory=dict)
    # "transfer" or a router spec -> about how long computing it again takes ("about 5 min on a CPU")
    recompute: dict[str, str] = field(default_factory=dict)
    unscored: list[str] = field(default_factory=list)  # experts added since the transfer matrix: no column yet
    task_set: str | None = None  # the set of tasks (TASK_SETS) the shown tasks belong to, smallest first


@dataclass
class JobRequest:
    kind: str  # "build", "cluster", "evaluate", "transfer", "routing" or "adapt"
    library: str
    options: dict = field(default_factory=dict)
    owner: str | None = None  # the app session that asked: the job is cancelled when it ends...
    detached: bool = False  # ...unless the user asked for it to finish in the background


@dataclass
class JobStatus:
    id: str
    kind: str
    state: str  # queued, running, done, failed, cancelled
    fraction: float = 0.0
    message: str = ""
    result: dict | None = None
    detail: dict | None = None  # what a running job publishes as it goes (adapt: each method's loss so far)


class Worker(ABC):
    """The model side, as the UI sees it."""

    @abstractmethod
    def health(self) -> dict:
        """device, base models loaded, jobs queued; answers at once, even while busy."""

    @abstractmethod
    def warm_up(self, path: str) -> None:
        """Start loading what the first requests on a library need, in the background."""

    @abstractmethod
    def library(self, path: str) -> LibraryInfo: ...

    @abstractmethod
    def comparisons(self) -> dict[str, bool]:
        """The routers an evaluation can compare, by name, and whether each is ticked by default
        (the router registry's presets are; few-shot LoraHub, which searches per task, is not)."""

    @abstractmethod
    def examples(self, path: str, per_task: int = 2) -> list[Example]:
        """Prompts for the Route tab, from validation rows of the library's held-out tasks: the
        examples stored by `lorlib_ui.analysis.demo` (where the router helps, then where it fails),
        then up to `per_task` other rows of each task."""

    @abstractmethod
    def route(self, request: RouteRequest) -> Iterator[RouteUpdate]:
        """Generate under a router, streaming the text; the last update holds the record."""

    @abstractmethod
    def explain(self, request: RouteRequest, answer: str | None = None, compare: str | None = None) -> dict:
        """An answer to the request's prompt explained token by token under its router
        (`lorlib explain`): by default the router's own greedy answer. Plain data: `Explanation.to_dict`."""

    @abstractmethod
    def route_batch(self, request: RouteRequest, file: str) -> Iterator[dict]:
        """Many prompts from an uploaded JSONL or CSV file under the request's router (`lorlib
        route-batch`): {"done", "total"} after each batch, then also {"file": the results CSV (in
        the worker's temp folder), "errors": rows that could not run}."""

    @abstractmethod
    def clusters(self, path: str, k: int) -> ClusterView: ...

    @abstractmethod
    def expert_detail(self, path: str, name: str) -> ExpertDetail:
        """One expert's ΔW norms and singular values per layer, its nearest experts by MBC
        similarity, and its training loss curve."""

    @abstractmethod
    def insight(self, path: str) -> InsightView:
        """The library's stored transfer matrix and routing statistics (the `transfer` and
        `routing` jobs compute them), those computed before its experts changed marked stale."""

    @abstractmethod
    def import_adapters(self, path: str, folders: list[str], force: bool = False) -> list[str]:
        """Import checked PEFT adapter folders into a library; returns the names stored."""

    @abstractmethod
    def import_archive(self, path: str, archive: str, force: bool = False) -> list[str]:
        """Import every adapter folder in an uploaded zip (checked before unpacking)."""

    @abstractmethod
    def import_hub(self, path: str, sources: list[str], force: bool = False) -> list[str]:
        """Import adapters from the Hugging Face Hub by id (owner/repo[:subfolder][@revision]),
        all checked before any is stored; returns the names stored."""

    @abstractmethod
    def export_merge(self, path: str, router: str, mix: str | None = None, density: float | None = None) -> str:
        """A zip of the PEFT adapter that a static router's merge is (`lorlib export`); returns its
        path (in the worker's temp folder)."""

    @abstractmethod
    def export(self, path: str, expert: str | None = None) -> str:
        """A zip of the library, or of one expert; returns its path (in the worker's temp folder)."""

    @abstractmethod
    def remove_expert(self, path: str, name: str) -> None:
        """Remove one expert from a library (in one atomic step)."""

    @abstractmethod
    def submit(self, job: JobRequest) -> str:
        """Queue a long job (build, cluster, evaluate); returns its id."""

    @abstractmethod
    def job(self, job_id: str) -> JobStatus: ...

    @abstractmethod
    def cancel(self, job_id: str) -> None: ...

    @abstractmethod
    def end_session(self, owner: str) -> None:
        """An app session has ended: cancel its jobs, except those it detached."""

    def accept_uploads(self, folder: str) -> None:
        """Files sent to this worker land in `folder` (the Ray actor's inbox): a served worker may
        read a job's data file from there."""
        raise NotImplementedError(f"{type(self).__name__} takes no files sent to it")

    @abstractmethod
    def close(self) -> None:
        """Remove what the worker keeps on this machine's disk (at a clean exit)."""
