"""The worker's long jobs (build, cluster, evaluate, transfer, routing statistics, adapt): a queue run one job at a
time on a background thread, with cancel, progress, and a bounded history.

Jobs arrive as plain `JobRequest`s (options as the app sends them, plain dicts), are parsed into
the options dataclasses of the entry points they feed (`OPTIONS`; refused at submission, in one
line, when a key is unknown or a value of the wrong type) and run by the builders of
`lorlib_ui.training` and `lorlib_ui.analysis`, each with a `JobReporter`: its progress goes into
the job's status, and the board's cancel stops it. Status is written by the job's thread and read
by the UI's polls, always under one lock and handed out as copies, so a poll never sees half an
update. Finished jobs beyond the last `KEEP_FINISHED` are forgotten.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import replace

from lorlib_ui.analysis.adaptation_runs import AdaptOptions, adapt_library
from lorlib_ui.analysis.evaluation import EvaluateOptions, evaluate_library
from lorlib_ui.analysis.routing_stats import RoutingStatsOptions, routing_stats_library
from lorlib_ui.analysis.transfer import TransferOptions, transfer_library
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library
from lorlib_ui.training.building import BuildOptions, build_library
from lorlib_ui.training.clusters import ClusterOptions, cluster_and_train
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.options import from_mapping
from lorlib_ui.training.reporter import Count, Progress, Reporter
from lorlib_ui.training.trainers import Trainer
from lorlib_ui.worker.api import JobRequest, JobStatus

KEEP_FINISHED = 20
ACTIVE = ("queued", "running")


class JobContext:
    """What a running job may do: report progress, ask whether it was cancelled, get a trainer."""

    def __init__(self, board: JobBoard, job_id: str, new_trainer: Callable[[], Trainer]):
        self._board, self._id, self.new_trainer = board, job_id, new_trainer

    def update(self, fraction: float, message: str, detail: dict | None = None) -> None:
        """Report progress; `detail` (plain data, replaced whole) is what pollers may draw live."""
        changes = {"detail": detail} if detail is not None else {}
        self._board._set(self._id, fraction=round(fraction, 4), message=message, **changes)

    def cancelled(self) -> bool:
        return self._board._is_cancelled(self._id)


class JobBoard:
    """Queued, running and recent jobs; runs them one after another on its own thread."""

    def __init__(self, new_trainer: Callable[[], Trainer], keep_finished: int = KEEP_FINISHED):
        self._new_trainer, self._keep = new_trainer, keep_finished
        self._lock = threading.Lock()
        self._jobs: dict[str, JobStatus] = {}  # in submission order
        self._finished: list[str] = []  # in finishing order
        self._cancelled: set[str] = set()
        self._owners: dict[str, str] = {}  # job -> the session that may lose it when it ends
        self._queue: queue.Queue[tuple[str, JobRequest]] = queue.Queue()
        threading.Thread(target=self._run, name="lorlib-jobs", daemon=True).start()

    def submit(self, job: JobRequest) -> str:
        if job.kind not in JOBS:
            raise LorlibError(f"unknown job {job.kind!r}; use one of {', '.join(JOBS)}")
        job_options(job)  # a bad key or value is refused now, not when the job's turn comes
        job_id = uuid.uuid4().hex
        with self._lock:
            self._jobs[job_id] = JobStatus(job_id, job.kind, "queued", message="waiting for earlier jobs")
            if job.owner is not None and not job.detached:
                self._owners[job_id] = job.owner
        self._queue.put((job_id, job))
        return job_id

    def status(self, job_id: str) -> JobStatus:
        with self._lock:
            if job_id not in self._jobs:
                raise LorlibError(f"no job {job_id!r}")
            return replace(self._jobs[job_id])

    def all(self) -> list[JobStatus]:
        with self._lock:
            return [replace(status) for status in self._jobs.values()]

    def cancel(self, job_id: str) -> None:
        """Cancel a job: a queued one ends at once (and is skipped when its turn comes), a running
        one at its next check."""
        with self._lock:
            if job_id not in self._jobs:
                raise LorlibError(f"no job {job_id!r}")
            if self._jobs[job_id].state in ACTIVE:
                self._cancelled.add(job_id)
            queued = self._jobs[job_id].state == "queued"
        if queued:
            self._finish(job_id, state="cancelled", message="cancelled before it started")

    def end_session(self, owner: str) -> None:
        """Cancel the active jobs `owner` submitted (not those it detached)."""
        with self._lock:
            owned = [j for j, o in self._owners.items() if o == owner and self._jobs[j].state in ACTIVE]
        for job_id in owned:
            self.cancel(job_id)

    def _set(self, job_id: str, **changes) -> None:
        with self._lock:
            status = self._jobs[job_id]
            for name, value in changes.items():
                setattr(status, name, value)

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def _finish(self, job_id: str, **changes) -> None:
        with self._lock:
            if self._jobs[job_id].state not in ACTIVE:
                return  # already ended (a queued job cancelled)
            for name, value in changes.items():
                setattr(self._jobs[job_id], name, value)
            self._cancelled.discard(job_id)
            self._owners.pop(job_id, None)
            self._finished.append(job_id)
            while len(self._finished) > self._keep:
                del self._jobs[self._finished.pop(0)]

    def _run(self) -> None:
        while True:
            job_id, job = self._queue.get()
            with self._lock:
                if job_id not in self._jobs or self._jobs[job_id].state != "queued":
                    continue  # cancelled while it waited
                self._jobs[job_id].state, self._jobs[job_id].message = "running", "starting"
            context = JobContext(self, job_id, self._new_trainer)
            try:
                result, message = JOBS[job.kind](job, context)
                self._finish(job_id, state="done", fraction=1.0, message=message, result=result)
            except LorlibError as exc:
                state = "cancelled" if self._is_cancelled(job_id) else "failed"
                self._finish(job_id, state=state, message=str(exc))
            except Exception as exc:  # a bug: keep serving, report it
                traceback.print_exc()
                self._finish(job_id, state="failed", message=f"unexpected {type(exc).__name__}: {exc}")


# ---- the jobs: options as the app sends them -> a builder of training or analysis ---------------------

# The options dataclasses each job's dict is read into (a build's dict holds its training settings too).
OPTIONS: dict[str, tuple[type, ...]] = {
    "build": (BuildOptions, TrainConfig),
    "cluster": (ClusterOptions,),
    "evaluate": (EvaluateOptions,),
    "transfer": (TransferOptions,),
    "routing": (RoutingStatsOptions,),
    "adapt": (AdaptOptions,),
}


def job_options(job: JobRequest) -> tuple:
    """A job's plain dict as the options dataclasses of its kind, each checked by itself."""
    classes = OPTIONS.get(job.kind, ())
    return tuple(from_mapping(cls, job.options, f"{job.kind} job", beside=classes) for cls in classes)


class JobReporter(Reporter):
    """A job's reporter: its progress becomes the job's fraction and status line (`counted` names
    what a `Count` counts), and it is cancelled when the board cancels the job."""

    def __init__(self, context: JobContext, counted: str = ""):
        super().__init__()
        self.context, self.counted = context, counted
        self.done: dict[str, float] = {}  # expert -> its share done; several train at once in a Ray build

    def progress(self, event: Progress | Count) -> None:
        if isinstance(event, Count):
            what = f"{event.done}/{event.total}{self.counted}: {event.what}"
            self.context.update(event.done / max(event.total, 1), what)
            return
        self.done[event.expert] = event.step / max(event.steps, 1)
        loss = "" if event.loss is None else f", loss {event.loss:.3f}"
        where = f" (on {event.worker})" if event.worker else ""
        self.context.update(
            sum(self.done.values()) / max(event.total, 1),
            f"expert {event.index}/{event.total} {event.expert}: step {event.step}/{event.steps}{loss}{where}",
        )

    def cancelled(self) -> bool:
        return self.context.cancelled()


class AdaptReporter(JobReporter):
    """An adapt job's: one method after another, each method's loss curve so far published as the
    status's detail (what the Adapt tab draws live); the last tenth is the scoring."""

    def __init__(self, context: JobContext):
        super().__init__(context)
        self.curves: dict[str, list[float]] = {}  # method/shots -> loss at each step so far

    def _detail(self) -> dict:
        return {"curves": {k: list(v) for k, v in self.curves.items()}}

    def progress(self, event: Progress | Count) -> None:
        if isinstance(event, Count):
            return super().progress(event)
        curve = self.curves.setdefault(event.expert, [])
        if event.loss is not None:
            curve.append(round(float(event.loss), 4))
        done = (event.index - 1 + event.step / max(event.steps, 1)) / max(event.total, 1)
        loss = "" if event.loss is None else f", loss {event.loss:.3f}"
        message = f"{event.index}/{event.total} {event.expert}: step {event.step}/{event.steps}{loss}"
        self.context.update(0.9 * done, message, self._detail())

    def log(self, line: str) -> None:
        if line.startswith("scoring"):
            self.context.update(0.9, line, self._detail())


def _history(job: JobRequest, seconds: float) -> None:
    line = f"app: {job.kind} {json.dumps(job.options, sort_keys=True)}"
    Library.open(job.library).record_history(line, seconds)


def _build_job(job: JobRequest, context: JobContext) -> tuple[dict, str]:
    options, config = job_options(job)
    report = build_library(
        job.library,
        options,
        config,
        trainer=context.new_trainer(),
        reporter=JobReporter(context),
        keep_data=options.data != "default",  # an upload, deleted after a while: the library keeps it
    )
    _history(job, report.seconds)
    message = f"trained {len(report.trained)} experts, skipped {len(report.skipped)} already there"
    return {"trained": report.trained, "skipped": report.skipped, "held_out": report.held_out}, message


def _cluster_job(job: JobRequest, context: JobContext) -> tuple[dict, str]:
    (options,) = job_options(job)
    summary, report = cluster_and_train(job.library, options, context.new_trainer(), JobReporter(context))
    _history(job, report.seconds)
    message = f"{len(summary.get('members', {}))} clusters; trained {len(report.trained)} cluster experts"
    return {"clusters": summary, "trained": report.trained}, message


def _evaluate_job(job: JobRequest, context: JobContext) -> tuple[dict, str]:
    (options,) = job_options(job)
    record, notes = evaluate_library(job.library, options, JobReporter(context))
    _history(job, record["seconds"])
    message = f"evaluated {len(record['summary'])} routers on {len(record['tasks'])} tasks"
    return {"evaluation": record, "notes": notes}, message


def _transfer_job(job: JobRequest, context: JobContext) -> tuple[dict, str]:
    (options,) = job_options(job)
    start = time.perf_counter()
    matrix, counts = transfer_library(job.library, options, JobReporter(context, " experts scored"))
    if counts["computed"]:
        _history(job, time.perf_counter() - start)
    message = f"{len(matrix.tasks)} tasks x {len(matrix.columns)} columns; computed {counts['computed']} cells"
    return {"computed": counts["computed"], "reused": counts["reused"]}, message + f", reused {counts['reused']}"


def _routing_job(job: JobRequest, context: JobContext) -> tuple[dict, str]:
    (options,) = job_options(job)
    results = routing_stats_library(job.library, options, JobReporter(context, " tasks routed"))
    summary = results["content"].summary()
    return {"summary": summary}, f"routed {len(results['all'].tasks)} tasks with {results['all'].router}"


def _adapt_job(job: JobRequest, context: JobContext) -> tuple[dict, str]:
    (options,) = job_options(job)
    reporter = AdaptReporter(context)
    record, notes = adapt_library(job.library, options, reporter)
    _history(job, record["seconds"])
    trained = sum(run["trained_now"] for run in record["runs"])
    message = f"{record['task']}: {len(record['runs'])} results ({trained} trained now), scored on the test rows"
    return {"adaptation": record, "notes": notes, "curves": reporter.curves}, message


JOBS = {
    "build": _build_job,
    "cluster": _cluster_job,
    "evaluate": _evaluate_job,
    "transfer": _transfer_job,
    "routing": _routing_job,
    "adapt": _adapt_job,
}
