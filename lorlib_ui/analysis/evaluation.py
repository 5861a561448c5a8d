"""Zero-shot evaluation on held-out tasks: does routing over the library beat the alternatives?

Ostapenko et al. (2024, Sec. 6) compare, on tasks no expert was trained on, the base model, the
uniform merge µ of the private experts, Arrow over the private experts, Arrow over the MBC
cluster experts, the shared (multi-task) expert, and an oracle. Here the oracle is the cluster
expert trained on most of the held-out task's own family. Three measures per task, each the mean
over the task's test rows:

- exact match: the greedy answer (its first line, whitespace collapsed, case and a final '.'
  ignored) equals the reference;
- log-likelihood: the mean log-probability per token of the reference answer;
- multiple-choice accuracy, where a task lists options: the option with the highest total
  log-probability is the reference (BIG-bench's scoring of multiple-choice tasks).

Tables average over tasks, so that each task weighs the same.

Routers that choose per task are resolved on each task from a `TaskContext`: the oracle from the
library, LoraHub (a few-shot baseline, run by name) from a few of the task's training rows. The
oracle is skipped, with a note, on a task of a family no cluster expert trained on.

`evaluate_library` is `plan_evaluation` (the library, tasks, routers and data checked, nothing
written and no model loaded) then `run_evaluation` (score, store the record in the manifest).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from lorlib_ui.analysis.summaries import differences, summarize
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import generate_batch, score_continuations
from lorlib_ui.core.library import TASK_KINDS, Library
from lorlib_ui.core.prompting import answer_ids, encode_prompt
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import (
    DEFAULT_TOP_K,
    MIXES,
    ROUTERS,
    Router,
    TaskContext,
    TaskRouter,
    make_router,
    presets,
)
from lorlib_ui.core.routers.base import check_mix
from lorlib_ui.training.config import TASK_SETS
from lorlib_ui.training.data import MultiTaskData
from lorlib_ui.training.lorahub import LoraHubOptions, check_shots, draw_shots, few_shot_context
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import QUIET, Count, Reporter
from lorlib_ui.training.training import Cancelled

EXTRA_TOKENS = 8  # generated beyond the longest training answer of the task
DEFAULT_SHOTS = LoraHubOptions.shots  # LoraHub's own default
SPLITS = ("test", "validation")  # what evaluations score; ablations choose on validation rows


@dataclass(frozen=True, kw_only=True)
class DatasetOptions:
    """Which tasks' test rows a command reads (evaluate, transfer, routing-stats)."""

    tasks: str | tuple[str, ...] = option(
        "held-out",
        "held-out, seen (tasks the library trained on), all (both), unused (tasks of the data that no "
        "expert trained on and that are not held out), or comma-separated",
        sets=TASK_SETS,
    )
    data: str | None = option(None, "test data (default: what the library was built from)")
    limit: int | None = option(None, "at most this many test rows per task (default: all)")

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise LorlibError(f"the limit must be positive, got {self.limit}")


def _routers_help() -> str:
    by_name = [c.name for c in ROUTERS.values() if issubclass(c, TaskRouter) and c.name not in presets().values()]
    return (
        f"comma-separated: {', '.join(f'{name} ({spec})' for name, spec in presets().items())} "
        "(default: all of these that the library allows), or any router spec such as arrow@cluster "
        f"or {' or '.join(by_name)} (per task, few-shot: see --shots)"
    )


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions(DatasetOptions):
    """An evaluation of routers (the `evaluate` command's flags and an evaluate job's keys)."""

    routers: tuple[str, ...] | None = option(None, _routers_help())
    shots: int = option(
        DEFAULT_SHOTS, f"training rows per task that few-shot routers (lorahub) learn from (default {DEFAULT_SHOTS})"
    )
    split: str = option("test", "validation: for ablations (default test)", choices=SPLITS)
    top_k: int | None = option(None, f"experts per token for arrow (default {DEFAULT_TOP_K})")
    density: float | None = option(None, "ties: share of each expert's entries kept (default 0.2)")
    temperature: float = option(1.0, "arrow: softmax temperature over the chosen experts (> 0, default 1)")
    mix: str = option(
        "outputs",
        "combine the chosen experts' outputs (PEFT) or their parameters (paper's code) (default outputs)",
        choices=MIXES,
    )
    device: str | None = option(None, "cuda or cpu (default: cuda when present)")
    dtype: str | None = option(None, "float32, bfloat16, float16 or auto")

    def __post_init__(self):
        super().__post_init__()
        if self.routers == ():
            raise LorlibError("the list of routers is empty")
        check_shots(self.shots)
        if self.split not in SPLITS:
            raise LorlibError(f"unknown split {self.split!r}; use {' or '.join(SPLITS)}")
        # checked here, not by each router: a default router refusing it would be skipped with a note
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LorlibError(f"temperature must be positive and finite, got {self.temperature}")
        check_mix(self.mix)


@dataclass
class TaskScore:
    router: str
    task: str
    family: str | None
    expert: str  # the router as it ran (for the oracle: which expert)
    examples: int
    exact_match: float
    loglik: float
    mc_accuracy: float | None  # None when the task has no options
    mc_examples: int
    rows: dict[str, list[float]] = field(default_factory=dict)  # per test row: exact_match, loglik, mc


def normalize(text: str) -> str:
    lines = text.strip().splitlines()
    first = " ".join(lines[0].split()) if lines else ""
    return first.lower().rstrip(".").strip()


def resolve_routers(
    library: Library,
    names: list[str],
    explicit: bool,
    top_k: int | None = None,
    density: float | None = None,
    temperature: float = 1.0,
    mix: str = "outputs",
) -> tuple[list[str], list[str]]:
    """The routers that can run on this library, and notes on those skipped. A router asked for
    by name that cannot run is an error; one of the defaults is skipped with a note. Names are the
    registry's presets (arrow, shared, oracle, ...) or any router spec (arrow@cluster, expert:NAME)."""
    kept, notes = [], []
    for name in names:
        try:
            router = _router(library, name, top_k, density, temperature, mix)
            if (lacking := library.derived.lacks_for(router)) is not None:  # keys not computed yet (gates, ...)
                raise LorlibError(lacking)
        except LorlibError as exc:
            if explicit:
                raise LorlibError(f"router {name!r}: {exc}") from None
            notes.append(f"skipped {name}: {exc}")
        else:
            kept.append(name)
    return kept, notes


@dataclass
class RowScores:
    """One router's measures on each test row of one task."""

    loglik: list[float]  # mean log-probability per token of the reference answer
    exact_match: list[float] | None  # 1.0 or 0.0 per row; None when not asked for
    mc: list[float]  # 1.0 or 0.0 per multiple-choice row (rows with options only)


def test_rows(data: MultiTaskData, task: str, limit: int | None = None, split: str = "test") -> list[dict]:
    if split not in SPLITS:
        raise LorlibError(f"unknown split {split!r}; use {' or '.join(SPLITS)}")
    rows = data.rows(task, split)[:limit]
    if not rows:
        raise LorlibError(f"{data.origin}: task {task!r} has no {split} rows")
    return rows


def answer_budget(tokenizer, data: MultiTaskData, task: str) -> int:
    """New tokens to generate for a task: its longest training answer, plus a margin."""
    answer = answer_ids(tokenizer, bool(tokenizer.chat_template))
    rows = data.rows(task, "train") or data.rows(task, "test")
    return max(len(answer(r["output"])) for r in rows) + EXTRA_TOKENS


def score_rows(
    rm: RoutedModel,
    router: Router,
    rows_by_task: dict[str, list[dict]],
    budgets: dict[str, int] | None = None,
    choices: bool = True,
) -> dict[str, RowScores]:
    """Per-row measures of `router` on each task's rows, every task's rows scored in one batched
    pass: the reference answer's log-likelihood, multiple choice where a row lists options (and
    `choices` asks for it), and exact match of the greedy answer when `budgets` gives each task's
    answer length."""
    tok = rm.tokenizer
    chat = bool(tok.chat_template)
    answer = answer_ids(tok, chat)
    pairs, where = [], {}  # (prompt, continuation) pairs; task -> [(reference index, options)]
    for task, rows in rows_by_task.items():
        where[task] = []
        for row in rows:
            prompt = encode_prompt(tok, row["input"], chat)
            where[task].append((len(pairs), row))
            pairs.append((prompt, answer(row["output"])))
            pairs += [(prompt, answer(option)) for option in (row["options"] or ()) if choices]
    logprobs = score_continuations(rm, router, pairs)
    out = {}
    for task, placed in where.items():
        loglik, mc = [], []
        for at, row in placed:
            loglik.append(sum(logprobs[at]) / max(len(logprobs[at]), 1))
            if row["options"] and choices:
                totals = [sum(logprobs[at + 1 + j]) for j in range(len(row["options"]))]
                best = max(range(len(totals)), key=totals.__getitem__)
                mc.append(float(row["options"][best] == row["output"]))
        matches = None
        if budgets is not None:
            prompts = [encode_prompt(tok, row["input"], chat) for _, row in placed]
            answers = generate_batch(rm, prompts, router, max_new_tokens=budgets[task])
            matches = [float(normalize(text) == normalize(row["output"])) for text, (_, row) in zip(answers, placed)]
        out[task] = RowScores(loglik, matches, mc)
    return out


def evaluate_task(
    rm: RoutedModel,
    data: MultiTaskData,
    task: str,
    name: str,
    limit: int | None = None,
    split: str = "test",
    top_k: int | None = None,
    shots: int = DEFAULT_SHOTS,
    density: float | None = None,
    temperature: float = 1.0,
    mix: str = "outputs",
) -> TaskScore | None:
    """Score one router on one task's test rows; None for the oracle when no expert fits. A
    few-shot router (LoraHub) learns from `shots` of the task's training rows first."""
    library = rm.library
    family = data.family_of(task)
    router = _router(library, name, top_k, density, temperature, mix)
    if isinstance(router, TaskRouter):
        if router.few_shot:
            context = few_shot_context(rm, data, task, shots)
        else:
            context = TaskContext(library, task, family)
        router = router.for_task(context)
        if router is None:
            return None
    rows = test_rows(data, task, limit, split)
    scores = score_rows(rm, router, {task: rows}, {task: answer_budget(rm.tokenizer, data, task)})[task]
    scores.loglik = [round(x, 5) for x in scores.loglik]  # as stored: means and intervals agree with the rows
    return TaskScore(
        router=name,
        task=task,
        family=family,
        expert=router.describe(),
        examples=len(rows),
        exact_match=_mean(scores.exact_match),
        loglik=_mean(scores.loglik),
        mc_accuracy=_mean(scores.mc) if scores.mc else None,
        mc_examples=len(scores.mc),
        rows={"exact_match": scores.exact_match, "loglik": scores.loglik, "mc": scores.mc},
    )


def _router(
    library: Library,
    name: str,
    top_k: int | None,
    density: float | None = None,
    temperature: float = 1.0,
    mix: str = "outputs",
) -> Router:
    """The router an evaluation runs by `name` (a preset or a spec), per-task routers unresolved."""
    spec = presets().get(name, name)
    groups = library.groups()
    return make_router(spec, library.names, top_k, temperature, mix, groups=groups, per_task=True, density=density)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def evaluate(
    rm: RoutedModel,
    data: MultiTaskData,
    tasks: list[str],
    routers: list[str],
    limit: int | None = None,
    reporter: Reporter = QUIET,
    split: str = "test",
    top_k: int | None = None,
    shots: int = DEFAULT_SHOTS,
    density: float | None = None,
    temperature: float = 1.0,
    mix: str = "outputs",
) -> list[TaskScore]:
    """Every router on every task; a `Count` to `reporter` after each pair."""
    scores, total, done = [], len(routers) * len(tasks), 0
    for name in routers:
        for task in tasks:
            if reporter.cancelled():
                raise Cancelled("evaluation cancelled")
            score = evaluate_task(rm, data, task, name, limit, split, top_k, shots, density, temperature, mix)
            if score is not None:
                scores.append(score)
            done += 1
            reporter.progress(Count(done, total, f"{name} on {task}"))
    return scores


def result_record(scores: list[TaskScore], routers: list[str], data: str, limit: int | None, seconds: float) -> dict:
    """What `evaluate` stores in the library's manifest."""
    return {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": data,
        "limit": limit,
        "seconds": round(seconds, 1),
        "summary": summarize(scores, routers),
        "differences": differences(scores),
        "scores": [asdict(s) for s in scores],
    }


def held_out_tasks(library: Library) -> list[str]:
    return list(library.held_out.tasks)


def seen_tasks(library: Library) -> list[str]:
    """The tasks the library's task experts were trained on, by family, then name."""
    family = {t: e.family or "" for e in library.experts if e.kind in TASK_KINDS for t in e.tasks}
    return sorted(family, key=lambda t: (family[t], t))


def unused_tasks(library: Library, data: MultiTaskData) -> list[str]:
    """The tasks of `data` that no expert of the library (of any kind) trained on and that it does
    not hold out, by family, then name: zero-shot transfer to tasks without an expert of their own."""
    used = {t for e in library.experts for t in e.tasks} | set(library.held_out.tasks)
    family = dict(zip(data.frame["task"], data.frame["family"].astype(str)))
    return sorted((t for t in family if t not in used), key=lambda t: (family[t], t))


def select_tasks(library: Library, which: str | list[str] | None, data: MultiTaskData | None = None) -> list[str]:
    """Tasks by name, or a set of them: "held-out" (the default), "seen" (trained on by a task
    expert), "all" (both) or "unused" (tasks of `data`, the data the command reads, that no expert
    trained on and that are not held out)."""
    if which is None or isinstance(which, str):
        which = which or "held-out"
        if which not in TASK_SETS:
            raise LorlibError(f"unknown set of tasks {which!r}; use {', '.join(TASK_SETS)} or name the tasks")
        if which == "unused":
            if data is None:
                raise LorlibError("the unused tasks are those of the data: load it first")
            tasks = unused_tasks(library, data)
        else:
            tasks = held_out_tasks(library) if which != "seen" else []
            tasks += seen_tasks(library) if which != "held-out" else []
        if not tasks:
            if which == "unused":
                what = f"has an expert or a held-out task for every task of {data.origin}"
            else:
                what = "holds no tasks out" if which == "held-out" else "has no task experts"
            raise LorlibError(f"library {library.path} {what}; name the tasks")
        return tasks
    if not which:
        raise LorlibError("the list of tasks is empty")
    return list(dict.fromkeys(which))


@dataclass
class EvaluationPlan:
    """An evaluation checked whole, before the model loads."""

    library: Library
    options: EvaluateOptions
    source: str  # where the test rows come from
    data: MultiTaskData
    tasks: list[str]
    routers: list[str]  # those that run
    notes: list[str]  # on routers skipped, and on tasks a per-task router (the oracle) skips
    few_shot: bool  # a router learns from each task's training rows (LoraHub)


def plan_evaluation(path: str, options: EvaluateOptions) -> EvaluationPlan:
    """Check an evaluation of routers (default: every preset of the router registry that the library
    allows) on tasks (a list, or a set of `select_tasks`; default: the library's held-out tasks):
    the routers, the tasks and their rows, and the training rows few-shot routers (LoraHub) learn
    from. Reads the library and the data; writes nothing, loads no model."""
    from lorlib_ui.training.data import load_tasks

    top_k = options.top_k
    library = Library.open(path)
    if not library.experts:
        raise LorlibError(f"library {library.path} has no experts to evaluate")
    source = library.data_source(options.data)
    loaded = load_tasks(source)
    tasks = select_tasks(library, options.tasks, loaded)
    explicit = options.routers is not None
    names = list(options.routers) if explicit else list(presets())
    kept, notes = resolve_routers(library, names, explicit, top_k, options.density, options.temperature, options.mix)
    few_shot = any(isinstance(r := _router(library, name, top_k), TaskRouter) and r.few_shot for name in kept)
    for task in tasks:
        loaded.family_of(task)  # an unknown task fails here, before the model loads
        if few_shot:
            draw_shots(loaded, task, options.shots)  # and so do too few training rows for the shots
    kept, skipped = fitting_routers(library, loaded, tasks, kept, explicit)
    return EvaluationPlan(library, options, source, loaded, tasks, kept, notes + skipped, few_shot)


def fitting_routers(
    library: Library, data: MultiTaskData, tasks: list[str], names: list[str], explicit: bool
) -> tuple[list[str], list[str]]:
    """The routers of `names` that fit at least one of `tasks`, and notes on the tasks where a
    per-task router (the oracle: a cluster expert of the task's family) has no expert and is
    skipped. One that fits none of them is skipped with a note or, asked for by name, refused,
    as `resolve_routers` does with routers the library cannot run."""
    kept, notes = [], []
    for name in names:
        router = _router(library, name, None)
        if isinstance(router, TaskRouter) and not router.few_shot:  # few-shot ones fit every task
            unfit = [t for t in tasks if router.for_task(TaskContext(library, t, data.family_of(t))) is None]
            families = ", ".join(sorted({data.family_of(t) for t in unfit}))
            if len(unfit) == len(tasks):
                problem = f"no expert of the library fits these tasks (families: {families})"
                if explicit:
                    raise LorlibError(f"router {name!r}: {problem}")
                notes.append(f"skipped {name}: {problem}")
                continue
            if unfit:
                notes.append(
                    f"{name} skips {len(unfit)} of the {len(tasks)} tasks, which no expert fits (families: {families})"
                )
        kept.append(name)
    return kept, notes


def run_evaluation(plan: EvaluationPlan, reporter: Reporter = QUIET) -> tuple[dict, list[str]]:
    """Score the plan's routers on its tasks and store the result in the library's manifest
    (`evaluation`). Returns the stored record and notes on routers skipped."""
    start = time.perf_counter()
    o, library, tasks, kept = plan.options, plan.library, plan.tasks, plan.routers
    rm = RoutedModel.load(library, device=o.device, dtype=o.dtype)
    scores = evaluate(
        rm, plan.data, tasks, kept, o.limit, reporter, o.split, o.top_k, o.shots, o.density, o.temperature, o.mix
    )
    record = result_record(scores, kept, plan.source, o.limit, time.perf_counter() - start)
    record["tasks"], record["split"], record["top_k"] = list(tasks), o.split, o.top_k
    if isinstance(o.tasks, str):  # a set of `select_tasks` (the list of its tasks is `tasks`)
        record["task_set"] = o.tasks
    if plan.few_shot:
        record["shots"] = o.shots
    if o.density is not None:
        record["density"] = o.density
    if o.temperature != 1.0:
        record["temperature"] = o.temperature
    if o.mix != "outputs":
        record["mix"] = o.mix
    seen = set(seen_tasks(library))
    record["seen"] = [t for t in tasks if t in seen]
    if record["seen"] and len(record["seen"]) < len(tasks):  # both kinds: a summary of each as well
        record["summary_by"] = {
            kind: summarize([s for s in scores if (s.task in seen) == (kind == "seen")], kept)
            for kind in ("held-out", "seen")
        }
    with library.edit() as current:
        current.extra["evaluation"] = record
    return record, plan.notes


def evaluate_library(
    path: str, options: EvaluateOptions | None = None, reporter: Reporter = QUIET
) -> tuple[dict, list[str]]:
    """`plan_evaluation`, then `run_evaluation`: (the stored record, notes on routers skipped)."""
    return run_evaluation(plan_evaluation(path, options or EvaluateOptions()), reporter)
