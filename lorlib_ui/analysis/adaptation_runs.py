"""`adapt`: which way of reusing a library learns a new task best from N of its examples?

For each number of shots and each method of `lorlib_ui.training.adaptation_methods`, in one pass:

1. draw the shots from the task's training rows (seeded, as LoraHub draws them);
2. train the method and store what it learns in the library at once: an expert of kind `adapted`
   (scratch, mu, shared), a learned router `poly:NAME` (poly-router, poly-full), or LoraHub's
   merge as an expert of kind `lorahub`. A method already stored with the same settings is not
   trained again, so an interrupted run resumes where it stopped;
3. score every result, zero-shot Arrow and the base model on the task's test rows, as `evaluate`
   scores (exact match, answer log-likelihood, multiple choice), with bootstrap intervals and
   paired differences against Arrow, and keep the record in the manifest under `adaptation`.

Everything is checked before any training (`plan_adaptation`: nothing written, no model loaded),
so a refused run changes nothing; `run_adaptation` trains, scores and stores.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from lorlib_ui.analysis.evaluation import TaskScore, evaluate_task, test_rows
from lorlib_ui.analysis.summaries import differences, summarize
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.learned_routers import LearnedRouter, learned_routers, store_learned_router
from lorlib_ui.core.library import TASK_KINDS, Library, check_name, expert_from_adapter
from lorlib_ui.training.adaptation_methods import (
    LORA_METHODS,
    ROUTER_LEARNING_RATE,
    ROUTER_METHODS,
    mu_adapter,
    train_poly,
)
from lorlib_ui.training.building import expert_name
from lorlib_ui.training.config import ADAPT_METHODS, TrainConfig
from lorlib_ui.training.data import MultiTaskData, load_tasks
from lorlib_ui.training.lorahub import (
    FewShotTask,
    LoraHubOptions,
    check_shots,
    draw_shots,
    lorahub_expert,
    lorahub_name,
)
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import QUIET, Progress, Reporter

ZERO_SHOT = ("arrow", "base")  # what every method is compared with, as `evaluate` runs them
MANIFEST_KEY = "adaptation"


@dataclass
class Plan:
    """One method at one number of shots: what it is stored as, and whether it is there already."""

    method: str
    shots: int
    name: str  # the stored expert or learned router
    done: bool

    @property
    def label(self) -> str:
        return f"{self.method}/{self.shots}"

    @property
    def spec(self) -> str:
        return f"poly:{self.name}" if self.method in ROUTER_METHODS else f"expert:{self.name}"


def adapted_name(method: str, task: str, shots: int, seed: int) -> str:
    if method == "lorahub":
        return lorahub_name(task, shots, seed)
    return check_name(f"adapt-{method}-{expert_name(task)[:60]}-k{shots}-s{seed}")


@dataclass(frozen=True, kw_only=True)
class AdaptOptions(FewShotTask):
    """An adaptation study of one task (the `adapt` command's flags and an adapt job's keys)."""

    task: str = option(help="the task to learn (a held-out task, or one of --data)")
    shots: tuple[int, ...] = option((32,), "training examples, or several for a learning curve: 8,32,128")
    methods: tuple[str, ...] | None = option(None, f"comma-separated, of {','.join(ADAPT_METHODS)} (default: all)")
    steps: int | None = option(None, "training steps (default: the library's experts')")
    budget: int = option(LoraHubOptions.budget, f"LoraHub's evaluations (default {LoraHubOptions.budget})")
    seed: int = option(0, "draws the examples and seeds the training")
    limit: int | None = option(None, "test rows scored (default: all)")
    force: bool = option(False, "train again what the library already holds")
    device: str | None = option(None, "cuda or cpu (default: cuda when present)")

    def __post_init__(self):
        if not self.shots:
            raise LorlibError("give at least one number of shots")
        for n in self.shots:
            check_shots(n)
        object.__setattr__(self, "shots", tuple(sorted(set(self.shots))))
        if self.methods is not None:
            if not self.methods:
                raise LorlibError("the list of methods is empty")
            if unknown := [m for m in self.methods if m not in ADAPT_METHODS]:
                raise LorlibError(f"unknown method {unknown[0]!r}; use {', '.join(ADAPT_METHODS)}")
        for name, value in (("steps", self.steps), ("budget", self.budget), ("limit", self.limit)):
            if value is not None and value < 1:
                raise LorlibError(f"the {name} must be positive, got {value}")


def parse_methods(methods: tuple[str, ...] | None, library: Library) -> tuple[list[str], list[str]]:
    """The methods to run (default: all the library allows; the options checked the names) and
    notes on those left out."""
    chosen, notes = list(dict.fromkeys(methods or ADAPT_METHODS)), []
    if "shared" in chosen and not library.groups()["shared"]:
        if methods is not None:
            raise LorlibError(f"method shared starts from the shared expert, and library {library.path} has none")
        chosen.remove("shared")
        notes.append("skipped shared: the library has no shared expert")
    return chosen, notes


def _settings(method: str, task: str, shots: int, config: TrainConfig, source: str, budget: int) -> dict:
    """What a stored result must have been trained with to count as done."""
    if method == "lorahub":
        return {"task": task, "shots": shots, "seed": config.seed, "budget": budget}
    return {"method": method, "task": task, "shots": shots, "steps": config.steps, "seed": config.seed, "data": source}


def _stored_training(library: Library, method: str, name: str) -> dict | None:
    if method in ROUTER_METHODS:
        record = learned_routers(library).get(name)
        return None if record is None else record.training
    expert = next((e for e in library.experts if e.name == name), None)
    if expert is None:
        return None
    return (
        expert.training if expert.kind == ("lorahub" if method == "lorahub" else "adapted") else {"kind": expert.kind}
    )


def plan_runs(
    library: Library,
    task: str,
    shots: list[int],
    methods: list[str],
    config: TrainConfig,
    source: str,
    budget: int,
    force: bool,
) -> list[Plan]:
    """Every (method, shots) to run, marked done where the library holds it with the same settings;
    one held with other settings is refused unless `force`."""
    plans = []
    for n in shots:
        for method in methods:
            name = adapted_name(method, task, n, config.seed)
            stored = _stored_training(library, method, name)
            wanted = _settings(method, task, n, config, source, budget)
            same = stored is not None and all(stored.get(k) == v for k, v in wanted.items())
            if stored is not None and not same and not force:
                raise LorlibError(
                    f"library {library.path} already has {name!r} from other settings; use --force to replace it"
                )
            plans.append(Plan(method, n, name, done=same and not force))
    return plans


def adapt_config(library: Library, steps: int | None, seed: int) -> TrainConfig:
    """How the library's private experts were trained (rank, targets, batch, learning rate), with
    their steps unless `steps` is given: scratch is a private expert trained on the shots."""
    private = [e for e in library.experts if e.kind in TASK_KINDS and e.training]
    recorded = private[0].training if private else {}
    return TrainConfig.from_options(recorded, steps=steps, seed=seed, bf16=False)


@dataclass
class AdaptationPlan:
    """An adaptation checked whole, before anything is trained or written."""

    library: Library
    options: AdaptOptions
    data: MultiTaskData
    family: str | None
    mixed: list[str]  # the task experts the methods start from or mix
    config: TrainConfig  # how the LoRA methods train
    source: str  # the data, as recorded
    test_rows: int  # scored per result
    runs: list[Plan]  # every (method, shots), marked done where stored
    notes: list[str]  # on methods left out


def plan_adaptation(path: str | Path, options: AdaptOptions) -> AdaptationPlan:
    """Check an adaptation of the library at `path` to `options.task`, with each method at each
    number of shots: the methods the library allows, the task's rows for every number of shots and
    its test rows, and what is stored already. Reads the library and the data; writes nothing,
    loads no model."""
    o = options
    library = Library.open(path)
    mixed = [e.name for e in library.experts if e.kind in TASK_KINDS]
    if not mixed:
        raise LorlibError(f"library {library.path} has no private experts to adapt from")
    chosen, notes = parse_methods(o.methods, library)
    config = adapt_config(library, o.steps, o.seed)
    source = library.data_source(o.data)
    loaded = load_tasks(source, task=o.task)
    family = loaded.family_of(o.task)  # an unknown task is refused here
    for n in o.shots:
        draw_shots(loaded, o.task, n, o.seed)  # and so are too few training rows
    rows = test_rows(loaded, o.task, o.limit)
    local = source != "default" and Path(source).exists()
    source = str(Path(source).resolve()) if local else source
    runs = plan_runs(library, o.task, list(o.shots), chosen, config, source, o.budget, o.force)
    return AdaptationPlan(library, o, loaded, family, mixed, config, source, len(rows), runs, notes)


def run_adaptation(plan: AdaptationPlan, reporter: Reporter = QUIET) -> tuple[dict, list[str]]:
    """Train what the plan lacks (each method's steps to `reporter`, which may cancel), score every
    result and store the record (manifest `adaptation`, by task). Returns the task's record and
    notes on methods left out."""
    start = time.perf_counter()
    task, path = plan.options.task, plan.library.path
    todo = [run for run in plan.runs if not run.done]
    trainer = _Training(plan, reporter)
    for index, run in enumerate(todo, 1):
        reporter.log(f"[{index}/{len(todo)}] {run.method} on {run.shots} shots of {task}")
        trainer.run(run, index, len(todo))
    trainer.release()

    reporter.log(f"scoring {len(plan.runs) + len(ZERO_SHOT)} routers on {plan.test_rows} test rows of {task}")
    scores = _score(Library.open(path), plan.data, task, plan.runs, plan.options.limit, plan.options.device, reporter)
    seconds = time.perf_counter() - start
    record = _record(
        Library.open(path), task, plan.family, plan.runs, scores, plan.config, plan.source, plan.options.limit, seconds
    )
    with plan.library.edit() as current:
        current.extra.setdefault(MANIFEST_KEY, {})[task] = record
    return record, plan.notes


def adapt_library(path: str | Path, options: AdaptOptions, reporter: Reporter = QUIET) -> tuple[dict, list[str]]:
    """`plan_adaptation`, then `run_adaptation`: (the task's record, notes on methods left out)."""
    return run_adaptation(plan_adaptation(path, options), reporter)


class _Nested(Reporter):
    """`outer`, with a nested run's training events shown as expert `index` of `total` of this run's."""

    def __init__(self, outer: Reporter, expert: str, index: int, total: int):
        super().__init__()
        self.outer, self.expert, self.index, self.total = outer, expert, index, total

    def progress(self, event) -> None:
        if isinstance(event, Progress):
            event = replace(event, expert=self.expert, index=self.index, total=self.total)
        self.outer.progress(event)

    def cancelled(self) -> bool:
        return self.outer.cancelled()

    def log(self, line: str) -> None:
        self.outer.log(line)


class _Training:
    """Trains plans one by one, loading each model only when a method first needs it: the plain base
    model for the LoRA methods, a routed model of the library for the routers."""

    def __init__(self, plan: AdaptationPlan, reporter: Reporter):
        self.library, self.data, self.task = plan.library, plan.data, plan.options.task
        self.family, self.mixed, self.config, self.source = plan.family, plan.mixed, plan.config, plan.source
        self.budget, self.force, self.device = plan.options.budget, plan.options.force, plan.options.device
        self.reporter = reporter
        self.plain = None  # (model, tokenizer)
        self.routed = None

    def run(self, plan: Plan, index: int, total: int) -> None:
        rows, picked = draw_shots(self.data, self.task, plan.shots, self.config.seed)
        pairs = [(row["input"], row["output"]) for row in rows]
        events = self.reporter.steps(plan.label, index, total)
        training = {
            **_settings(plan.method, self.task, plan.shots, self.config, self.source, self.budget),
            "shot_rows": picked,
            "rank": self.config.rank,
            "targets": list(self.config.targets),
            "learning_rate": self.config.learning_rate,
            "batch_size": self.config.batch_size,
        }
        # a bar of the steps (LoraHub: the evaluations of its search)
        events(0, self.budget if plan.method == "lorahub" else self.config.steps, None)
        if plan.method in LORA_METHODS:
            self._lora(plan, pairs, training, events)
        elif plan.method in ROUTER_METHODS:
            self._router(plan, pairs, training, events)
        else:
            self._lorahub(plan, index, total)

    def _lora(self, plan, pairs, training, events) -> None:
        from lorlib_ui.training.trainers import load_trainer_model
        from lorlib_ui.training.training import train_expert

        if self.plain is None:
            model, tokenizer, _ = load_trainer_model(self.library.base_model, self.device, "off")
            self.plain = (model, tokenizer)
        model, tokenizer = self.plain
        config, init = self.config, None
        if plan.method == "mu":
            init = mu_adapter(self.routed_model(), self.mixed, config)
            config = replace(config, targets=tuple(init.target_modules))
            training |= {"init": f"µ of {len(self.mixed)} experts", "targets": list(config.targets)}
        elif plan.method == "shared":
            init = self.library.load_adapter("shared")
            rank, alpha = init.rank, float(init.config.get("lora_alpha", init.rank))
            config = replace(config, rank=rank, alpha=alpha, targets=tuple(init.target_modules))
            training |= {"init": "shared", "rank": rank, "targets": list(config.targets)}
        result = train_expert(model, tokenizer, pairs, config, events, self.reporter.cancelled, init=init)
        entry = expert_from_adapter(
            plan.name,
            result.adapter,
            self.library.base_model,
            kind="adapted",
            tasks=[self.task],
            family=self.family,
            training=training,
            metrics=result.metrics,
        )
        self.library.add_experts([(entry, result.adapter)], force=True)

    def routed_model(self):
        """The routed model of the library, loaded once (µ is its uniform merge; the routers learn on it)."""
        from lorlib_ui.core.routed_model import RoutedModel

        if self.routed is None:
            self.routed = RoutedModel.load(Library.open(self.library.path), device=self.device, dtype="float32")
        return self.routed

    def _router(self, plan, pairs, training, events) -> None:
        rm = self.routed_model()
        full = plan.method == "poly-full"
        result = train_poly(rm, self.mixed, pairs, self.config, full, events, self.reporter.cancelled)
        training["router_learning_rate"] = ROUTER_LEARNING_RATE
        record = LearnedRouter(
            name=plan.name,
            method=plan.method,
            experts=list(self.mixed),
            hashes=[rm.library.expert(x).weights_hash for x in self.mixed],
            task=self.task,
            family=self.family,
            training=training,
            metrics=result.fit.metrics(len(pairs)),
        )
        store_learned_router(self.library, record, result.tensors, force=True)

    def _lorahub(self, plan: Plan, index: int, total: int) -> None:
        self.release()  # LoraHub loads its own routed model
        options = LoraHubOptions(
            task=self.task,
            data=self.source,
            shots=plan.shots,
            budget=self.budget,
            seed=self.config.seed,
            force=True,
            device=self.device,
        )
        lorahub_expert(self.library.path, options, _Nested(self.reporter, plan.label, index, total))

    def release(self) -> None:
        self.plain = self.routed = None


def _score(library, data: MultiTaskData, task, plans, limit, device, reporter: Reporter) -> list[TaskScore]:
    """Zero-shot Arrow, the base model and every plan's result on the task's test rows."""
    from lorlib_ui.core.routed_model import RoutedModel
    from lorlib_ui.training.training import Cancelled

    rm = RoutedModel.load(library, device=device)
    scores = []
    for label, spec in [(z, z) for z in ZERO_SHOT] + [(p.label, p.spec) for p in plans]:
        if reporter.cancelled():
            raise Cancelled("adaptation cancelled while scoring; the trained results are kept")
        score = evaluate_task(rm, data, task, spec, limit)
        scores.append(replace(score, router=label))
    return scores


def _record(library, task, family, plans, scores, config, source, limit, seconds) -> dict:
    by_label = {s.router: s for s in scores}
    runs = []
    for plan in plans:
        stored = _stored_training(library, plan.method, plan.name) or {}
        metrics = _stored_metrics(library, plan)
        runs.append(
            {
                "method": plan.method,
                "shots": plan.shots,
                "name": plan.name,
                "router": plan.spec,
                "trained_now": not plan.done,
                "training_seconds": metrics.get("seconds"),
                "first_loss": metrics.get("first_loss"),
                "final_loss": metrics.get("final_loss"),
                "loss_curve": metrics.get("loss_curve"),
                "training": stored,
                "score": asdict(by_label[plan.label]),
            }
        )
    labels = [*ZERO_SHOT, *(p.label for p in plans)]
    pairs = [(p.label, "arrow") for p in plans] + [
        (p.label, f"scratch/{p.shots}") for p in plans if p.method != "scratch" and f"scratch/{p.shots}" in by_label
    ]
    return {
        "task": task,
        "family": family,
        "data": source,
        "seed": config.seed,
        "steps": config.steps,
        "limit": limit,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "zero_shot": [asdict(by_label[z]) for z in ZERO_SHOT],
        "runs": runs,
        "summary": summarize(scores, labels),
        "differences": differences(scores, pairs),
    }


def _stored_metrics(library: Library, plan: Plan) -> dict:
    if plan.method in ROUTER_METHODS:
        record = learned_routers(library).get(plan.name)
        return {} if record is None else record.metrics
    expert = next((e for e in library.experts if e.name == plan.name), None)
    if expert is None:
        return {}
    if plan.method == "lorahub":
        return {"seconds": expert.metrics.get("seconds"), "final_loss": expert.training.get("loss")}
    return expert.metrics
