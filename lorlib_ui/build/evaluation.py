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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from lorlib_ui.build.data import MultiTaskData
from lorlib_ui.build.training import Cancelled
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import generate_batch, score_continuations
from lorlib_ui.core.library import Library
from lorlib_ui.core.prompting import encode_prompt
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router, presets

EXTRA_TOKENS = 8  # generated beyond the longest training answer of the task


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


def normalize(text: str) -> str:
    lines = text.strip().splitlines()
    first = " ".join(lines[0].split()) if lines else ""
    return first.lower().rstrip(".").strip()


def resolve_routers(library: Library, names: list[str], explicit: bool) -> tuple[list[str], list[str]]:
    """The routers that can run on this library, and notes on those skipped. A router asked for
    by name that cannot run is an error; one of the defaults is skipped with a note. Names are the
    registry's presets (arrow, shared, oracle, ...) or any router spec (arrow@cluster, expert:NAME)."""
    groups, named = library.groups(), presets()
    kept, notes = [], []
    for name in names:
        try:
            make_router(named.get(name, name), library.names, groups=groups, per_task=True)
        except LorlibError as exc:
            if explicit:
                raise LorlibError(f"router {name!r}: {exc}") from None
            notes.append(f"skipped {name}: {exc}")
        else:
            kept.append(name)
    return kept, notes


def evaluate_task(
    rm: RoutedModel, data: MultiTaskData, task: str, name: str, limit: int | None = None
) -> TaskScore | None:
    """Score one router on one task's test rows; None for the oracle when no expert fits."""
    library = rm.library
    family = data.family_of(task)
    router = make_router(presets().get(name, name), rm.experts, groups=library.groups(), per_task=True)
    if router.per_task:
        router = router.for_task(library, family)
        if router is None:
            return None
    rows = data.rows(task, "test")[:limit]
    if not rows:
        raise LorlibError(f"{data.origin}: task {task!r} has no test rows")
    tok = rm.tokenizer
    chat = bool(tok.chat_template)
    answer_ids = _answer_ids(tok, chat)
    longest = max(len(answer_ids(r["output"])) for r in data.rows(task, "train") or rows)
    pairs, mc = [], []  # reference answers, then every option of multiple-choice rows
    for row in rows:
        prompt = encode_prompt(tok, row["input"], chat)
        pairs.append((prompt, answer_ids(row["output"])))
        if row["options"]:
            mc.append((len(pairs), list(row["options"]), row["output"]))
            pairs += [(prompt, answer_ids(option)) for option in row["options"]]
    logprobs = score_continuations(rm, router, pairs)
    prompts = [encode_prompt(tok, row["input"], chat) for row in rows]
    answers = generate_batch(rm, prompts, router, max_new_tokens=longest + EXTRA_TOKENS)
    matches = sum(normalize(text) == normalize(row["output"]) for text, row in zip(answers, rows))
    loglik = [sum(logprobs[i]) / max(len(logprobs[i]), 1) for i in _reference_positions(rows)]
    correct = 0
    for first, options, reference in mc:
        totals = [sum(logprobs[first + j]) for j in range(len(options))]
        correct += options[max(range(len(options)), key=totals.__getitem__)] == reference
    return TaskScore(
        router=name,
        task=task,
        family=family,
        expert=router.describe(),
        examples=len(rows),
        exact_match=matches / len(rows),
        loglik=sum(loglik) / len(loglik),
        mc_accuracy=correct / len(mc) if mc else None,
        mc_examples=len(mc),
    )


def _reference_positions(rows: list[dict]) -> list[int]:
    """Index in `pairs` of each row's reference answer (its options follow it)."""
    positions, at = [], 0
    for row in rows:
        positions.append(at)
        at += 1 + (len(row["options"]) if row["options"] else 0)
    return positions


def _answer_ids(tokenizer, chat: bool) -> Callable[[str], list[int]]:
    """How an answer is tokenized after its prompt: as the trainer does, without the EOS."""

    def ids(answer: str) -> list[int]:
        return tokenizer(answer if chat else " " + answer, add_special_tokens=False)["input_ids"]

    return ids


def evaluate(
    rm: RoutedModel,
    data: MultiTaskData,
    tasks: list[str],
    routers: list[str],
    limit: int | None = None,
    progress: Callable[[int, int, str, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> list[TaskScore]:
    """Every router on every task; `progress(done, total, router, task)` after each pair."""
    scores, total, done = [], len(routers) * len(tasks), 0
    for name in routers:
        for task in tasks:
            if cancel is not None and cancel():
                raise Cancelled("evaluation cancelled")
            score = evaluate_task(rm, data, task, name, limit)
            if score is not None:
                scores.append(score)
            done += 1
            if progress is not None:
                progress(done, total, name, task)
    return scores


def summarize(scores: list[TaskScore], routers: list[str]) -> list[dict]:
    """One row per router: its measures averaged over tasks (multiple choice over tasks with options)."""
    rows = []
    for name in routers:
        mine = [s for s in scores if s.router == name]
        if not mine:
            continue
        mc = [s.mc_accuracy for s in mine if s.mc_accuracy is not None]
        rows.append(
            {
                "router": name,
                "tasks": len(mine),
                "exact_match": sum(s.exact_match for s in mine) / len(mine),
                "loglik": sum(s.loglik for s in mine) / len(mine),
                "mc_accuracy": sum(mc) / len(mc) if mc else None,
                "mc_tasks": len(mc),
            }
        )
    return rows


def result_record(scores: list[TaskScore], routers: list[str], data: str, limit: int | None, seconds: float) -> dict:
    """What `evaluate` stores in the library's manifest."""
    return {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": data,
        "limit": limit,
        "seconds": round(seconds, 1),
        "summary": summarize(scores, routers),
        "scores": [asdict(s) for s in scores],
    }


def format_table(summary: list[dict]) -> str:
    """The summary as a Markdown table (it reads as plain text too)."""

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [
        "| router | tasks | exact match (%) | answer log-likelihood | multiple choice (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary:
        ll = "-" if not math.isfinite(row["loglik"]) else f"{row['loglik']:.3f}"
        mc = pct(row["mc_accuracy"]) + (f" ({row['mc_tasks']} tasks)" if row["mc_accuracy"] is not None else "")
        lines.append(f"| {row['router']} | {row['tasks']} | {pct(row['exact_match'])} | {ll} | {mc} |")
    return "\n".join(lines)


def evaluate_library(
    path: str,
    tasks: list[str] | None = None,
    routers: list[str] | None = None,
    data: str | None = None,
    limit: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: Callable[[int, int, str, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[dict, list[str]]:
    """Evaluate routers (default: every preset of the router registry that the library allows) on tasks (default:
    the library's held-out tasks) and store the result in its manifest (`evaluation`).
    Returns the stored record and notes on routers skipped."""
    import time

    from lorlib_ui.build.data import load_tasks

    start = time.perf_counter()
    if limit is not None and limit < 1:
        raise LorlibError(f"the limit must be positive, got {limit}")
    library = Library.open(path)
    if not library.experts:
        raise LorlibError(f"library {library.path} has no experts to evaluate")
    recorded = library.extra.get("held_out") or {}
    source = data or recorded.get("data") or "default"
    if tasks is None:
        tasks = recorded.get("tasks") or []
        if not tasks:
            raise LorlibError(f"library {library.path} holds no tasks out; name the tasks to evaluate on")
    if not tasks:
        raise LorlibError("the list of tasks is empty")
    names = list(presets()) if routers is None else routers
    if not names:
        raise LorlibError("the list of routers is empty")
    kept, notes = resolve_routers(library, names, explicit=routers is not None)
    loaded = load_tasks(source)
    for task in tasks:
        loaded.family_of(task)  # an unknown task fails here, before the model loads
    rm = RoutedModel.load(library, device=device, dtype=dtype)
    scores = evaluate(rm, loaded, tasks, kept, limit=limit, progress=progress, cancel=cancel)
    record = result_record(scores, kept, source, limit, time.perf_counter() - start)
    record["tasks"] = list(tasks)
    with library.edit() as current:
        current.extra["evaluation"] = record
    return record, notes
