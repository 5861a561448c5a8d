"""The worker's job board: one job at a time, status read under a lock as copies, cancel, and a
bounded history."""

import threading
import time

import pytest

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.worker import jobs
from lorlib_ui.worker.api import JobRequest
from lorlib_ui.worker.jobs import JobBoard


def _until(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.005)


@pytest.fixture
def quick_jobs(monkeypatch):
    """A job kind that reports progress and waits for a gate (so tests decide when it ends)."""
    gate = threading.Event()

    def wait(job, context):
        context.update(0.5, f"half of {job.options['n']}")
        while not gate.is_set():
            if context.cancelled():
                raise LorlibError("cancelled")
            time.sleep(0.005)
        return {"n": job.options["n"]}, "finished"

    monkeypatch.setitem(jobs.JOBS, "wait", wait)
    return gate


def test_status_is_a_copy_and_progress_is_reported(quick_jobs):
    board = JobBoard(new_trainer=lambda: None)
    job_id = board.submit(JobRequest("wait", "lib", {"n": 1}))
    _until(lambda: board.status(job_id).fraction == 0.5, "progress")
    status = board.status(job_id)
    assert status.state == "running" and status.message == "half of 1"
    status.state = "done"  # the caller's copy, not the board's
    assert board.status(job_id).state == "running"
    quick_jobs.set()
    _until(lambda: board.status(job_id).state == "done", "the job to end")
    assert board.status(job_id).result == {"n": 1} and board.status(job_id).message == "finished"


def test_cancel_a_running_and_a_queued_job(quick_jobs):
    board = JobBoard(new_trainer=lambda: None)
    running = board.submit(JobRequest("wait", "lib", {"n": 1}))
    queued = board.submit(JobRequest("wait", "lib", {"n": 2}))
    _until(lambda: board.status(running).state == "running", "the first job to start")
    board.cancel(queued)
    # a queued job is cancelled at once, not when its turn comes: its caller stops waiting now
    assert board.status(queued).state == "cancelled"
    assert board.status(queued).message == "cancelled before it started"
    board.cancel(running)
    _until(lambda: board.status(running).state == "cancelled", "the running job to stop")
    assert board.status(queued).state == "cancelled"  # its turn came and went: it never ran
    with pytest.raises(LorlibError, match="no job 'nope'"):
        board.cancel("nope")
    with pytest.raises(LorlibError, match="unknown job 'train'"):
        board.submit(JobRequest("train", "lib"))


def test_a_session_that_ends_takes_its_jobs_but_not_detached_ones(quick_jobs):
    board = JobBoard(new_trainer=lambda: None)
    mine = board.submit(JobRequest("wait", "lib", {"n": 1}, owner="alice"))
    kept = board.submit(JobRequest("wait", "lib", {"n": 2}, owner="alice", detached=True))
    theirs = board.submit(JobRequest("wait", "lib", {"n": 3}, owner="bob"))
    _until(lambda: board.status(mine).state == "running", "the first job to start")
    board.end_session("alice")
    _until(lambda: board.status(mine).state == "cancelled", "alice's running job to stop")
    _until(lambda: board.status(kept).state == "running", "the detached job to run")
    board.end_session("nobody")
    quick_jobs.set()
    _until(lambda: board.status(theirs).state == "done", "bob's job to finish")
    assert board.status(kept).state == "done"


def test_only_the_last_finished_jobs_are_kept(quick_jobs):
    quick_jobs.set()
    board = JobBoard(new_trainer=lambda: None, keep_finished=3)
    ids = [board.submit(JobRequest("wait", "lib", {"n": i})) for i in range(6)]
    _until(lambda: all(s.state == "done" for s in board.all()) and len(board.all()) == 3, "six jobs to end")
    assert [s.id for s in board.all()] == ids[-3:]
    with pytest.raises(LorlibError, match=f"no job '{ids[0]}'"):
        board.status(ids[0])


def test_a_failing_job_says_why_and_the_next_one_runs(monkeypatch):
    def broken(job, context):
        raise ValueError("a bug")

    monkeypatch.setitem(jobs.JOBS, "broken", broken)
    monkeypatch.setitem(jobs.JOBS, "fine", lambda job, context: ({}, "ok"))
    board = JobBoard(new_trainer=lambda: None)
    bad, good = board.submit(JobRequest("broken", "lib")), board.submit(JobRequest("fine", "lib"))
    _until(lambda: board.status(good).state == "done", "the second job to run")
    assert board.status(bad).state == "failed" and board.status(bad).message == "unexpected ValueError: a bug"


# ---- the jobs' options: the app's plain dicts, read into the entry points' dataclasses ----------------

APP_REQUESTS = {  # what the app's tabs send (lorlib_ui/app), and what the worker reads from it
    "build": (
        {"steps": 5, "rank": 2, "targets": ["q_proj", "v_proj"], "shared": True, "data": "up.jsonl", "tasks": ["t1"]},
        "BuildOptions(data='up.jsonl', tasks=('t1',), families=None, holdout_per_family=0, holdout_seed=None, "
        "shared_steps=None, shared=True, force=False, base_model=None)",
    ),
    "cluster": ({"k": 2, "steps": 2}, "ClusterOptions(k=2, steps=2, train=True, seed=0, keep_quantile=0.5"),
    "evaluate": ({"routers": ["base", "arrow"], "tasks": "held-out", "limit": 5}, "routers=('base', 'arrow')"),
    "transfer": ({"tasks": ["copy0", "copy1"], "limit": 2}, "tasks=('copy0', 'copy1'), data=None, limit=2"),
    "routing": ({"router": "arrow@private", "tasks": "seen", "limit": 2}, "router='arrow@private'"),
    "adapt": (
        {"task": "t", "shots": [32, 8], "methods": ["scratch", "lorahub"], "limit": 5, "steps": 2, "data": "f"},
        "AdaptOptions(task='t', data='f', shots=(8, 32), methods=('scratch', 'lorahub'), steps=2, budget=40",
    ),
}


@pytest.mark.parametrize("kind", sorted(APP_REQUESTS))
def test_the_apps_requests_are_read_into_the_entry_points_options(kind):
    options, expected = APP_REQUESTS[kind]
    parsed = jobs.job_options(JobRequest(kind, "lib", options))
    assert expected in repr(parsed[0])
    if kind == "build":
        assert parsed[1].steps == 5 and parsed[1].targets == ("q_proj", "v_proj") and parsed[1].rank == 2


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("build", {"steps": 2, "stpes": 3}, "build job: unknown option 'stpes'; the options are base_model, "),
        ("build", {"steps": "2"}, "build job: option 'steps' must be an integer, got '2'"),
        ("build", {"tasks": "copy0"}, "build job: option 'tasks' must be a list of strings, got 'copy0'"),
        ("build", {"steps": 0}, "steps must be a positive integer, got 0"),
        ("cluster", {}, "cluster job: option 'k' is required"),
        ("evaluate", {"limit": 1.5}, "evaluate job: option 'limit' must be an integer, got 1.5"),
        ("evaluate", {"limit": 0}, "the limit must be positive, got 0"),
        ("transfer", {"exact_match": 1}, "transfer job: option 'exact_match' must be true or false, got 1"),
        ("routing", {"temperature": "hot"}, "routing job: option 'temperature' must be a number, got 'hot'"),
        ("adapt", {"task": "t", "shots": [8, True]}, "adapt job: option 'shots' must be a list of integers"),
        ("adapt", {"task": "t", "methods": ["distil"]}, "unknown method 'distil'"),
    ],
)
def test_a_bad_request_is_refused_at_submission_in_one_line(kind, options, message):
    board = JobBoard(new_trainer=lambda: None)
    with pytest.raises(LorlibError) as info:
        board.submit(JobRequest(kind, "lib", options))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert board.all() == []  # nothing queued


class _Context:
    def __init__(self):
        self.updates, self.cancel = [], False

    def update(self, fraction, message, detail=None):
        self.updates.append((fraction, message, detail))

    def cancelled(self):
        return self.cancel


def test_a_jobs_reporter_writes_its_status_and_cancels_with_the_board():
    from lorlib_ui.training.reporter import Count, Progress

    context = _Context()
    reporter = jobs.JobReporter(context, " experts scored")
    reporter.progress(Count(1, 4, "base"))
    reporter.progress(Progress("copy0", 1, 2, 5, 10, 0.25, worker="host:1"))
    reporter.progress(Progress("copy1", 2, 2, 10, 10, None))  # two at once (Ray): both count
    assert context.updates == [
        (0.25, "1/4 experts scored: base", None),
        (0.25, "expert 1/2 copy0: step 5/10, loss 0.250 (on host:1)", None),
        (0.75, "expert 2/2 copy1: step 10/10", None),
    ]
    assert not reporter.cancelled()
    context.cancel = True
    assert reporter.cancelled()
    adapt = jobs.AdaptReporter(context)
    adapt.progress(Progress("scratch/8", 2, 2, 1, 4, 1.5))
    adapt.log("scoring 4 routers")
    assert context.updates[-2] == (0.5625, "2/2 scratch/8: step 1/4, loss 1.500", {"curves": {"scratch/8": [1.5]}})
    assert context.updates[-1] == (0.9, "scoring 4 routers", {"curves": {"scratch/8": [1.5]}})
