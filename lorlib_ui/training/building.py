"""Building a library: private experts per task, a shared expert, and MBC cluster experts.

The recipe of Ostapenko et al. (2024): train one "private" LoRA per task (Sec. 5), cluster the
tasks by their experts' weights and train one expert per cluster (MBC, Sec. 4.1), and train one
"shared" LoRA on all tasks at once as the multi-task baseline. Some tasks of each family can be
held out of the library, so that routing is judged zero-shot on tasks no expert has seen
(`lorlib_ui.analysis.evaluation`).

A build is planned, then run: `plan_build` reads the data and the library and checks everything
(tasks, targets, held-out tasks, experts of the same name) without writing anything or loading a
model; `run_build` creates the library if needed, records what is held out and trains. Every expert
is written to the library the moment it is trained (one atomic step each), so an interrupted build
loses at most the expert in training, and running the same build again resumes: experts that are
already there, trained on the same tasks, are skipped unless forced.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lorlib_ui.core.base_model import BaseModelInfo
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import HeldOut, Library, check_name
from lorlib_ui.training.clusters import keep_gram
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.data import MultiTaskData
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import QUIET, Reporter
from lorlib_ui.training.trainers import BuildReport, Job, LocalTrainer, Trainer
from lorlib_ui.training.trainers import plan as plan_jobs

SHARED = "shared"


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


def _family(data: MultiTaskData, tasks: list[str]) -> str | None:
    families = {data.family_of(t) for t in tasks}
    return families.pop() if len(families) == 1 else None


def private_jobs(data: MultiTaskData, tasks: list[str]) -> list[Job]:
    return [Job(expert_name(t), "private", [t], data.family_of(t)) for t in tasks]


def shared_job(library: Library | None, data: MultiTaskData, steps: int | None, adding: list[str] = ()) -> Job:
    """One expert on every task of the library's private experts (none: a library still to be
    made), and of those being `adding`."""
    known = library.experts if library is not None else []
    tasks = sorted({t for e in known if e.kind == "private" for t in e.tasks} | set(adding))
    if not tasks:
        raise LorlibError(f"library {library.path} has no private experts to train a shared expert on")
    return Job(SHARED, "shared", tasks, _family(data, tasks), steps)


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """What a build trains (the `build` command's flags and a build job's keys; how each expert is
    trained is `TrainConfig`, beside it)."""

    data: str = option("default", "default (embedded BIG-bench), a file, a folder or a hub id")
    tasks: tuple[str, ...] | None = option(None, "comma-separated tasks (default: all)", group="pick")
    families: tuple[str, ...] | None = option(None, "comma-separated families", group="pick")
    holdout_per_family: int = option(0, "tasks per family kept out for evaluation")
    holdout_seed: int | None = option(
        None, "draws the held-out tasks (default: --seed); fixed, it keeps them across training seeds"
    )
    shared_steps: int | None = option(None, "steps of the shared expert (default 4 x steps)")
    shared: bool = option(True, "do not train the shared (all tasks) expert")  # its flag: --no-shared
    force: bool = option(False, "retrain experts that are already in the library")
    base_model: str | None = option(None, "base model of a new library (default: embedded SmolLM2)")

    def __post_init__(self):
        if self.shared_steps is not None and self.shared_steps < 1:
            raise LorlibError(f"the shared expert's steps must be positive, got {self.shared_steps}")
        if self.tasks == () or self.families == ():
            raise LorlibError("the list of tasks or families is empty")
        if self.tasks is not None and self.families is not None:
            raise LorlibError("choose tasks or families, not both")
        if self.holdout_per_family < 0:
            raise LorlibError(f"--holdout-per-family must be 0 or more, got {self.holdout_per_family}")
        if self.holdout_seed is not None and (
            isinstance(self.holdout_seed, bool) or not isinstance(self.holdout_seed, int)
        ):
            raise LorlibError(f"--holdout-seed must be an integer, got {self.holdout_seed!r}")


@dataclass
class BuildPlan:
    """A build checked whole, before anything is written or any model loads."""

    path: Path
    library: Library | None  # None: the run creates it on `base`
    base: BaseModelInfo | None
    data: MultiTaskData
    source: str  # the held-out record's data: "default", a hub id or a resolved path
    keep: Path | None  # a data file the run copies into the library and records instead
    held_out: list[str]
    jobs: list[Job]  # private experts, then the shared one
    config: TrainConfig
    force: bool


def plan_build(
    path: str | Path, options: BuildOptions, config: TrainConfig | None = None, keep_data: bool = False
) -> BuildPlan:
    """Check a build of private experts for the selected tasks, then (with `options.shared`) the
    shared expert, into the library at `path` (to be created on `options.base_model` if there is
    none), each trained as `config` says. Reads the data and the library; writes nothing, loads no
    model. `keep_data`: the run copies a data file into the library and records that copy as the
    held-out data (the app does, for an uploaded file that it will delete)."""
    from lorlib_ui.core.library import existing_or_new
    from lorlib_ui.training.data import load_tasks

    config = config or TrainConfig()  # it checked its own settings
    loaded = load_tasks(options.data)
    selected = loaded.select(tasks=options.tasks, families=options.families)
    path = Path(path)
    library, base = existing_or_new(path, options.base_model)
    shapes = library.base_shapes if library else base.linear_shapes
    for target in config.targets:
        if not any(m == target or m.endswith("." + target) for m in shapes):
            raise LorlibError(f"the base model has no linear layer named {target!r} to adapt")
    recorded = set(library.held_out.tasks) if library else set()
    draw = config.seed if options.holdout_seed is None else options.holdout_seed
    held = sorted(recorded | set(hold_out(selected, options.holdout_per_family, draw)))
    if options.tasks and (asked := [t for t in options.tasks if t in recorded]):
        raise LorlibError(f"task {asked[0]!r} is held out of library {path} for evaluation")
    train_tasks = [t for t in selected.tasks if t not in held]
    if not train_tasks:
        raise LorlibError("no tasks left to train after holding out")
    sizes = loaded.split_sizes()
    if empty := [t for t in train_tasks if not sizes[t]["train"]]:
        raise LorlibError(f"{loaded.origin}: task {empty[0]!r} has no training rows")
    jobs = private_jobs(loaded, train_tasks)
    if options.shared:  # last, on all private tasks: those already in the library and these
        jobs.append(shared_job(library, loaded, options.shared_steps or 4 * config.steps, adding=train_tasks))
    if library is not None:
        plan_jobs(library, jobs, options.force)  # an expert of the same name on other tasks: refused now
    local = options.data != "default" and Path(options.data).exists()
    source = str(Path(options.data).resolve()) if local else options.data  # else "default" or a hub id
    keep = Path(options.data) if local and keep_data and Path(options.data).is_file() else None
    return BuildPlan(path, library, base, loaded, source, keep, held, jobs, config, options.force)


def run_build(plan: BuildPlan, trainer: Trainer | None = None, reporter: Reporter = QUIET) -> BuildReport:
    """Create the library if needed, record its held-out tasks and train the plan's experts with
    `trainer` (by default a `LocalTrainer`), each stored as soon as it is trained."""
    start = time.perf_counter()
    library = plan.library or Library.create(plan.path, plan.base)
    with library.edit() as current:
        source = _keep_data(current, plan.keep) if plan.keep else plan.source  # an upload: the library's copy
        current.extra["held_out"] = HeldOut(source, tuple(plan.held_out)).to_manifest()
    if plan.held_out:
        reporter.log(f"held out for evaluation: {', '.join(plan.held_out)}")
    report = (trainer or LocalTrainer()).train(library, plan.data, plan.jobs, plan.config, plan.force, reporter)
    if not reporter.cancelled():
        keep_gram(Library.open(plan.path))  # the next cluster view computes only what it must
    report.held_out = plan.held_out
    report.seconds = time.perf_counter() - start
    return report


def build_library(
    path: str | Path,
    options: BuildOptions | None = None,
    config: TrainConfig | None = None,
    trainer: Trainer | None = None,
    reporter: Reporter = QUIET,
    keep_data: bool = False,
) -> BuildReport:
    """`plan_build`, then `run_build`: a refused build leaves the library as it was."""
    return run_build(plan_build(path, options or BuildOptions(), config, keep_data), trainer, reporter)


def _keep_data(library: Library, data: Path) -> str:
    """Copy a data file into the library (atomically, as `data.<its suffixes>`); the name to record."""
    import shutil

    from lorlib_ui.core.atomic import fsync_dir, temporary_name

    suffixes = "".join(s for s in data.suffixes[-2:] if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", s))
    target = library.path / f"data{suffixes}"
    tmp = temporary_name(target)
    try:
        shutil.copyfile(data, tmp)
        tmp.replace(target)
        fsync_dir(library.path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LorlibError(f"library {library.path}: could not keep the data file ({exc.strerror or exc})") from None
    return target.name
