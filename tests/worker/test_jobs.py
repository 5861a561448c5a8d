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
