"""Building a library: private experts per task, a shared expert, and MBC cluster experts.

The recipe of Ostapenko et al. (2024): train one "private" LoRA per task (Sec. 5), cluster the
tasks by their experts' weights and train one expert per cluster (MBC, Sec. 4.1), and train one
"shared" LoRA on all tasks at once as the multi-task baseline. Some tasks of each family can be
held out of the library, so that routing is judged zero-shot on tasks no expert has seen
(`lorlib_ui.analysis.evaluation`).

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
from pathlib import Path

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import HeldOut, Library, check_name
from lorlib_ui.training.clusters import keep_gram
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.data import MultiTaskData
from lorlib_ui.training.trainers import BuildReport, Job, LocalTrainer, Progress, Trainer

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


def shared_job(library: Library, data: MultiTaskData, steps: int | None, adding: list[str] = ()) -> Job:
    """One expert on every task of the library's private experts, and of those being `adding`."""
    tasks = sorted({t for e in library.experts if e.kind == "private" for t in e.tasks} | set(adding))
    if not tasks:
        raise LorlibError(f"library {library.path} has no private experts to train a shared expert on")
    return Job(SHARED, "shared", tasks, _family(data, tasks), steps)


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
    trainer: Trainer | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    keep_data: bool = False,
) -> BuildReport:
    """Train private experts for the selected tasks, then (with `shared`) the shared expert,
    into the library at `path` (created on `base_model` if there is none), with `trainer` (by
    default a `LocalTrainer`). Everything is checked before anything is written: a refused build
    leaves the library as it was. `keep_data`: copy a data file into the library and record that
    copy as the held-out data (the app does, for an uploaded file that it will delete)."""
    from lorlib_ui.core.library import existing_or_new
    from lorlib_ui.training.data import load_tasks

    start = time.perf_counter()
    config = config or TrainConfig()  # it checked its own settings
    if shared_steps is not None and shared_steps < 1:
        raise LorlibError(f"the shared expert's steps must be positive, got {shared_steps}")
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
    recorded = set(library.held_out.tasks) if library else set()
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
        if local and keep_data and Path(data).is_file():  # an upload: the library keeps its own copy
            source = _keep_data(current, Path(data))
        current.extra["held_out"] = HeldOut(source, tuple(held)).to_manifest()
    if held and log is not None:
        log(f"held out for evaluation: {', '.join(held)}")
    jobs = private_jobs(loaded, train_tasks)
    if shared:  # last, on all private tasks: those already in the library and these
        jobs.append(shared_job(library, loaded, shared_steps or 4 * config.steps, adding=train_tasks))
    report = (trainer or LocalTrainer()).train(library, loaded, jobs, config, force, progress, cancel)
    if cancel is None or not cancel():
        keep_gram(Library.open(path))  # the next cluster view computes only what it must
    report.held_out = held
    report.seconds = time.perf_counter() - start
    return report


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
