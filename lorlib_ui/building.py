"""Building a library: private experts per task, a shared expert, and MBC cluster experts.

The recipe of Ostapenko et al. (2024): train one "private" LoRA per task (Sec. 5), cluster the
tasks by their experts' weights and train one expert per cluster (MBC, Sec. 4.1), and train one
"shared" LoRA on all tasks at once as the multi-task baseline. Some tasks of each family can be
held out of the library, so that routing is judged zero-shot on tasks no expert has seen
(`lorlib_ui.evaluation`).

Every expert is written to the library the moment it is trained (one atomic step each), so an
interrupted build loses at most the expert in training, and running the same build again resumes:
experts that are already there, trained on the same tasks, are skipped unless forced.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorlib_ui.data import MultiTaskData
from lorlib_ui.errors import LorlibError
from lorlib_ui.library import Library, check_name, expert_from_adapter
from lorlib_ui.training import TrainConfig, train_expert

SHARED = "shared"


@dataclass
class Job:
    """One expert to train: its name, kind and the tasks whose training rows it learns."""

    name: str
    kind: str
    tasks: list[str]
    family: str | None = None
    steps: int | None = None  # None: the config's


@dataclass
class Progress:
    """Where a build stands: expert `index` of `total` (from 1), at `step` of `steps`."""

    expert: str
    index: int
    total: int
    step: int
    steps: int
    loss: float | None
    worker: str | None = None  # host:pid of the process training it, in a Ray build


@dataclass
class BuildReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    seconds: float = 0.0


def expert_name(task: str) -> str:
    """A valid expert (folder) name for a task: other characters become '_', and a short hash of
    the task keeps two tasks that differ only in those characters apart."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", task).replace("..", "._")
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)
    if name != task or not name:
        name = f"{name[:90]}-{hashlib.sha1(task.encode()).hexdigest()[:8]}".lstrip("-")
    return check_name(name[:100])


def hold_out(data: MultiTaskData, per_family: int, seed: int = 0) -> list[str]:
    """`per_family` tasks of each family, drawn with a fixed seed, kept out of the library."""
    if per_family < 0:
        raise LorlibError(f"--holdout-per-family must be 0 or more, got {per_family}")
    if per_family == 0:
        return []
    held = []
    for family in data.families:
        tasks = data.tasks_in(family)
        if per_family >= len(tasks):
            raise LorlibError(
                f"family {family!r} has {len(tasks)} task(s): holding out {per_family} would leave none to train"
            )
        held += random.Random(f"{seed}:{family}").sample(tasks, per_family)
    return sorted(held)


def examples(data: MultiTaskData, tasks: list[str], split: str = "train") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the tasks' rows in one split."""
    pairs = [(row["input"], row["output"]) for task in tasks for row in data.rows(task, split)]
    if not pairs:
        raise LorlibError(f"{data.origin}: no {split} rows for {', '.join(tasks)}")
    return pairs


def _family(data: MultiTaskData, tasks: list[str]) -> str | None:
    families = {data.family_of(t) for t in tasks}
    return families.pop() if len(families) == 1 else None


def private_jobs(data: MultiTaskData, tasks: list[str]) -> list[Job]:
    return [Job(expert_name(t), "private", [t], data.family_of(t)) for t in tasks]


def shared_job(library: Library, data: MultiTaskData, steps: int | None, adding: list[str] = ()) -> Job:
    """One expert on every task of the library's private experts, and of those being `adding`."""
    tasks = sorted({t for e in library.experts if e.kind == "private" for t in e.tasks} | set(adding))
    if not tasks:
        raise LorlibError(f"library {library.path} has no private experts to train a shared expert on")
    return Job(SHARED, "shared", tasks, _family(data, tasks), steps)


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
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> None:
    """Train one job's expert on its (prompt, answer) `pairs` and store it in the library at once
    (job `index` of `total`, for progress)."""
    job_config = TrainConfig(**{**asdict(config), "steps": job.steps or config.steps})

    def step(done: int, steps: int, loss: float) -> None:
        if progress is not None:
            progress(Progress(job.name, index, total, done, steps, loss))

    if progress is not None:
        progress(Progress(job.name, index, total, 0, job_config.steps, None))
    result = train_expert(model, tokenizer, pairs, job_config, step, cancel)
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
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> BuildReport:
    """Train the jobs `plan` keeps, one after another on `model`, storing each expert at once."""
    todo, skipped = plan(library, jobs, force)
    report = BuildReport(skipped=skipped)
    for index, job in enumerate(todo, 1):
        pairs = examples(data, job.tasks)
        train_job(library, job, pairs, data.origin, model, tokenizer, config, index, len(todo), progress, cancel)
        report.trained.append(job.name)
    return report


class LocalTrainer:
    """Trains a build's experts one after another in this process, on one copy of the base model
    (`device`: cuda when present; `bf16`: auto, on or off). `lorlib_ui.ray_backend.RayTrainer`
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
        progress: Callable[[Progress], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> BuildReport:
        todo, skipped = plan(library, jobs, force)
        if not todo:  # nothing to train: no model to load
            return BuildReport(skipped=skipped)
        model, tokenizer, config.bf16 = load_trainer_model(library.base_model, self.device, self.bf16)
        return train_jobs(library, data, jobs, model, tokenizer, config, force, progress, cancel)


def bf16_setting(setting: str, device) -> bool:
    """ "on", "off", or "auto": bf16 autocast where the hardware computes in bf16."""
    from lorlib_ui.training import fast_bf16

    if setting not in ("auto", "on", "off"):
        raise LorlibError(f"bf16 must be auto, on or off, not {setting!r}")
    return setting == "on" or (setting == "auto" and fast_bf16(device))


def load_trainer_model(base_model: str, device: str | None, bf16: str):
    """The base model in float32 for training, its tokenizer, and whether to autocast to bf16."""
    from lorlib_ui.base_model import load_base_model

    model, tokenizer = load_base_model(base_model, device=device, dtype="float32")
    return model, tokenizer, bf16_setting(bf16, model.device)


def build_library(
    path: str | Path,
    data: str = "default",
    tasks: list[str] | None = None,
    families: list[str] | None = None,
    holdout_per_family: int = 0,
    config: TrainConfig | None = None,
    shared_steps: int | None = None,
    shared: bool = True,
    force: bool = False,
    base_model: str | None = None,
    trainer: LocalTrainer | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> BuildReport:
    """Train private experts for the selected tasks, then (with `shared`) the shared expert,
    into the library at `path` (created on `base_model` if there is none), with `trainer` (by
    default a `LocalTrainer`). Everything is checked before anything is written: a refused build
    leaves the library as it was."""
    from lorlib_ui.data import load_tasks
    from lorlib_ui.library import existing_or_new

    start = time.perf_counter()
    config = config or TrainConfig()
    for name, value in {"steps": config.steps, "rank": config.rank, "batch size": config.batch_size}.items():
        if value < 1:
            raise LorlibError(f"{name} must be positive, got {value}")
    if not config.learning_rate > 0 or (shared_steps is not None and shared_steps < 1):
        raise LorlibError("the learning rate and the shared expert's steps must be positive")
    if not config.targets:
        raise LorlibError("no target modules given")
    if tasks == [] or families == []:
        raise LorlibError("the list of tasks or families is empty")
    loaded = load_tasks(data)
    selected = loaded.select(tasks=tasks, families=families)
    path = Path(path)
    library, base = existing_or_new(path, base_model)
    shapes = library.base_shapes if library else base.linear_shapes
    for target in config.targets:
        if not any(m == target or m.endswith("." + target) for m in shapes):
            raise LorlibError(f"the base model has no linear layer named {target!r} to adapt")
    recorded = set((library.extra.get("held_out") or {}).get("tasks", [])) if library else set()
    held = sorted(recorded | set(hold_out(selected, holdout_per_family, config.seed)))
    if tasks and (asked := [t for t in tasks if t in recorded]):
        raise LorlibError(f"task {asked[0]!r} is held out of library {path} for evaluation")
    train_tasks = [t for t in selected.tasks if t not in held]
    if not train_tasks:
        raise LorlibError("no tasks left to train after holding out")
    sizes = loaded.split_sizes()
    if empty := [t for t in train_tasks if not sizes[t]["train"]]:
        raise LorlibError(f"{loaded.origin}: task {empty[0]!r} has no training rows")
    library = library or Library.create(path, base)
    local = data != "default" and Path(data).exists()
    source = str(Path(data).resolve()) if local else data  # else "default" or a hub id
    with library.edit() as current:
        current.extra["held_out"] = {"data": source, "tasks": held}
    if held and log is not None:
        log(f"held out for evaluation: {', '.join(held)}")
    jobs = private_jobs(loaded, train_tasks)
    if shared:  # last, on all private tasks: those already in the library and these
        jobs.append(shared_job(library, loaded, shared_steps or 4 * config.steps, adding=train_tasks))
    report = (trainer or LocalTrainer()).train(library, loaded, jobs, config, force, progress, cancel)
    report.held_out = held
    report.seconds = time.perf_counter() - start
    return report
