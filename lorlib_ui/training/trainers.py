"""Training a list of expert jobs into a library, one after another in this process.

A job names one expert to train (its kind and the tasks whose training rows it learns). A trainer
takes a build's jobs, skips those already in the library (`plan`), trains the rest and stores each
expert the moment it is trained, atomically, so an interrupted build keeps every finished expert.
`LocalTrainer` trains here, on one copy of the base model; the Ray backend's `RayTrainer`
(`lorlib_ui.worker.ray`) spreads the same jobs over a cluster, each through `train_job`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library, expert_from_adapter
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.data import MultiTaskData
from lorlib_ui.training.reporter import QUIET, Reporter
from lorlib_ui.training.training import train_expert


@dataclass
class Job:
    """One expert to train: its name, kind and the tasks whose training rows it learns."""

    name: str
    kind: str
    tasks: list[str]
    family: str | None = None
    steps: int | None = None  # None: the config's


@dataclass
class BuildReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    seconds: float = 0.0


def examples(data: MultiTaskData, tasks: list[str], split: str = "train") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the tasks' rows in one split."""
    pairs = [(row["input"], row["output"]) for task in tasks for row in data.rows(task, split)]
    if not pairs:
        raise LorlibError(f"{data.origin}: no {split} rows for {', '.join(tasks)}")
    return pairs


def _up_to_date(library: Library, job: Job) -> bool:
    existing = next((e for e in library.experts if e.name == job.name), None)
    return existing is not None and existing.kind == job.kind and sorted(existing.tasks) == sorted(job.tasks)


def plan(library: Library, jobs: list[Job], force: bool = False) -> tuple[list[Job], list[str]]:
    """The jobs to train and the names skipped: experts already in the library (same name, kind
    and tasks) are skipped unless `force`. An expert of the same name but other tasks is replaced
    only with `force`, except cluster and shared experts, which follow their tasks."""
    for job in jobs:  # refuse clashes before any training
        existing = next((e for e in library.experts if e.name == job.name), None)
        clash = existing is not None and not _up_to_date(library, job) and job.kind == "private"
        if clash and not force:
            raise LorlibError(
                f"library {library.path} already has an expert {job.name!r} ({existing.kind}, tasks "
                f"{', '.join(existing.tasks) or '-'}); use --force to replace it"
            )
    todo = [j for j in jobs if force or not _up_to_date(library, j)]
    return todo, [j.name for j in jobs if j not in todo]


def train_job(
    library: Library,
    job: Job,
    pairs: list[tuple[str, str]],
    data_origin: str,
    model,
    tokenizer,
    config: TrainConfig,
    index: int = 1,
    total: int = 1,
    reporter: Reporter = QUIET,
) -> None:
    """Train one job's expert on its (prompt, answer) `pairs` and store it in the library at once
    (job `index` of `total`, for progress)."""
    job_config = replace(config, steps=job.steps or config.steps)
    steps = reporter.steps(job.name, index, total)
    steps(0, job_config.steps, None)
    result = train_expert(model, tokenizer, pairs, job_config, steps, reporter.cancelled)
    training = {**asdict(job_config), "targets": list(job_config.targets), "data": data_origin}
    entry = expert_from_adapter(
        job.name,
        result.adapter,
        library.base_model,
        kind=job.kind,
        tasks=job.tasks,
        family=job.family,
        training=training,
        metrics=result.metrics,
    )
    library.add_experts([(entry, result.adapter)], force=True)


def train_jobs(
    library: Library,
    data: MultiTaskData,
    jobs: list[Job],
    model,
    tokenizer,
    config: TrainConfig,
    force: bool = False,
    reporter: Reporter = QUIET,
) -> BuildReport:
    """Train the jobs `plan` keeps, one after another on `model`, storing each expert at once."""
    todo, skipped = plan(library, jobs, force)
    report = BuildReport(skipped=skipped)
    for index, job in enumerate(todo, 1):
        pairs = examples(data, job.tasks)
        train_job(library, job, pairs, data.origin, model, tokenizer, config, index, len(todo), reporter)
        report.trained.append(job.name)
    return report


class Trainer(Protocol):
    """Trains a build's jobs into a library, skipping those already there (see `plan`), telling
    `reporter` each step and stopping when it says the build is cancelled."""

    def train(
        self,
        library: Library,
        data: MultiTaskData,
        jobs: list[Job],
        config: TrainConfig,
        force: bool = False,
        reporter: Reporter = QUIET,
    ) -> BuildReport: ...


class LocalTrainer:
    """Trains a build's experts one after another in this process, on one copy of the base model
    (`device`: cuda when present; `bf16`: auto, on or off). `lorlib_ui.worker.ray.RayTrainer`
    spreads them over a Ray cluster instead."""

    def __init__(self, device: str | None = None, bf16: str = "auto"):
        bf16_setting(bf16, "cpu")  # refuse a bad setting before any work
        self.device, self.bf16 = device, bf16

    def train(
        self,
        library: Library,
        data: MultiTaskData,
        jobs: list[Job],
        config: TrainConfig,
        force: bool = False,
        reporter: Reporter = QUIET,
    ) -> BuildReport:
        todo, skipped = plan(library, jobs, force)
        if not todo:  # nothing to train: no model to load
            return BuildReport(skipped=skipped)
        model, tokenizer, bf16 = load_trainer_model(library.base_model, self.device, self.bf16)
        config = replace(config, bf16=bf16)
        return train_jobs(library, data, jobs, model, tokenizer, config, force, reporter)


def bf16_setting(setting: str, device) -> bool:
    """ "on", "off", or "auto": bf16 autocast where the hardware computes in bf16."""
    from lorlib_ui.training.training import fast_bf16

    if setting not in ("auto", "on", "off"):
        raise LorlibError(f"bf16 must be auto, on or off, not {setting!r}")
    return setting == "on" or (setting == "auto" and fast_bf16(device))


def load_trainer_model(base_model: str, device: str | None, bf16: str):
    """The base model in float32 for training, its tokenizer, and whether to autocast to bf16."""
    from lorlib_ui.core.base_model import load_base_model

    model, tokenizer = load_base_model(base_model, device=device, dtype="float32")
    return model, tokenizer, bf16_setting(bf16, model.device)
