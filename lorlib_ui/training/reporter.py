"""Where a long run reports to: one `Reporter` in place of separate progress, cancel and log callbacks.

Every long entry point (build, gates and activations, cluster, LoraHub, evaluate, transfer, routing
statistics, adapt) takes a reporter and tells it what happens as two kinds of event:

- `Progress`: a step of training expert `index` of `total` (a build, gates, an adaptation method;
  LoraHub's search counts its evaluations as steps);
- `Count`: `done` of `total` units finished, the last one `what` (an evaluation's router on a task,
  a transfer column, a routed task).

It asks the reporter whether the run was cancelled between units of work, and hands it lines worth
showing (what was held out, what is being scored). The base class is the quiet default: it shows
nothing and never cancels. The command line draws tqdm bars on stderr (`lorlib_ui.cli.progress`);
the worker writes a job's status (`lorlib_ui.worker.jobs`). Imports nothing heavy, so that the
command line can import it before any model library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Where a training stands: expert `index` of `total` (from 1), at `step` of `steps`."""

    expert: str
    index: int
    total: int
    step: int
    steps: int
    loss: float | None
    worker: str | None = None  # host:pid of the process training it, in a Ray build


@dataclass(frozen=True)
class Count:
    """`done` of `total` units of a run are finished, the last of them `what`."""

    done: int
    total: int
    what: str


class Reporter:
    """The quiet reporter; subclasses show progress, or cancel. `Reporter(progress=f, ...)` calls the
    functions it is given (tests and scripts), any of them left out."""

    def __init__(
        self,
        progress: Callable[[Progress | Count], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self._progress, self._cancelled, self._log = progress, cancelled, log

    def progress(self, event: Progress | Count) -> None:
        if self._progress is not None:
            self._progress(event)

    def cancelled(self) -> bool:
        """Whether the run should stop (it checks between units of work, and keeps what is finished)."""
        return self._cancelled is not None and bool(self._cancelled())

    def log(self, line: str) -> None:
        if self._log is not None:
            self._log(line)

    def steps(self, expert: str, index: int = 1, total: int = 1) -> Callable[[int, int, float | None], None]:
        """A (step, steps, loss) callback of one expert's training, as `Progress` events."""
        return lambda step, steps, loss: self.progress(Progress(expert, index, total, step, steps, loss))


QUIET = Reporter()
