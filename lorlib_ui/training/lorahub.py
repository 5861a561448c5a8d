"""LoraHub on a task of the library's data: its few-shot examples, their loss, and the merge stored
as an expert.

The search itself is LoraHub's router (`lorlib_ui.core.routers.lorahub`): weights w for a merge of
the library's experts, searched by NGOpt on a loss it is handed. Here that loss is built: K
examples ("shots") of the task, drawn with a seed from its training rows, scored as `evaluate`
scores an answer (the prompt in the chat template, the reference answer's mean log-probability
per token), on the routed model, under each candidate merge. `evaluate --routers lorahub` does
this on each held-out task (`few_shot_context`); `lorahub_expert` does it once and stores the
result as an expert of kind `lorahub`, a plain LoRA adapter that routes like any other
(`expert:lorahub-<task>-k<K>-s<seed>`), with its weights and shots in its `training` record.
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


@dataclass
class LoraHubReport:
    expert: Expert  # as stored in the library
    reused: bool  # it was there already: nothing was searched
    seconds: float


def lorahub_expert(
    path: str | Path,
    task: str,
    data: str | None = None,
    shots: int = DEFAULT_SHOTS,
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    experts: str | None = None,
    force: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> LoraHubReport:
    """Search LoraHub's merge of the library's task experts (or of the experts of kind `experts`)
    on `shots` training rows of `task` (from `data`; default: the data the library was built from),
    and add it to the library as an expert of kind `lorahub`. An expert of that name already there
    is reused, not searched again, unless `force`. Everything is checked before the model loads;
    a refusal changes nothing."""
    start = time.perf_counter()
    check_shots(shots)
    library = Library.open(path)
    spec = "lorahub" + (f"@{experts}" if experts else "")
    router = replace(make_router(spec, library.names, groups=library.groups(), per_task=True), budget=budget)
    name = lorahub_name(task, shots, seed, experts)
    existing = next((e for e in library.experts if e.name == name), None)
    if existing is not None and not force:
        if existing.kind != "lorahub":
            kind = existing.kind
            raise LorlibError(f"library {library.path} has a {kind} expert named {name!r}; use --force to replace it")
        return LoraHubReport(existing, reused=True, seconds=time.perf_counter() - start)
    source = library.data_source(data)
    loaded = load_tasks(source, task=task)  # a file without a task column is this task's rows
    rows, picked = draw_shots(loaded, task, shots, seed)
    family = loaded.family_of(task)

    rm = RoutedModel.load(library, device=device, dtype=dtype)
    context = TaskContext(rm.library, task, family, shot_loss(rm, rows), shots, seed)
    merge, result = router.search(context, progress)
    adapter = rm.merged_adapter(merge)
    merged = [rm.experts[i] for i in router.merged_experts(rm.library)]
    local = source != "default" and Path(source).exists()
    training = {
        "method": "lorahub",
        "task": task,
        "data": str(Path(source).resolve()) if local else source,
        "shots": shots,
        "shot_rows": picked,  # positions among the task's training rows
        "seed": seed,
        "budget": budget,
        "experts": experts or "task experts (private and imported)",
        "bounds": [-BOUND, BOUND],
        "l1": L1,
        "init": "zeros",
        "weights": dict(zip(merged, result.weights)),
        "loss_uniform": result.uniform_loss,  # with every weight 1/E
        "loss": result.loss,  # with the weights found
        "objective": result.objective,  # loss + l1·‖w‖₁
    }
    entry = expert_from_adapter(
        name,
        adapter,
        library.base_model,
        kind="lorahub",
        tasks=[task],
        family=family,
        training=training,
        metrics={"evaluations": result.evaluations, "seconds": round(time.perf_counter() - start, 2)},
    )
    stored = library.add_experts([(entry, adapter)], force=force)[0]
    return LoraHubReport(stored, reused=False, seconds=time.perf_counter() - start)
