"""LoraHub on a task of the library's data: its few-shot examples, their loss, and the merge stored
as an expert.

The search itself is LoraHub's router (`lorlib_ui.core.routers.lorahub`): weights w for a merge of
the library's experts, searched by NGOpt on a loss it is handed. Here that loss is built: K
examples ("shots") of the task, drawn with a seed from its training rows, scored as `evaluate`
scores an answer (the prompt in the chat template, the reference answer's mean log-probability
per token), on the routed model, under each candidate merge. `evaluate --routers lorahub` does
this on each held-out task (`few_shot_context`); `lorahub_expert` does it once and stores the
result as an expert of kind `lorahub`, a plain LoRA adapter that routes like any other
(`expert:lorahub-<task>-k<K>-s<seed>`), with its weights and shots in its `training` record:
`plan_lorahub` checks everything (reusing a stored expert, or drawing the shots) without loading the
model, `run_lorahub` searches and stores. This module is LoraHub's one home outside its router: the
defaults of its settings (`LoraHubOptions`) and what `adapt` and `evaluate` call.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.generation import score_continuations
from lorlib_ui.core.library import Expert, Library, check_name, expert_from_adapter
from lorlib_ui.core.prompting import answer_ids, encode_prompt
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import Router, TaskContext, make_router
from lorlib_ui.core.routers.lorahub import BOUND, DEFAULT_BUDGET, DEFAULT_SHOTS, L1
from lorlib_ui.training.building import expert_name
from lorlib_ui.training.data import MultiTaskData, load_tasks
from lorlib_ui.training.options import option
from lorlib_ui.training.reporter import QUIET, Reporter
from lorlib_ui.training.training import Cancelled


def check_shots(shots: int) -> None:
    if shots < 1:
        raise LorlibError(f"--shots must be at least 1, got {shots}")


def draw_shots(data: MultiTaskData, task: str, shots: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    """`shots` training rows of a task, drawn with `seed` (the same for a task wherever it is
    loaded from), and their positions among the task's training rows."""
    check_shots(shots)
    rows = data.rows(task, "train")
    if shots > len(rows):
        raise LorlibError(
            f"--shots {shots} is more than the {len(rows)} training rows of task {task!r} in {data.origin}"
        )
    picked = sorted(random.Random(f"{seed}:{task}").sample(range(len(rows)), shots))
    return [rows[i] for i in picked], picked


def shot_loss(rm: RoutedModel, rows: list[dict]) -> Callable[[Router], float]:
    """The loss of a router on these rows: the mean over rows of the reference answer's negative
    log-likelihood per token, exactly `evaluate`'s answer log-likelihood negated. Rows are
    tokenized once; each call is one batched scoring pass."""
    tok = rm.tokenizer
    chat = bool(tok.chat_template)
    answer = answer_ids(tok, chat)
    pairs = [(encode_prompt(tok, row["input"], chat), answer(row["output"])) for row in rows]

    def loss(router: Router) -> float:
        logprobs = score_continuations(rm, router, pairs)
        return -sum(sum(lp) / max(len(lp), 1) for lp in logprobs) / len(pairs)

    return loss


def few_shot_context(rm: RoutedModel, data: MultiTaskData, task: str, shots: int, seed: int = 0) -> TaskContext:
    """What a few-shot router learns from on `task`: `shots` of its training rows and their loss."""
    rows, _ = draw_shots(data, task, shots, seed)
    return TaskContext(rm.library, task, data.family_of(task), shot_loss(rm, rows), shots, seed)


def lorahub_name(task: str, shots: int, seed: int, kind: str | None = None) -> str:
    """The stored expert's name: lorahub-[KIND-]<task>-k<shots>-s<seed>."""
    return check_name(f"lorahub-{kind + '-' if kind else ''}{expert_name(task)[:70]}-k{shots}-s{seed}")


@dataclass(frozen=True, kw_only=True)
class FewShotTask:
    """The task a run learns from a few of its rows, and where the rows are (lorahub, adapt)."""

    task: str = option(help="the task whose training rows are the examples")
    data: str | None = option(
        None,
        "tasks' data as for build, or a file of the task's rows alone (default: what the library was built from)",
    )


@dataclass(frozen=True, kw_only=True)
class LoraHubOptions(FewShotTask):
    """One LoraHub search, stored as an expert (the `lorahub` command's flags). Its defaults are
    LoraHub's own: `evaluate`'s shots and `adapt`'s budget are these."""

    shots: int = option(DEFAULT_SHOTS, f"examples (default {DEFAULT_SHOTS})")
    budget: int = option(DEFAULT_BUDGET, f"evaluations of the search (default {DEFAULT_BUDGET})")
    seed: int = option(0, "draws the examples and seeds the search")
    experts: str | None = option(None, "a kind to merge (default: private and imported experts)")
    force: bool = option(False, "search again when the expert is already there")
    device: str | None = option(None, "cuda or cpu (default: cuda when present)")
    dtype: str | None = option(None, "float32, bfloat16, float16 or auto")

    def __post_init__(self):
        check_shots(self.shots)
        if self.budget < 1:
            raise LorlibError(f"--budget must be at least 1, got {self.budget}")


@dataclass
class LoraHubReport:
    expert: Expert  # as stored in the library
    reused: bool  # it was there already: nothing was searched
    seconds: float


@dataclass
class LoraHubPlan:
    """A LoraHub search checked whole, before the model loads: the expert to reuse, or the shots."""

    library: Library
    options: LoraHubOptions
    name: str  # of the stored expert
    router: Router  # LoraHub's, with the options' budget and experts
    reuse: Expert | None = None  # already stored: nothing to search
    source: str = ""  # where the rows come from
    rows: list[dict] | None = None  # the shots
    picked: list[int] | None = None  # their positions among the task's training rows
    family: str | None = None


def plan_lorahub(path: str | Path, options: LoraHubOptions) -> LoraHubPlan:
    """Check a search of LoraHub's merge of the library's task experts (or of the experts of kind
    `options.experts`) on `options.shots` training rows of the task (from `options.data`; default:
    the data the library was built from). An expert of that name already there is to be reused,
    unless `options.force`. Reads the library and the data; writes nothing, loads no model."""
    library = Library.open(path)
    spec = "lorahub" + (f"@{options.experts}" if options.experts else "")
    router = replace(make_router(spec, library.names, groups=library.groups(), per_task=True), budget=options.budget)
    name = lorahub_name(options.task, options.shots, options.seed, options.experts)
    existing = next((e for e in library.experts if e.name == name), None)
    if existing is not None and not options.force:
        if existing.kind != "lorahub":
            kind = existing.kind
            raise LorlibError(f"library {library.path} has a {kind} expert named {name!r}; use --force to replace it")
        return LoraHubPlan(library, options, name, router, reuse=existing)
    source = library.data_source(options.data)
    loaded = load_tasks(source, task=options.task)  # a file without a task column is this task's rows
    rows, picked = draw_shots(loaded, options.task, options.shots, options.seed)
    return LoraHubPlan(library, options, name, router, None, source, rows, picked, loaded.family_of(options.task))


def run_lorahub(plan: LoraHubPlan, reporter: Reporter = QUIET) -> LoraHubReport:
    """Search the merge (each evaluation a step of `reporter`'s, which may cancel between them) and
    add it to the library as an expert of kind `lorahub`; or return the stored one to reuse."""
    start = time.perf_counter()
    if plan.reuse is not None:
        return LoraHubReport(plan.reuse, reused=True, seconds=time.perf_counter() - start)
    o, library = plan.options, plan.library
    rm = RoutedModel.load(library, device=o.device, dtype=o.dtype)
    context = TaskContext(rm.library, o.task, plan.family, shot_loss(rm, plan.rows), o.shots, o.seed)
    step = reporter.steps(plan.name)

    def searched(done: int, total: int, best: float) -> None:
        step(done, total, best)
        if reporter.cancelled():
            raise Cancelled("LoraHub's search cancelled; nothing was stored")

    merge, result = plan.router.search(context, searched)
    adapter = rm.merged_adapter(merge)
    merged = [rm.experts[i] for i in plan.router.merged_experts(rm.library)]
    local = plan.source != "default" and Path(plan.source).exists()
    training = {
        "method": "lorahub",
        "task": o.task,
        "data": str(Path(plan.source).resolve()) if local else plan.source,
        "shots": o.shots,
        "shot_rows": plan.picked,  # positions among the task's training rows
        "seed": o.seed,
        "budget": o.budget,
        "experts": o.experts or "task experts (private and imported)",
        "bounds": [-BOUND, BOUND],
        "l1": L1,
        "init": "zeros",
        "weights": dict(zip(merged, result.weights)),
        "loss_uniform": result.uniform_loss,  # with every weight 1/E
        "loss": result.loss,  # with the weights found
        "objective": result.objective,  # loss + l1·‖w‖₁
    }
    entry = expert_from_adapter(
        plan.name,
        adapter,
        library.base_model,
        kind="lorahub",
        tasks=[o.task],
        family=plan.family,
        training=training,
        metrics={"evaluations": result.evaluations, "seconds": round(time.perf_counter() - start, 2)},
    )
    stored = library.add_experts([(entry, adapter)], force=o.force)[0]
    return LoraHubReport(stored, reused=False, seconds=time.perf_counter() - start)


def lorahub_expert(path: str | Path, options: LoraHubOptions, reporter: Reporter = QUIET) -> LoraHubReport:
    """`plan_lorahub`, then `run_lorahub`: a refusal changes nothing."""
    return run_lorahub(plan_lorahub(path, options), reporter)
