"""The reporter: one object in place of progress, cancel and log callbacks, quiet by default."""

from lorlib_ui.training.reporter import QUIET, Count, Progress, Reporter


def test_the_quiet_reporter_and_one_made_of_functions():
    assert not QUIET.cancelled()
    QUIET.progress(Count(1, 2, "x"))  # shown nowhere
    QUIET.log("nothing")
    events, lines = [], []
    reporter = Reporter(progress=events.append, cancelled=lambda: len(events) > 1, log=lines.append)
    step = reporter.steps("e", 2, 3)
    step(0, 5, None)
    assert not reporter.cancelled()
    step(1, 5, 0.5)
    reporter.log("a line")
    assert events == [Progress("e", 2, 3, 0, 5, None), Progress("e", 2, 3, 1, 5, 0.5)]
    assert reporter.cancelled() and lines == ["a line"]
