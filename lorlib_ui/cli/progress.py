"""What the command line's long commands share: their reporter (tqdm bars and log lines on stderr),
the trainer the flags ask for, and the library's `history`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import Count, Progress, Reporter


class Bars(Reporter):
    """The command line's reporter: tqdm bars on stderr, drawn from a run's first event (so a refusal
    prints its one line only), and its log lines. Training (`Progress`) draws a bar of the experts
    trained so far and one per expert in training (several at once in a Ray build; an expert whose
    worker died starts again from step 0); counted units (`Count`) one bar, of `unit`s. The command
    line cancels with Ctrl-C, a KeyboardInterrupt: used as a context, the bars close, and with
    `resumable` it says how to resume."""

    def __init__(self, desc: str = "", unit: str = "", resumable: bool = False):
        super().__init__()
        self.desc, self.unit, self.resumable = desc, unit, resumable
        self.bars, self.overall, self.counted = {}, None, None

    def progress(self, event: Progress | Count) -> None:
        from tqdm import tqdm

        if isinstance(event, Count):
            if self.counted is None:
                self.counted = tqdm(desc=self.desc, unit=self.unit, total=event.total, file=sys.stderr)
            self.counted.set_postfix_str(event.what, refresh=False)
            self.counted.update(event.done - self.counted.n)
            return
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

    def log(self, line: str) -> None:
        print(line, file=sys.stderr)

    def close(self) -> None:
        for bar in [*self.bars.values(), self.overall, self.counted]:
            if bar is not None:
                bar.close()
        self.bars, self.overall, self.counted = {}, None, None

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close()
        if kind is KeyboardInterrupt and self.resumable:
            print("interrupted: finished experts are kept; run the same command again to resume", file=sys.stderr)


@dataclass(frozen=True, kw_only=True)
class TrainerOptions:
    """Where the command line trains experts (build, cluster): in this process, one after another,
    or one Ray task per expert. The worker chooses its own trainer, so these are flags only."""

    device: str | None = option(None, "cuda or cpu (default: cuda when present)")
    bf16: str = option("auto", "bf16 autocast (auto: if fast)", choices=("auto", "on", "off"))
    backend: str = option(
        help="local: one expert after another in this process; ray: one Ray task per expert, in parallel "
        "(default: $LORLIB_BACKEND or local)",
        choices=("local", "ray"),
        factory=lambda: os.environ.get("LORLIB_BACKEND", "local"),
    )
    address: str | None = option(
        help="Ray cluster address host:port (default: $LORLIB_RAY_ADDRESS, else a private Ray on this machine)",
        factory=lambda: os.environ.get("LORLIB_RAY_ADDRESS"),
    )
    cpus_per_task: float = option(1.0, "Ray: CPUs per expert's task (default 1)")

    def trainer(self):
        """The trainer these flags ask for: this process, or one Ray task per expert."""
        from lorlib_ui.training.trainers import LocalTrainer

        if self.backend == "ray":
            from lorlib_ui.worker.ray import RayTrainer

            return RayTrainer(self.address, self.device, self.bf16, cpus_per_task=self.cpus_per_task)
        if self.address:
            raise LorlibError("--address names a Ray cluster: use it with --backend ray")
        return LocalTrainer(self.device, self.bf16)


def record_history(path: str, argv: list[str], seconds: float) -> None:
    import shlex

    from lorlib_ui.core.library import Library

    Library.open(path).record_history("python -m lorlib_ui " + shlex.join(argv), seconds)
