"""LoraHub (Huang et al., 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition"), the few-shot merge baseline: one weight per expert, searched on K examples of a task.

1. compose: with weights w, the experts merge into one LoRA, each expert's scale s_e in its B,

       A = Σ_e w_e A_e,    B = Σ_e w_e s_e B_e     (the "parameters" mix; `WeightedMerge`);

2. adapt: a gradient-free optimiser (nevergrad's NGOpt, 40 evaluations) searches w ∈ [−1.5, 1.5]^E
   for the lowest

       L(w) = mean answer negative log-likelihood of the K examples + 0.05·‖w‖₁.

Each candidate is scored on the routed model as a static router, whose merge every layer folds once
(`LibraryLinear.merged_factors`): no model is built per candidate. Choices, against the paper and
the authors' code (github.com/sail-sg/lorahub):
- the search starts at w = 0, the base model, as the authors' implementation of the paper does
  (`ng.p.Array(init=[0] * E, ...)`); we found no other starting point stated in the paper;
- the penalty is 0.05·‖w‖₁, the paper's α·Σ|w_e| with their α; their code divides it by E;
- the result is the best candidate scored, not NGOpt's recommendation (which may be a point never
  scored), so that the merged expert's loss on the examples is exactly the one reported.

It runs per evaluated task (`for_task`, the few examples from the evaluation's `TaskContext`), or
once with `python -m lorlib_ui lorahub`, which stores the merge as an expert of kind `lorahub`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.base import MergeRouter, TaskContext, TaskRouter, register

if TYPE_CHECKING:
    import numpy as np

    from lorlib_ui.core.library import Library

DEFAULT_SHOTS = 10  # the paper uses 5 examples per task; 5 to 20 is its few-shot range
DEFAULT_BUDGET = 40  # NGOpt's evaluations (the paper's inference steps)
BOUND = 1.5  # each weight in [-BOUND, BOUND]
L1 = 0.05  # the weight of ‖w‖₁ in the objective


@dataclass(frozen=True)
class WeightedMerge(MergeRouter):
    """Σ_e w_e A_e and Σ_e w_e s_e B_e with given weights: a candidate of LoraHub's search, and its
    result. Made by the search, not typed, so it is not in the registry."""

    name: ClassVar[str] = "weighted"
    summary: ClassVar[str] = "the experts' A's and their s·B's summed with given weights"

    mix: str = "parameters"
    values: tuple[float, ...] = ()  # one weight per library expert, in library order; 0 outside `subset`
    label: str = "weighted"  # what evaluations call it

    @property
    def key(self):
        return (self.name, self.values)  # every candidate folds its own merge

    def weights(self, slot):
        usable, _ = slot.usable(self.subset)  # an expert that does not adapt the layer adds nothing
        return slot.present.float().new_tensor(self.values) * usable

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True)
class SearchResult:
    weights: tuple[float, ...]  # the best candidate, one weight per merged expert
    loss: float  # its mean answer negative log-likelihood on the examples
    objective: float  # loss + L1·‖w‖₁, what the search minimised
    uniform_loss: float  # the loss with every weight 1/E, for comparison
    evaluations: int


def search_weights(
    loss: Callable[[np.ndarray], float],
    n: int,
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> SearchResult:
    """LoraHub's search: minimise loss(w) + L1·‖w‖₁ over w ∈ [−1.5, 1.5]^n with NGOpt in `budget`
    evaluations from w = 0, seeded; `progress(done, budget, best objective)` after each."""
    import warnings

    import nevergrad as ng
    import numpy as np

    if n < 1:
        raise LorlibError("LoraHub needs at least one expert to merge")
    if budget < 1:
        raise LorlibError(f"the budget must be at least 1 evaluation, got {budget}")

    def finite(value: float) -> float:  # the optimiser cannot rank a NaN
        return value if math.isfinite(value) else math.inf

    uniform_loss = finite(loss(np.full(n, 1.0 / n)))
    space = ng.p.Array(init=np.zeros(n), lower=-BOUND, upper=BOUND)
    space.random_state = np.random.RandomState(seed)  # nevergrad draws every candidate from it
    optimizer = ng.optimizers.NGOpt(parametrization=space, budget=budget)
    best: tuple[np.ndarray, float, float] | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its sub-optimisers' notes on their own settings
        for done in range(1, budget + 1):
            candidate = optimizer.ask()
            w = np.asarray(candidate.value, dtype=float)
            value = finite(loss(w))
            objective = value + L1 * float(np.abs(w).sum())
            optimizer.tell(candidate, objective)
            if best is None or objective < best[2]:
                best = (w.copy(), value, objective)
            if progress is not None:
                progress(done, budget, best[2])
    weights, value, objective = best
    return SearchResult(tuple(float(x) for x in weights), value, objective, uniform_loss, budget)


@register()
@dataclass(frozen=True)
class LoraHubRouter(TaskRouter):
    name: ClassVar[str] = "lorahub"
    summary: ClassVar[str] = "LoraHub: per evaluated task, a weighted merge searched on a few of its examples"
    groupable: ClassVar[bool] = True
    usage: ClassVar[str] = (
        "searches its merge on a few examples of each evaluated task; use it with evaluate, or store "
        "one with `lorahub LIBRARY --task T` and route with expert:NAME"
    )
    few_shot: ClassVar[bool] = True

    mix: str = "parameters"
    budget: int = DEFAULT_BUDGET

    def __post_init__(self):
        if self.budget < 1:
            raise LorlibError(f"--budget must be at least 1, got {self.budget}")

    @classmethod
    def unavailable(cls, groups: dict[str, list[str]]) -> str | None:
        from lorlib_ui.core.library import TASK_KINDS  # the library module loads torch; the registry need not

        if any(groups.get(kind) for kind in TASK_KINDS):
            return None
        return "the library has no task experts (private or imported) to merge; name a kind with lorahub@KIND"

    def merged_experts(self, library: Library) -> tuple[int, ...]:
        """The experts it merges: its group's, else the library's task experts (private and imported)."""
        from lorlib_ui.core.library import TASK_KINDS

        if self.subset is not None:
            return self.subset
        return tuple(i for i, e in enumerate(library.experts) if e.kind in TASK_KINDS)

    def for_task(self, context: TaskContext) -> WeightedMerge:
        return self.search(context)[0]

    def search(
        self, context: TaskContext, progress: Callable[[int, int, float], None] | None = None
    ) -> tuple[WeightedMerge, SearchResult]:
        """The merge LoraHub finds with the context's loss on its examples, and how the search went."""
        if context.loss is None:
            raise LorlibError(f"router {self.describe()} needs a few training examples of task {context.task!r}")
        subset = self.merged_experts(context.library)
        label = f"{self.describe()} ({context.shots} shots, seed {context.seed})"

        def merge(w) -> WeightedMerge:
            values = [0.0] * len(context.library.experts)
            for i, x in zip(subset, w):
                values[i] = float(x)
            return WeightedMerge(subset=subset, values=tuple(values), label=label)

        result = search_weights(lambda w: context.loss(merge(w)), len(subset), self.budget, context.seed, progress)
        return merge(result.weights), result
