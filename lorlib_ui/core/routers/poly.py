"""A router learned on one task over the library (Poly; Ponti et al., 2023, "Combining
Parameter-efficient Modules for Task-level Generalisation"), the paper's supervised way to reuse a
library (Ostapenko et al., 2024, Sec. 6.2; their code's `polylib_selector` and `polylib_full`).

At each LoRA'd layer the router holds one logit per expert it mixes; every token gets the same
weights, softmax over the mixed experts that adapt the layer, and the experts' outputs are mixed:

    y = W h + Σ_e w_e s_e B_e A_e h,    w = softmax(logits at this layer)

`adapt` learns the logits with the experts frozen (poly-router) or together with the experts'
factors (poly-full); either way the result is stored in the library (`lorlib_ui.core.learned_routers`)
and routes as `poly:NAME`. Its weights are static, so the layer folds them once: the mixed
experts' factors side by side, the trained copies of them for poly-full.

While it learns (`lorlib_ui.training.adaptation_methods.train_poly`), the same router is a
`PolyTraining`: the same weights, from trainable logits, recomputed at every step so that
gradients reach them (and the factors, for poly-full). The training code builds it; no spec
names it, so it is not registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.base import ExpertStack, LayerSlot, MergeRouter, Routing, TokenRouter, register

if TYPE_CHECKING:
    import torch


def poly_weights(slot, subset: tuple[int, ...], logits):
    """The layer's weight per expert (experts,): softmax of `logits` (one per expert of `subset`,
    in its order) over those of them that adapt the layer, 0 elsewhere. Differentiable in
    `logits`, so training and routing share it."""
    usable, n = slot.usable(subset)
    if n == 0 or logits is None:
        return slot.scales.new_zeros(slot.n_experts)
    index = logits.new_tensor(subset).long()
    full = logits.new_full((slot.n_experts,), float("-inf")).index_copy(0, index, logits)
    return full.masked_fill(~usable, float("-inf")).softmax(dim=0)


@register()
@dataclass(frozen=True, eq=False)
class PolyRouter(MergeRouter):
    name: ClassVar[str] = "poly"
    summary: ClassVar[str] = "a router learned on a few examples of a task, mixing the library's experts (adapt)"
    argument: ClassVar[str | None] = "NAME"
    argument_of: ClassVar[str] = "learned"

    learned: str = ""
    content: str = ""  # the stored version it holds, once bound
    logits: dict = field(default_factory=dict)  # module -> (n,) one per mixed expert
    factors: dict | None = None  # module -> (A (n, r, d_in), Bᵀ (n, r, d_out)), trained copies

    @classmethod
    def argument_problem(cls, argument: str, experts: list[str]) -> str | None:
        from lorlib_ui.core.library import check_name  # the library module loads torch; the registry need not

        try:
            check_name(argument)
        except LorlibError:
            return f"invalid learned router name {argument!r}"
        return None

    @classmethod
    def build(cls, argument: str, experts: list[str], config=None) -> PolyRouter:
        return cls(learned=argument)

    def missing(self, library):
        from lorlib_ui.core.learned_routers import learned_problem

        return learned_problem(library, self.learned)

    def bind(self, library, experts):
        if self.content:
            return self
        from lorlib_ui.core.learned_routers import read_learned_router

        record, tensors = read_learned_router(library, self.learned)
        if absent := [x for x in record.experts if x not in experts]:
            raise LorlibError(f"learned router {self.learned} mixes {absent[0]}, which this model does not hold")
        modules = {key.rsplit(".", 1)[0] for key in tensors}
        logits = {m: tensors[f"{m}.logits"] for m in modules}
        factors = None
        if record.trains_experts:
            factors = {m: (tensors[f"{m}.lora_a"], tensors[f"{m}.lora_bt"]) for m in modules}
        subset = tuple(experts.index(x) for x in record.experts)
        return replace(self, subset=subset, content=record.content, logits=logits, factors=factors)

    @property
    def key(self):
        return (self.name, self.learned, self.content, self.subset)

    def weights(self, slot):
        logits = self.logits.get(slot.name)
        return poly_weights(slot, self.subset, None if logits is None else logits.to(slot.scales))

    def merge(self, slot):
        if self.factors is None:
            return None  # the layer folds the frozen experts by `weights`
        dtype = slot.prototypes.dtype
        if slot.name not in self.factors:
            return slot.lora_a.new_zeros(0, slot.lora_a.shape[1], dtype=dtype), slot.lora_bt.new_zeros(
                0, slot.lora_bt.shape[1], dtype=dtype
            )
        a, bt = self.factors[slot.name]
        index = slot.scales.new_tensor(self.subset).long()
        ws = self.weights(slot).index_select(0, index) * slot.scales.index_select(0, index)
        a, bt = a.to(slot.scales.device, dtype), bt.to(slot.scales.device, dtype)
        return a.flatten(0, 1), (bt * ws.to(dtype)[:, None, None]).flatten(0, 1)

    def describe(self):
        return f"poly:{self.learned}"


@dataclass(frozen=True, eq=False)
class PolyTraining(TokenRouter):
    """A Poly router while it learns: the same weights as `poly:NAME` (`poly_weights`) from
    trainable logits, over a stack of only the mixed experts (their factors trainable too, for
    poly-full). It scores nothing: the layer hands it the experts' projections (keys None)."""

    name: ClassVar[str] = "poly-training"
    summary: ClassVar[str] = "a Poly router in training"
    keys: ClassVar[str | None] = None

    logits: dict = field(default_factory=dict)  # module -> (n,) Parameter
    factors: dict = field(default_factory=dict)  # module -> (A (n·r, d_in), Bᵀ (n·r, d_out)) Parameters

    def route(self, slot, scores, h):
        weights = poly_weights(slot, self.subset, self.logits.get(slot.name))
        mixed = weights.index_select(0, slot.scales.new_tensor(self.subset).long())
        mixed = mixed.unsqueeze(0).expand(scores.shape[0], -1)
        return Routing(mixed, weights=mixed)

    def stack(self, slot):
        index = slot.scales.new_tensor(self.subset).long()
        if slot.name in self.factors:
            a, bt = self.factors[slot.name]
        else:
            a, bt = slot.derived(("poly-training", self.subset), lambda: mixed_factors(slot, index))
        return ExpertStack(slot.keys, a, bt, slot.scales.index_select(0, index))


def mixed_factors(slot: LayerSlot, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked factors of the experts at `index` only, in the layer's compute dtype: what a
    Poly router in training mixes, and where poly-full's trained copies start."""
    e, r, dtype = slot.n_experts, slot.rank, slot.prototypes.dtype
    a = slot.lora_a.view(e, r, -1).index_select(0, index).flatten(0, 1).to(dtype)
    bt = slot.lora_bt.view(e, r, -1).index_select(0, index).flatten(0, 1).to(dtype)
    return a, bt
