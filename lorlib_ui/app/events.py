"""What the explorer's event handlers share: errors shown in the page, and long jobs polled.

Handlers are plain module-level functions that take the worker (and their tab's components) first,
so tests call them without a server; `shows_errors` is the one place that turns an exception into
the visible `gr.Error` Gradio shows: a `LorlibError` as its one line, anything else (a bug) as
"unexpected ..." with its trace printed on the server.
"""

from __future__ import annotations

import functools
import inspect
import time
import typing
from collections.abc import Iterator

import gradio as gr

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.worker.api import JobRequest, JobStatus, Worker

POLL_S = 0.5  # how often a running job's progress is read
ACTIVE = ("queued", "running")  # the states of a job that Cancel can still stop
NOTHING_TO_CANCEL = "no job to cancel"


def as_gr_error(exc: Exception) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    message = str(exc) if isinstance(exc, LorlibError) else f"unexpected {type(exc).__name__}: {exc}"
    return gr.Error(message, print_exception=not isinstance(exc, LorlibError))


def shows_errors(handler):
    """Decorate an event handler (a function or a generator) so that its errors show in the page."""
    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def streaming(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except Exception as exc:
                raise as_gr_error(exc) from None

        return streaming

    @functools.wraps(handler)
    def answering(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Exception as exc:
            raise as_gr_error(exc) from None

    return answering


def bind(handler, *bound):
    """`functools.partial(handler, *bound)` that Gradio can still read: Gradio passes the request
    (`request: gr.Request`, whose session owns the jobs the event starts) to a parameter by its
    annotation, which a partial hides, and streams a handler only if it is a generator function."""
    signature = inspect.signature(handler)
    hints = typing.get_type_hints(handler)
    if inspect.isgeneratorfunction(handler):

        def event(*args, **kwargs):
            yield from handler(*bound, *args, **kwargs)

    else:

        def event(*args, **kwargs):
            return handler(*bound, *args, **kwargs)

    event.__name__, event.__doc__ = handler.__name__, handler.__doc__
    event.__signature__ = signature.replace(parameters=list(signature.parameters.values())[len(bound) :])
    event.__annotations__ = {name: hint for name, hint in hints.items() if name in event.__signature__.parameters}
    return event


def session(request: gr.Request | None) -> str | None:
    """The session an event came from: the owner of the jobs it starts."""
    return getattr(request, "session_hash", None)


def follow_job(
    worker: Worker, request: JobRequest, progress: gr.Progress
) -> Iterator[tuple[str, str, JobStatus | None]]:
    """Submit a job and follow it to its end: yields (job id, status line, status) and drives
    Gradio's progress bar; a failed job raises its one-line message."""
    job_id = worker.submit(request)
    yield job_id, "queued", None
    while (state := worker.job(job_id)).state in ("queued", "running"):
        progress(state.fraction, desc=state.message)
        yield job_id, f"**{state.state}**: {state.message}", state
        time.sleep(POLL_S)
    if state.state == "failed":
        raise LorlibError(state.message)
    yield job_id, f"**{state.state}**: {state.message}", state


def run_job(worker: Worker, request: JobRequest, progress: gr.Progress) -> Iterator[tuple[str, str]]:
    """`follow_job`, yielding (job id, status line) only."""
    for job_id, line, _ in follow_job(worker, request, progress):
        yield job_id, line


def cancel_job(worker: Worker, job_id: str | None) -> str:
    """Every tab's Cancel: cancel the tab's last job if it is still queued or running, and say at
    once what became of it. A job that already ended (or that the worker has forgotten, long ended)
    leaves nothing to cancel, and the line says so: "cancelling..." there would stay for good, as
    no poll of a running job comes to replace it."""
    if not job_id:
        return NOTHING_TO_CANCEL
    try:
        state = worker.job(job_id).state
    except LorlibError:
        return NOTHING_TO_CANCEL
    if state not in ACTIVE:
        return f"{NOTHING_TO_CANCEL}: the last one ended ({state})"
    worker.cancel(job_id)
    state = worker.job(job_id).state
    if state in ACTIVE:
        return "cancelling..."  # a running job stops at its next check; the poll that follows it says when
    return "cancelled" if state == "cancelled" else f"{NOTHING_TO_CANCEL}: the last one ended ({state})"
