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
library, LoraHub (a few-shot baseline, run by name) from a few of the task's training rows.

`evaluate_library` is `plan_evaluation` (the library, tasks, routers and data checked, nothing
written and no model loaded) then `run_evaluation` (score, store the record in the manifest).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from lorlib_ui.analysis import stats
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import generate_batch, score_continuations
from lorlib_ui.core.library import TASK_KINDS, Library
from lorlib_ui.core.prompting import answer_ids, encode_prompt
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import DEFAULT_TOP_K, ROUTERS, Router, TaskContext, TaskRouter, make_router, presets
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
        "held-out", "held-out, seen (tasks the library trained on), all, or comma-separated", sets=TASK_SETS
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
    device: str | None = option(None, "cuda or cpu (default: cuda when present)")
    dtype: str | None = option(None, "float32, bfloat16, float16 or auto")

    def __post_init__(self):
        super().__post_init__()
        if self.routers == ():
            raise LorlibError("the list of routers is empty")
        check_shots(self.shots)
        if self.split not in SPLITS:
            raise LorlibError(f"unknown split {self.split!r}; use {' or '.join(SPLITS)}")


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
    library: Library, names: list[str], explicit: bool, top_k: int | None = None, density: float | None = None
) -> tuple[list[str], list[str]]:
    """The routers that can run on this library, and notes on those skipped. A router asked for
    by name that cannot run is an error; one of the defaults is skipped with a note. Names are the
    registry's presets (arrow, shared, oracle, ...) or any router spec (arrow@cluster, expert:NAME)."""
    kept, notes = [], []
    for name in names:
        try:
            router = _router(library, name, top_k, density)
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
) -> TaskScore | None:
    """Score one router on one task's test rows; None for the oracle when no expert fits. A
    few-shot router (LoraHub) learns from `shots` of the task's training rows first."""
    library = rm.library
    family = data.family_of(task)
    router = _router(library, name, top_k, density)
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


def _router(library: Library, name: str, top_k: int | None, density: float | None = None) -> Router:
    """The router an evaluation runs by `name` (a preset or a spec), per-task routers unresolved."""
    spec = presets().get(name, name)
    return make_router(spec, library.names, top_k, groups=library.groups(), per_task=True, density=density)


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
) -> list[TaskScore]:
    """Every router on every task; a `Count` to `reporter` after each pair."""
    scores, total, done = [], len(routers) * len(tasks), 0
    for name in routers:
        for task in tasks:
            if reporter.cancelled():
                raise Cancelled("evaluation cancelled")
            score = evaluate_task(rm, data, task, name, limit, split, top_k, shots, density)
            if score is not None:
                scores.append(score)
            done += 1
            reporter.progress(Count(done, total, f"{name} on {task}"))
    return scores


MEASURES = ("exact_match", "loglik", "mc")
# The differences the paper's claims rest on (Sec. 6): Arrow against joint training, against the
# uniform merge, and Arrow over cluster experts against Arrow over private experts.
DIFFERENCES = (("arrow", "shared"), ("arrow", "uniform"), ("arrow-cluster", "arrow"))


def _per_task(scores: list[TaskScore], measure: str) -> list[list[float]] | None:
    """Each task's per-row values of a measure (tasks with rows of it), or None when a score was
    stored without its rows (by an older lorlib)."""
    if any(not s.rows for s in scores):
        return None
    return [s.rows[measure] for s in scores if s.rows.get(measure)]


def summarize(scores: list[TaskScore], routers: list[str]) -> list[dict]:
    """One row per router: its measures averaged over tasks (multiple choice over tasks with
    options), each with its 95% bootstrap interval over test rows (`*_ci`) when rows were kept."""
    rows = []
    for name in routers:
        mine = [s for s in scores if s.router == name]
        if not mine:
            continue
        mc = [s.mc_accuracy for s in mine if s.mc_accuracy is not None]
        row = {
            "router": name,
            "tasks": len(mine),
            "exact_match": sum(s.exact_match for s in mine) / len(mine),
            "loglik": sum(s.loglik for s in mine) / len(mine),
            "mc_accuracy": sum(mc) / len(mc) if mc else None,
            "mc_tasks": len(mc),
        }
        for measure, key in zip(MEASURES, ("exact_match", "loglik", "mc_accuracy")):
            per_task = _per_task(mine, measure)
            row[f"{key}_ci"] = list(stats.bootstrap_interval(per_task)) if per_task else None
        rows.append(row)
    return rows


def differences(scores: list[TaskScore], pairs=DIFFERENCES) -> list[dict]:
    """Paired differences a − b between routers, over the tasks both ran, with paired bootstrap
    intervals (the same test rows resampled for both)."""
    out = []
    for a, b in pairs:
        mine = {s.task: s for s in scores if s.router == a}
        theirs = {s.task: s for s in scores if s.router == b}
        tasks = [t for t in mine if t in theirs]
        if not tasks or any(not mine[t].rows or not theirs[t].rows for t in tasks):
            continue
        row = {"a": a, "b": b, "tasks": len(tasks)}
        for measure in MEASURES:
            left = [mine[t].rows[measure] for t in tasks if mine[t].rows.get(measure)]
            right = [theirs[t].rows[measure] for t in tasks if theirs[t].rows.get(measure)]
            if left and [len(x) for x in left] == [len(x) for x in right]:
                diff, low, high = stats.paired_interval(left, right)
                row[measure] = {"difference": diff, "ci": [low, high]}
        out.append(row)
    return out


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


def _interval(value: float | None, ci: list[float] | None, scale: float, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    text = f"{scale * value:.{digits}f}"
    return text if ci is None else f"{text} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def format_table(summary: list[dict]) -> str:
    """The summary as a Markdown table (it reads as plain text too); 95% intervals in brackets."""
    lines = [
        "| router | tasks | exact match (%) | answer log-likelihood | multiple choice (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary:
        em = _interval(row["exact_match"], row.get("exact_match_ci"), 100, 1)
        ll = _interval(row["loglik"], row.get("loglik_ci"), 1, 3)
        mc = _interval(row["mc_accuracy"], row.get("mc_accuracy_ci"), 100, 1)
        mc += f" ({row['mc_tasks']} tasks)" if row["mc_accuracy"] is not None else ""
        lines.append(f"| {row['router']} | {row['tasks']} | {em} | {ll} | {mc} |")
    return "\n".join(lines)


def format_differences(rows: list[dict]) -> str:
    """Paired differences as a Markdown table, with 95% intervals."""
    lines = [
        "| difference | tasks | exact match (points) | answer log-likelihood | multiple choice (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            _interval(row[m]["difference"], row[m]["ci"], scale, digits) if m in row else "-"
            for m, scale, digits in (("exact_match", 100, 1), ("loglik", 1, 3), ("mc", 100, 1))
        ]
        lines.append(f"| {row['a']} − {row['b']} | {row['tasks']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def held_out_tasks(library: Library) -> list[str]:
    return list(library.held_out.tasks)


def seen_tasks(library: Library) -> list[str]:
    """The tasks the library's task experts were trained on, by family, then name."""
    family = {t: e.family or "" for e in library.experts if e.kind in TASK_KINDS for t in e.tasks}
    return sorted(family, key=lambda t: (family[t], t))


def select_tasks(library: Library, which: str | list[str] | None) -> list[str]:
    """Tasks by name, or a set of them: "held-out" (the default), "seen" (trained on by a task
    expert) or "all" (both)."""
    if which is None or isinstance(which, str):
        which = which or "held-out"
        if which not in TASK_SETS:
            raise LorlibError(f"unknown set of tasks {which!r}; use {', '.join(TASK_SETS)} or name the tasks")
        tasks = held_out_tasks(library) if which != "seen" else []
        tasks += seen_tasks(library) if which != "held-out" else []
        if not tasks:
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
    notes: list[str]  # on routers skipped
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
    tasks = select_tasks(library, options.tasks)
    explicit = options.routers is not None
    names = list(options.routers) if explicit else list(presets())
    kept, notes = resolve_routers(library, names, explicit, top_k=top_k, density=options.density)
    loaded = load_tasks(source)
    few_shot = any(isinstance(r := _router(library, name, top_k), TaskRouter) and r.few_shot for name in kept)
    for task in tasks:
        loaded.family_of(task)  # an unknown task fails here, before the model loads
        if few_shot:
            draw_shots(loaded, task, options.shots)  # and so do too few training rows for the shots
    return EvaluationPlan(library, options, source, loaded, tasks, kept, notes, few_shot)


def run_evaluation(plan: EvaluationPlan, reporter: Reporter = QUIET) -> tuple[dict, list[str]]:
    """Score the plan's routers on its tasks and store the result in the library's manifest
    (`evaluation`). Returns the stored record and notes on routers skipped."""
    start = time.perf_counter()
    o, library, tasks, kept = plan.options, plan.library, plan.tasks, plan.routers
    rm = RoutedModel.load(library, device=o.device, dtype=o.dtype)
    scores = evaluate(rm, plan.data, tasks, kept, o.limit, reporter, o.split, o.top_k, o.shots, o.density)
    record = result_record(scores, kept, plan.source, o.limit, time.perf_counter() - start)
    record["tasks"], record["split"], record["top_k"] = list(tasks), o.split, o.top_k
    if plan.few_shot:
        record["shots"] = o.shots
    if o.density is not None:
        record["density"] = o.density
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
