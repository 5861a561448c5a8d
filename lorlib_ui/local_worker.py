"""The in-process model worker: the default backend behind the UI.

One routed model per library, built on first use and rebuilt when the library's manifest changes
(after a build job, an import). Routing calls take the worker's lock, so the model serves one
request at a time and each gets its own, correct routing record. Long jobs (build, cluster,
evaluate) run one after another on a background thread with their own model copies, so they
slow routing down (they share the CPU) but never block it beyond the lock.
"""

from __future__ import annotations

import hashlib
import json
import queue
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lorlib_ui.errors import LorlibError
from lorlib_ui.library import Library
from lorlib_ui.worker import ClusterView, JobRequest, JobStatus, LibraryInfo, RouteRequest, RouteUpdate, Worker

MAX_NEW_TOKENS = 512


def manifest_key(library: Library) -> str:
    return hashlib.sha256(json.dumps(library.manifest(), sort_keys=True).encode()).hexdigest()


class LocalWorker(Worker):
    def __init__(
        self,
        device: str | None = None,
        dtype: str | None = None,
        base_model: str | None = None,
        trainer: str = "local",
    ):
        """`trainer`: how build and cluster jobs train their experts: "local" (one after another
        on this worker's device) or "ray" (one Ray task each, on the cluster this process is in)."""
        self.device, self.dtype, self.base_model, self.trainer = device, dtype, base_model, trainer
        self._lock = threading.Lock()  # one model computation at a time
        self._routed: dict[str, tuple[str, object]] = {}  # library path -> (manifest key, RoutedModel)
        self._embeddings: dict[tuple[str, str], tuple] = {}
        self._embedding_lock = threading.Lock()  # two views of one new library: one computes, one waits
        self._jobs: dict[str, JobStatus] = {}
        self._cancelled: set[str] = set()
        self._queue: queue.Queue[tuple[str, JobRequest]] = queue.Queue()
        self._warm_ups: list[threading.Thread] = []
        self._tmp = tempfile.mkdtemp(prefix="lorlib-")  # private (0700): uploads unpack and downloads go here
        self._runner = threading.Thread(target=self._run_jobs, name="lorlib-jobs", daemon=True)
        self._runner.start()

    # ---- queries --------------------------------------------------------------------------------
    def health(self) -> dict:
        from lorlib_ui.base_model import best_device

        running = [j.id for j in self._jobs.values() if j.state == "running"]
        queued = [j.id for j in self._jobs.values() if j.state == "queued"]
        return {
            "backend": "local",
            "device": self.device or best_device(),
            "libraries_loaded": sorted(self._routed),
            "busy": self._lock.locked(),
            "warming_up": any(t.is_alive() for t in self._warm_ups),
            "jobs_running": running,
            "jobs_queued": queued,
        }

    def warm_up(self, path: str) -> None:
        """Load the library's routed model, route a few tokens through it (torch's first forward
        pass sets up kernels and buffers, about a second on CPU) and compile UMAP (numba, tens of
        seconds on first use), on a background thread, so the first route and cluster view do not
        wait for them."""
        from lorlib_ui.generation import generate
        from lorlib_ui.routers import make_router

        def work() -> None:
            try:
                with self._lock:
                    rm = self._routed_model(path)
                    generate(rm, "Hello", make_router("arrow", rm.experts), max_new_tokens=2)
                umap_coords(np.random.default_rng(0).normal(size=(8, 4)))
            except Exception:  # a bad library shows its error on the first real request
                traceback.print_exc()

        thread = threading.Thread(target=work, name="lorlib-warm-up", daemon=True)
        self._warm_ups = [t for t in self._warm_ups if t.is_alive()] + [thread]
        thread.start()

    def library(self, path: str) -> LibraryInfo:
        library = Library.open(path)
        assignment = (library.clusters or {}).get("assignment", {})
        experts = []
        for e in library.manifest()["experts"]:
            experts.append({**e, "cluster": assignment.get(e["name"])})
        from lorlib_ui.training import TrainConfig

        short = [m.rsplit(".", 1)[-1] for m in library.base_shapes]
        task = [e for e in library.experts if e.kind in ("private", "imported")] or library.experts
        targets = Counter(tuple(e.target_modules) for e in task).most_common(1)[0][0] if task else TrainConfig.targets
        rank = Counter(e.rank for e in task).most_common(1)[0][0] if task else TrainConfig.rank
        return LibraryInfo(
            path=str(library.path),
            base_model=library.base_model,
            experts=experts,
            modules=[m for m in dict.fromkeys(short) if short.count(m) > 1],  # per layer: not lm_head
            new_targets=list(targets),
            new_rank=int(rank),
            held_out=list((library.extra.get("held_out") or {}).get("tasks", [])),
            clusters=library.clusters or {},
            evaluation=library.extra.get("evaluation"),
            history=list(library.extra.get("history", [])),
        )

    def examples(self, path: str, per_task: int = 2) -> list[tuple[str, str]]:
        from lorlib_ui.data import load_tasks

        library = Library.open(path)
        held = library.extra.get("held_out") or {}
        if not held.get("tasks"):
            return []
        data = load_tasks(held.get("data") or "default")
        out = []
        for task in held["tasks"]:
            out += [(task, row["input"]) for row in data.rows(task, "test")[:per_task]]
        return out

    # ---- routing --------------------------------------------------------------------------------
    def _routed_model(self, path: str):
        """The routed model of a library, rebuilt when its manifest changed (call under the lock)."""
        from lorlib_ui.routed_model import RoutedModel

        library = Library.open(path)
        key = str(Path(path).resolve())
        version = manifest_key(library)
        cached = self._routed.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        self._routed.pop(key, None)  # free the old copy before building the new one
        rm = RoutedModel.load(library, base_model=self.base_model, device=self.device, dtype=self.dtype)
        self._routed[key] = (version, rm)
        return rm

    def route(self, request: RouteRequest) -> Iterator[RouteUpdate]:
        from lorlib_ui.generation import generate
        from lorlib_ui.routers import make_router

        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise LorlibError("the prompt is empty")
        if not 1 <= request.max_new_tokens <= MAX_NEW_TOKENS:
            raise LorlibError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {request.max_new_tokens}")
        library = Library.open(request.library)
        router = make_router(
            request.router, library.names, request.top_k, request.temperature, request.mix, groups=library.groups()
        )
        start = time.perf_counter()
        updates: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                with self._lock:
                    rm = self._routed_model(request.library)
                    if rm.experts != library.names:  # the library changed between the check and now
                        raise LorlibError("the library changed while the request waited; try again")
                    result = generate(
                        rm,
                        request.prompt,
                        router,
                        max_new_tokens=request.max_new_tokens,
                        chat=request.chat,
                        on_token=lambda text: updates.put(("text", text)),
                    )
                updates.put(("done", result))
            except Exception as exc:  # handed to the caller's thread
                updates.put(("error", exc))

        threading.Thread(target=work, name="lorlib-route", daemon=True).start()
        first = None
        while True:
            kind, value = updates.get()
            if kind == "error":
                raise value
            if first is None:
                first = time.perf_counter() - start
            if kind == "text":
                yield RouteUpdate(value, first_token_s=first)
                continue
            yield RouteUpdate(
                value.text,
                done=True,
                record=value.record,
                n_prompt_tokens=len(value.prompt_ids),
                truncated=value.truncated,
                first_token_s=first,
                total_s=time.perf_counter() - start,
            )
            return

    # ---- clusters --------------------------------------------------------------------------------
    def clusters(self, path: str, k: int) -> ClusterView:
        from lorlib_ui.clusters import embed_library, task_experts
        from lorlib_ui.mbc import adjusted_rand_index, mbc_cluster, silhouette_by_k

        library = Library.open(path)
        n = len(task_experts(library))
        if not 1 <= k <= n:
            raise LorlibError(f"k must be between 1 and the number of clustered experts ({n}), got {k}")
        cache_key = (str(Path(path).resolve()), manifest_key(library))
        with self._embedding_lock:
            if cache_key not in self._embeddings:
                experts, embedding = embed_library(library)
                silhouette = silhouette_by_k(embedding, range(2, min(n - 1, 16) + 1))
                self._embeddings[cache_key] = (experts, embedding, umap_coords(embedding.vectors), silhouette)
            experts, embedding, coords, silhouette = self._embeddings[cache_key]
        labels = mbc_cluster(embedding, k).tolist()
        order = sorted(range(n), key=lambda i: (labels[i], i))
        families = [e.family for e in experts]
        known = all(families) and len(set(families)) > 1
        return ClusterView(
            names=[e.name for e in experts],
            kinds=[e.kind for e in experts],
            families=families,
            tasks=[list(e.tasks) for e in experts],
            labels=labels,
            k=k,
            coords=coords,
            similarity=embedding.similarity[np.ix_(order, order)],
            clustered=[experts[i].name for i in order],
            silhouette=silhouette,
            ari=adjusted_rand_index(labels, families) if known else None,
        )

    # ---- imports ---------------------------------------------------------------------------------
    def import_adapters(self, path: str, folders: list[str], force: bool = False) -> list[str]:
        from lorlib_ui.library import import_adapters

        return [e.name for e in import_adapters(path, folders, force=force)]

    def import_archive(self, path: str, archive: str, force: bool = False) -> list[str]:
        from lorlib_ui.archives import adapter_folders, safe_extract

        Library.open(path)  # refuse before unpacking anything
        with tempfile.TemporaryDirectory(dir=self._tmp) as tmp:
            folders = adapter_folders(safe_extract(archive, Path(tmp) / "unpacked"))
            return self.import_adapters(path, [str(f) for f in folders], force=force)

    def export(self, path: str, expert: str | None = None) -> str:
        from lorlib_ui.archives import zip_folder

        library = Library.open(path)
        folder = library.path / library.expert(expert).path if expert else library.path
        name = f"{expert or library.path.name}.zip"
        return str(zip_folder(folder, Path(tempfile.mkdtemp(dir=self._tmp)) / name))

    # ---- jobs ------------------------------------------------------------------------------------
    def submit(self, job: JobRequest) -> str:
        if job.kind not in JOBS:
            raise LorlibError(f"unknown job {job.kind!r}; use one of {', '.join(JOBS)}")
        if job.kind != "build":  # cluster and evaluate need an existing library
            Library.open(job.library)
        job_id = uuid.uuid4().hex[:12]
        self._jobs[job_id] = JobStatus(job_id, job.kind, "queued", message="waiting for earlier jobs")
        self._queue.put((job_id, job))
        return job_id

    def job(self, job_id: str) -> JobStatus:
        if job_id not in self._jobs:
            raise LorlibError(f"no job {job_id!r}")
        return self._jobs[job_id]

    def cancel(self, job_id: str) -> None:
        status = self.job(job_id)
        if status.state in ("queued", "running"):
            self._cancelled.add(job_id)

    def _run_jobs(self) -> None:
        while True:
            job_id, job = self._queue.get()
            status = self._jobs[job_id]
            if job_id in self._cancelled:
                status.state, status.message = "cancelled", "cancelled before it started"
                continue
            status.state, status.message = "running", "starting"
            try:
                cancel = lambda job_id=job_id: job_id in self._cancelled  # noqa: E731
                status.result = JOBS[job.kind](job, status, cancel, self._new_trainer)
                status.state, status.fraction = "done", 1.0
                status.message = status.message if status.message != "starting" else "done"
            except LorlibError as exc:
                cancelled = job_id in self._cancelled
                status.state, status.message = ("cancelled" if cancelled else "failed"), str(exc)
            except Exception as exc:  # a bug: keep serving, report it
                status.state = "failed"
                status.message = f"unexpected {type(exc).__name__}: {exc}"
                traceback.print_exc()

    def _new_trainer(self):
        if self.trainer == "ray":
            from lorlib_ui.ray_backend import RayTrainer

            return RayTrainer()  # joins the cluster this process is part of
        from lorlib_ui.building import LocalTrainer

        return LocalTrainer(self.device)


def umap_coords(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D UMAP (cosine) of expert embeddings; the first two coordinates when there are too few."""
    n = len(vectors)
    if n < 5:  # UMAP's spectral layout needs a few more points than dimensions
        out = np.zeros((n, 2))
        out[:, : min(2, vectors.shape[1])] = vectors[:, :2]
        return out
    import umap

    reducer = umap.UMAP(n_neighbors=min(15, n - 1), n_components=2, metric="cosine", random_state=seed)
    return reducer.fit_transform(vectors).astype(np.float64)


# ---- the long jobs, as the worker runs them -------------------------------------------------------


def _training_progress(status: JobStatus):
    done: dict[str, float] = {}  # expert -> its share done; several train at once in a Ray build

    def progress(event) -> None:
        done[event.expert] = event.step / max(event.steps, 1)
        status.fraction = round(sum(done.values()) / max(event.total, 1), 4)
        loss = "" if event.loss is None else f", loss {event.loss:.3f}"
        where = f" (on {event.worker})" if event.worker else ""
        status.message = (
            f"expert {event.index}/{event.total} {event.expert}: step {event.step}/{event.steps}{loss}{where}"
        )

    return progress


def _build_job(job: JobRequest, status: JobStatus, cancel, new_trainer) -> dict:
    from lorlib_ui.building import build_library
    from lorlib_ui.training import TrainConfig

    o = dict(job.options)
    config = TrainConfig(
        rank=int(o.get("rank", 4)),
        targets=tuple(o.get("targets", TrainConfig.targets)),
        steps=int(o.get("steps", 100)),
        batch_size=int(o.get("batch_size", 8)),
        learning_rate=float(o.get("learning_rate", 1e-3)),
        seed=int(o.get("seed", 0)),
    )
    report = build_library(
        job.library,
        data=o.get("data", "default"),
        tasks=o.get("tasks"),
        families=o.get("families"),
        holdout_per_family=int(o.get("holdout_per_family", 0)),
        config=config,
        shared_steps=o.get("shared_steps"),
        shared=bool(o.get("shared", True)),
        force=bool(o.get("force", False)),
        base_model=o.get("base_model"),
        trainer=new_trainer(),
        progress=_training_progress(status),
        cancel=cancel,
    )
    Library.open(job.library).record_history(f"app: build {json.dumps(o, sort_keys=True)}", report.seconds)
    status.message = f"trained {len(report.trained)} experts, skipped {len(report.skipped)} already there"
    return {"trained": report.trained, "skipped": report.skipped, "held_out": report.held_out}


def _cluster_job(job: JobRequest, status: JobStatus, cancel, new_trainer) -> dict:
    from lorlib_ui.clusters import cluster_and_train

    o = dict(job.options)
    summary, report = cluster_and_train(
        job.library,
        int(o["k"]),
        steps=o.get("steps"),
        train=bool(o.get("train", True)),
        seed=int(o.get("seed", 0)),
        trainer=new_trainer(),
        progress=_training_progress(status),
        cancel=cancel,
    )
    Library.open(job.library).record_history(f"app: cluster {json.dumps(o, sort_keys=True)}", report.seconds)
    status.message = f"{len(summary.get('members', {}))} clusters; trained {len(report.trained)} cluster experts"
    return {"clusters": summary, "trained": report.trained}


def _evaluate_job(job: JobRequest, status: JobStatus, cancel, new_trainer) -> dict:
    from lorlib_ui.evaluation import evaluate_library

    o = dict(job.options)

    def progress(done, total, router, task):
        status.fraction = round(done / total, 4)
        status.message = f"{done}/{total}: {router} on {task}"

    record, notes = evaluate_library(
        job.library, o.get("tasks"), o.get("routers"), limit=o.get("limit"), progress=progress, cancel=cancel
    )
    Library.open(job.library).record_history(f"app: evaluate {json.dumps(o, sort_keys=True)}", record["seconds"])
    status.message = f"evaluated {len(record['summary'])} routers on {len(record['tasks'])} tasks"
    return {"evaluation": record, "notes": notes}


JOBS = {"build": _build_job, "cluster": _cluster_job, "evaluate": _evaluate_job}
