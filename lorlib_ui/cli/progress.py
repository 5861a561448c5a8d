"""What the command line's long commands share: progress bars on stderr, the trainer the flags
ask for, list and number options, and the library's `history`."""

from __future__ import annotations

import sys

from lorlib_ui.core.errors import LorlibError


def positive(**values: float | None) -> None:
    for flag, value in values.items():
        if value is not None and not value > 0:
            raise LorlibError(f"--{flag.replace('_', '-')} must be positive, got {value}")


def csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


class ExpertBars:
    """On stderr, a tqdm bar of the experts trained so far and one per expert in training, fed by
    the builder's progress events (several at once in a Ray build; an expert whose worker died
    starts again from step 0)."""

    def __init__(self):
        self.bars = {}
        self.overall = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if self.overall is None:
            self.overall = tqdm(total=event.total, desc="experts trained", unit="expert", file=sys.stderr)
        bar = self.bars.get(event.expert)
        if bar is None or event.step < bar.n:
            if bar is not None:
                bar.close()
            where = f" on {event.worker}" if event.worker else ""
            desc = f"[{event.index}/{event.total}] {event.expert}{where}"
            bar = self.bars[event.expert] = tqdm(
                total=event.steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True
            )
        bar.update(event.step - bar.n)
        if event.loss is not None:
            bar.set_postfix(loss=f"{event.loss:.3f}", refresh=False)
        if event.step >= event.steps:
            bar.close()
            del self.bars[event.expert]
            self.overall.update()

    def close(self) -> None:
        for bar in [*self.bars.values(), self.overall]:
            if bar is not None:
                bar.close()
        self.bars, self.overall = {}, None


def task_bar(desc: str, unit: str):
    """A progress callback drawing a tqdm bar on stderr from its first event, and the bars to close."""
    from tqdm import tqdm

    bars = []

    def progress(done: int, total: int, what: str) -> None:
        if not bars:
            bars.append(tqdm(desc=desc, unit=unit, total=total, file=sys.stderr))
        bars[0].set_postfix_str(what, refresh=False)
        bars[0].update(done - bars[0].n)

    return progress, bars


def trainer(args):
    """The trainer the flags ask for: this process, or one Ray task per expert."""
    from lorlib_ui.training.trainers import LocalTrainer

    if args.backend == "ray":
        from lorlib_ui.worker.ray import RayTrainer

        return RayTrainer(args.address, args.device, args.bf16, cpus_per_task=args.cpus_per_task)
    if args.address:
        raise LorlibError("--address names a Ray cluster: use it with --backend ray")
    return LocalTrainer(args.device, args.bf16)


def with_expert_bars(run):
    """Run `run(progress)` with a tqdm bar per expert; on Ctrl-C say how to resume."""
    bars = ExpertBars()
    try:
        return run(bars)
    except KeyboardInterrupt:
        bars.close()
        print("interrupted: finished experts are kept; run the same command again to resume", file=sys.stderr)
        raise
    finally:
        bars.close()


def record_history(path: str, argv: list[str], seconds: float) -> None:
    import shlex

    from lorlib_ui.core.library import Library

    Library.open(path).record_history("python -m lorlib_ui " + shlex.join(argv), seconds)


def log(line: str) -> None:
    print(line, file=sys.stderr)
