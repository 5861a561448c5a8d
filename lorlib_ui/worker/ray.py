"""The Ray backend: the model worker as a named Ray actor, and builds spread over a Ray cluster.

Ray is optional (core `ray`: `pip install -r requirements-ray.txt`); nothing else imports this
module unless asked for the Ray backend. Two parts:

- `RayWorker`, the app's model worker on a cluster: a named, detached actor ("lorlib-worker" in
  namespace "lorlib") holds a worker (the app gives it an in-process `LocalWorker`) on whichever
  node has a GPU for it (or CPUs), and this proxy gives the UI the same `Worker` interface. A
  restarted app re-attaches to the running actor, its models still loaded. Its build and cluster
  jobs train their experts as Ray tasks (below). Files cross as bytes (uploads in, downloads
  out), so the app's machine and the actor's need not share a disk; library paths are the actor
  node's (shared storage).
- `RayTrainer`, the trainer of `build_library` and `cluster_and_train` on a cluster: each expert
  trains as a Ray task (one GPU, or `cpus_per_task` CPUs) that loads the base model, trains and
  stores the expert into the library folder itself, under the library's file lock, on storage
  every node shares. Ray re-runs a task whose worker died; experts already stored stay.

How Ray 2.60 behaves here, and what this module does about it: a private Ray (no address) would
listen on every interface, so it is kept on 127.0.0.1 (`_loopback_only`); `ray.init()` without an
address would join any cluster recorded under /tmp/ray, so a private one is asked for with
address="local"; the dashboard is off and the object store small
(start-up takes a few seconds and about 0.5 GB on 2 cores); usage reports are off; token
authentication stays as Ray sets it (on by default; a cluster's token comes from RAY_AUTH_TOKEN or
~/.ray/auth_token). This code never runs `ray stop` (it kills every Ray process of the user): a
private Ray ends with `ray.shutdown()` or with the process.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.worker.api import (
    ClusterView,
    Example,
    ExpertDetail,
    InsightView,
    JobRequest,
    JobStatus,
    LibraryInfo,
    RouteRequest,
    RouteUpdate,
    Worker,
    download_folder,
)

NAMESPACE = "lorlib"
ACTOR = "lorlib-worker"
OBJECT_STORE_BYTES = 256 * 2**20
INSTALL = "the Ray backend needs ray: pip install -r requirements-ray.txt"
PACKAGE = Path(__file__).resolve().parents[1]  # lorlib_ui: travels to the cluster with each job


def _ray():
    try:
        import ray
    except ImportError:
        raise LorlibError(INSTALL) from None
    return ray


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("host:port"), or start a private one on this machine
    (None, "" or "local"), unless this process is connected already. The lorlib_ui package travels
    to the cluster's workers with the job (Ray's `py_modules`), so nodes need not have it."""
    ray = _ray()
    if ray.is_initialized():  # e.g. a task or actor on the cluster: it is part of one already
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options = {
        "namespace": NAMESPACE,
        "runtime_env": {"py_modules": [str(PACKAGE)], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    address = address or "local"
    if address == "local":
        _loopback_only()
        options |= {"include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES}
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LorlibError(f"could not start or join Ray at {address}: {line}") from None


def _loopback_only() -> None:
    """Make a private Ray listen on 127.0.0.1 only. Ray 2.60 binds its node's address, which is
    loopback only while its ENABLE_RAY_CLUSTER setting is off; ray reads that setting from the
    environment (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) when it is first imported, and it turns an
    explicit `_node_ip_address="127.0.0.1"` back into the network address. So: the variable, for
    this process and the Ray processes it starts, and the setting itself if ray is imported already."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def _get(refs):
    """`ray.get`, with a worker's error as one line: a LorlibError stays one; anything else is
    named as a failure of the Ray side."""
    ray = _ray()
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LorlibError):
            raise type(cause)(str(cause)) from None
        raise LorlibError(f"the Ray worker failed: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayActorError:
        raise LorlibError("the lorlib worker actor died; restart the app to start a new one") from None


# ---- the model worker as an actor ------------------------------------------------------------------


class _WorkerActor:
    """Runs on the cluster: the worker `serve` makes (an in-process worker whose jobs train with
    `RayTrainer`), called by name, with files in and out as bytes."""

    CALLS = {"health", "warm_up", "library", "comparisons", "examples", "clusters", "import_adapters"}
    CALLS |= {"submit", "job", "cancel"}
    CALLS |= {"expert_detail", "insight", "remove_expert", "end_session", "import_hub", "explain"}

    def __init__(self, serve: Callable[[], Worker]):
        self.worker = serve()
        self.started = time.time()
        self.inbox = tempfile.mkdtemp(prefix="lorlib-actor-")  # private (0700): shipped files land here
        self.worker.accept_uploads(self.inbox)

    def call(self, method: str, *args):
        if method not in self.CALLS:
            raise LorlibError(f"the worker has no call {method!r}")
        result = getattr(self.worker, method)(*args)
        if method == "health":
            result |= {"actor": {"pid": os.getpid(), "node": socket.gethostname(), "started": self.started}}
        return result

    def route(self, request: RouteRequest) -> Iterator[RouteUpdate]:
        yield from self.worker.route(request)

    def _receive(self, name: str, payload: bytes) -> str:
        folder = tempfile.mkdtemp(dir=self.inbox)
        path = Path(folder) / Path(name).name
        path.write_bytes(payload)
        return str(path)

    def import_archive(self, path: str, name: str, payload: bytes, force: bool) -> list[str]:
        received = self._receive(name, payload)
        try:
            return self.worker.import_archive(path, received, force)
        finally:
            shutil.rmtree(Path(received).parent, ignore_errors=True)

    def export(self, path: str, expert: str | None) -> tuple[str, bytes]:
        archive = Path(self.worker.export(path, expert))
        try:
            return archive.name, archive.read_bytes()
        finally:
            archive.unlink(missing_ok=True)

    def export_merge(self, path: str, router: str, mix: str | None, density: float | None) -> tuple[str, bytes]:
        archive = Path(self.worker.export_merge(path, router, mix, density))
        try:
            return archive.name, archive.read_bytes()
        finally:
            archive.unlink(missing_ok=True)

    def route_batch(self, request: RouteRequest, name: str, payload: bytes) -> tuple[list[dict], str, bytes]:
        received = self._receive(name, payload)
        try:
            updates = list(self.worker.route_batch(request, received))
        finally:
            shutil.rmtree(Path(received).parent, ignore_errors=True)
        result = Path(updates[-1]["file"])
        try:
            return updates, result.name, result.read_bytes()
        finally:
            result.unlink(missing_ok=True)

    def submit(self, job: JobRequest, upload: tuple[str, bytes] | None) -> str:
        if upload is not None:  # a data file from the app's machine
            job = replace(job, options={**job.options, "data": self._receive(*upload)})
        return self.worker.submit(job)


class RayWorker(Worker):
    """The UI's worker on a Ray cluster: a proxy for the named, detached `lorlib-worker` actor,
    which it creates (one GPU when the cluster has one) or re-attaches to. `serve` makes the
    worker the actor holds, on the cluster (it is pickled there, so a class or a partial of one:
    `functools.partial(LocalWorker, device="cuda", trainer_factory=RayTrainer)`); a re-attached
    actor keeps the worker it has."""

    def __init__(self, serve: Callable[[], Worker], address: str | None = None):
        connect(address)
        ray = _ray()
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.actor = (
            ray.remote(_WorkerActor)
            .options(
                name=ACTOR,
                namespace=NAMESPACE,
                lifetime="detached",  # outlives this app; a restarted app finds it by name
                get_if_exists=True,
                max_concurrency=16,  # health, job polls and streams answer while a route runs
                num_cpus=1,
                num_gpus=gpus,
            )
            .remote(serve)
        )
        self._tmp = tempfile.mkdtemp(prefix="lorlib-")  # private (0700): downloads land here

    def _call(self, method: str, *args):
        return _get(self.actor.call.remote(method, *args))

    def health(self) -> dict:
        return {**self._call("health"), "backend": "ray"}

    def warm_up(self, path: str) -> None:
        self.actor.call.remote("warm_up", path)  # the actor warms up on its own thread

    def library(self, path: str) -> LibraryInfo:
        return self._call("library", path)

    def comparisons(self) -> dict[str, bool]:
        return self._call("comparisons")

    def examples(self, path: str, per_task: int = 2) -> list[Example]:
        return self._call("examples", path, per_task)

    def route(self, request: RouteRequest) -> Iterator[RouteUpdate]:
        for ref in self.actor.route.options(num_returns="streaming").remote(request):
            yield _get(ref)

    def clusters(self, path: str, k: int) -> ClusterView:
        return self._call("clusters", path, k)

    def expert_detail(self, path: str, name: str) -> ExpertDetail:
        return self._call("expert_detail", path, name)

    def insight(self, path: str) -> InsightView:
        return self._call("insight", path)

    def import_adapters(self, path: str, folders: list[str], force: bool = False) -> list[str]:
        return self._call("import_adapters", path, folders, force)

    def import_archive(self, path: str, archive: str, force: bool = False) -> list[str]:
        return _get(self.actor.import_archive.remote(path, Path(archive).name, Path(archive).read_bytes(), force))

    def export(self, path: str, expert: str | None = None) -> str:
        name, payload = _get(self.actor.export.remote(path, expert))
        out = download_folder(self._tmp) / name
        out.write_bytes(payload)
        return str(out)

    def import_hub(self, path: str, sources: list[str], force: bool = False) -> list[str]:
        return self._call("import_hub", path, sources, force)

    def explain(self, request: RouteRequest, answer: str | None = None, compare: str | None = None) -> dict:
        return self._call("explain", request, answer, compare)

    def route_batch(self, request: RouteRequest, file: str) -> Iterator[dict]:
        """On the cluster in one call: the progress arrives at the end, with the results."""
        updates, name, payload = _get(self.actor.route_batch.remote(request, Path(file).name, Path(file).read_bytes()))
        out = download_folder(self._tmp) / name
        out.write_bytes(payload)
        yield {**updates[-1], "file": str(out)}

    def export_merge(self, path: str, router: str, mix: str | None = None, density: float | None = None) -> str:
        name, payload = _get(self.actor.export_merge.remote(path, router, mix, density))
        out = download_folder(self._tmp) / name
        out.write_bytes(payload)
        return str(out)

    def remove_expert(self, path: str, name: str) -> None:
        self._call("remove_expert", path, name)

    def end_session(self, owner: str) -> None:
        self._call("end_session", owner)

    def close(self) -> None:
        """Remove this side's downloads; the actor, detached, keeps serving other apps."""
        shutil.rmtree(self._tmp, ignore_errors=True)

    def submit(self, job: JobRequest) -> str:
        data = job.options.get("data")
        upload = None
        if data and Path(data).is_file():  # the actor may run on another machine: ship the file
            upload = (Path(data).name, Path(data).read_bytes())
        return _get(self.actor.submit.remote(job, upload))

    def job(self, job_id: str) -> JobStatus:
        return self._call("job", job_id)

    def cancel(self, job_id: str) -> None:
        self._call("cancel", job_id)


# ---- builds as Ray tasks ---------------------------------------------------------------------------


def _train_task(library_path, job, pairs, data_origin, config, index, total, device, bf16, events) -> str:
    """On a Ray worker: load the base model, train one expert and store it in the library."""
    from lorlib_ui.core.library import Library
    from lorlib_ui.training.reporter import Reporter
    from lorlib_ui.training.trainers import load_trainer_model, train_job

    library = Library.open(library_path)
    model, tokenizer, fast = load_trainer_model(library.base_model, device, bf16)
    config = replace(config, bf16=fast)
    where = f"{socket.gethostname()}:{os.getpid()}"
    train_job(
        library,
        job,
        pairs,
        data_origin,
        model,
        tokenizer,
        config,
        index,
        total,
        Reporter(progress=lambda event: events.put_nowait(replace(event, worker=where))),
    )
    return job.name


class RayTrainer:
    """Trains a build's experts in parallel, one Ray task each (see the module's docstring).

    `address`: the cluster ("host:port"; None starts a private Ray on this machine). Each task
    takes `cpus_per_task` CPUs and `gpus_per_task` GPUs (default: 1 when the cluster has GPUs).
    A task whose worker dies is run again, up to `max_retries` times."""

    def __init__(
        self,
        address: str | None = None,
        device: str | None = None,
        bf16: str = "auto",
        cpus_per_task: float = 1,
        gpus_per_task: float | None = None,
        max_retries: int = 3,
    ):
        from lorlib_ui.training.trainers import bf16_setting

        _ray()  # say how to install Ray before any work
        bf16_setting(bf16, "cpu")
        if not cpus_per_task > 0:
            raise LorlibError(f"CPUs per task must be positive, got {cpus_per_task}")
        self.address, self.device, self.bf16 = address, device, bf16
        self.cpus_per_task, self.gpus_per_task, self.max_retries = cpus_per_task, gpus_per_task, max_retries

    def train(self, library, data, jobs, config, force=False, reporter=None):
        from lorlib_ui.training.reporter import QUIET
        from lorlib_ui.training.trainers import BuildReport, examples, plan
        from lorlib_ui.training.training import Cancelled

        reporter = reporter or QUIET
        todo, skipped = plan(library, jobs, force)
        report = BuildReport(skipped=skipped)
        if not todo:
            return report
        connect(self.address)
        ray = _ray()
        from ray.util.queue import Queue

        gpus = self.gpus_per_task
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(_train_task).options(
            num_cpus=self.cpus_per_task, num_gpus=gpus, max_retries=self.max_retries, retry_exceptions=False
        )
        events = Queue(actor_options={"num_cpus": 0})
        pending = {}
        for index, job in enumerate(todo, 1):
            pairs = examples(data, job.tasks)
            args = (str(library.path), job, pairs, data.origin, config, index, len(todo), self.device, self.bf16)
            pending[task.remote(*args, events)] = job
        finished = set()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                _drain(events, reporter)
                if reporter.cancelled():
                    raise Cancelled("cancelled; finished experts are kept")
                for ref in done:
                    job = pending.pop(ref)
                    _get(ref)  # the task's error, if it failed
                    finished.add(job.name)
            _drain(events, reporter)
        finally:
            for ref in pending:  # on an error, a cancel or Ctrl-C: stop the rest
                ray.cancel(ref, force=True)
            ray.kill(events.actor)
        report.trained = [j.name for j in todo if j.name in finished]
        return report


def _drain(events, reporter) -> None:
    while not events.empty():
        reporter.progress(events.get_nowait())
