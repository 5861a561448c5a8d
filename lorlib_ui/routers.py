"""Routers: how much each library expert contributes, per token and per LoRA'd layer.

Every router has the same shape, and `mix` says how the weighted experts combine:

- "outputs":    y = W h + Σ_e w_e s_e B_e A_e h              (PEFT's Arrow; mixture of experts)
- "parameters": y = W h + (Σ_e w_e s_e B_e)(Σ_e w_e A_e) h  (the paper's code: merge, then apply)

A static router (a merge) gives every token the same weights, `weights(slot)`, which the layer
folds once into one small pair of factors. A dynamic router scores each token from its dot
products with one key vector per expert, `route(slot, dots)`; the layer computes those dots in
the same matmul as the experts' A projections. Arrow's keys are its prototypes. A router may be
limited to a group of the library's experts (`arrow@private`: Arrow over the private experts
only); the others then get weight 0 everywhere. Add a router by
subclassing `Router` and registering it in `ROUTERS`: TIES or LoraHub would be static routers,
PhatGoose (a learned gate vector per expert and layer) a dynamic one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from lorlib_ui.errors import LorlibError

if TYPE_CHECKING:
    from lorlib_ui.routed_model import LibraryLinear

MIXES = ("outputs", "parameters")
DEFAULT_TOP_K = 4  # capped at the number of experts


@dataclass
class Routing:
    """A dynamic router's decision for n tokens: dense weights, or the top-k experts per token."""

    logits: torch.Tensor  # (n, experts): the router's scores before top-k
    weights: torch.Tensor | None = None  # (n, experts)
    index: torch.Tensor | None = None  # (n, k): the chosen experts ...
    top: torch.Tensor | None = None  # (n, k): ... and their weights

    def dense(self) -> torch.Tensor:
        if self.weights is None:
            self.weights = torch.zeros_like(self.logits).scatter_(-1, self.index, self.top)
        return self.weights


class Router:
    name: ClassVar[str]
    static: ClassVar[bool] = True
    applies_experts: ClassVar[bool] = True
    mix: str = "outputs"
    top_k: int | None = None  # a dynamic router that picks at most top_k experts per token
    group: str | None = None  # the experts it may use: a named group of the library, or all
    subset: tuple[int, ...] | None = None  # ... and their indices

    def limit(self, group: str, subset: tuple[int, ...]) -> Router:
        self.group, self.subset = group, subset
        return self

    def weights(self, slot: LibraryLinear) -> torch.Tensor:
        """Static routers: one weight per expert (experts,), the same for every token."""
        raise NotImplementedError

    def route(self, slot: LibraryLinear, dots: torch.Tensor) -> Routing:
        """Dynamic routers: weights per token from dots = h·key_e, (tokens, experts)."""
        raise NotImplementedError

    @property
    def key(self) -> tuple:
        """Identifies a static router's weights, for the layers' cache of merged factors."""
        return (self.name, self.mix, self.subset)

    def describe(self) -> str:
        return self.name + (f"@{self.group}" if self.group else "")


class BaseRouter(Router):
    """The base model alone: no expert is applied."""

    name = "base"
    applies_experts = False

    def weights(self, slot):
        return torch.zeros(slot.n_experts, device=slot.present.device)


class ExpertRouter(Router):
    """One named expert, as if it were the only adapter."""

    name = "expert"

    def __init__(self, expert: str, index: int):
        self.expert, self.index = expert, index

    @property
    def key(self):
        return (self.name, self.index)

    def weights(self, slot):
        weights = torch.zeros(slot.n_experts, device=slot.present.device)
        weights[self.index] = 1.0
        return weights

    def describe(self):
        return f"expert:{self.expert}"


class UniformRouter(Router):
    """µ: the uniform merge, mean of the A's and mean of the B's (as in the paper's code).

    At a layer that only some experts adapt, the mean is over those experts.
    """

    name = "uniform"
    mix = "parameters"

    def weights(self, slot):
        usable, n = slot.usable(self.subset)
        return usable.float() / max(n, 1)


class MeanDeltaRouter(UniformRouter):
    """Mean of the experts' updates ΔW_e = s_e B_e A_e (over the experts adapting the layer)."""

    name = "mean_delta"
    mix = "outputs"


class ArrowRouter(Router):
    """Arrow (Ostapenko et al., 2024, Sec. 4.2): logits |h·v_e| against each expert's prototype,
    top-k, softmax over the top-k with temperature T. Experts that do not adapt the layer
    cannot be chosen there."""

    name = "arrow"
    static = False

    def __init__(self, top_k: int, temperature: float = 1.0, mix: str = "outputs"):
        self.top_k, self.temperature, self.mix = top_k, temperature, mix

    def route(self, slot, dots):
        logits = dots.float().abs()  # |h·v_e|
        usable, n = slot.usable(self.subset)
        if n == 0:  # none of this router's experts adapts the layer
            return Routing(logits, weights=torch.zeros_like(logits))
        k = min(self.top_k, n)
        scores = logits.masked_fill(~usable, float("-inf")) if n < slot.n_experts else logits
        top, index = torch.topk(scores, k, dim=-1)
        return Routing(logits, index=index, top=torch.softmax(top / self.temperature, dim=-1))

    def describe(self):
        group = f"@{self.group}" if self.group else ""
        return f"arrow{group}(top_k={self.top_k}, T={self.temperature:g}, mix={self.mix})"


ROUTERS: dict[str, type[Router]] = {
    r.name: r for r in (BaseRouter, ExpertRouter, UniformRouter, MeanDeltaRouter, ArrowRouter)
}


def make_router(
    spec: str,
    experts: list[str],
    top_k: int | None = None,
    temperature: float = 1.0,
    mix: str = "outputs",
    groups: dict[str, list[str]] | None = None,
) -> Router:
    """Build a router from a CLI/UI spec: arrow, uniform, mean_delta, base or expert:NAME, the
    first three optionally limited to a group of experts named in `groups` (arrow@private)."""
    spec, _, group = spec.partition("@")
    name, _, arg = spec.partition(":")
    if name not in ROUTERS:
        raise LorlibError(f"unknown router {spec!r}; use one of arrow, uniform, mean_delta, base, expert:NAME")
    if group:
        if name not in ("arrow", "uniform", "mean_delta"):
            raise LorlibError(f"only arrow, uniform and mean_delta can be limited to a group, not {spec!r}")
        members = (groups or {}).get(group)
        if not members:
            known = ", ".join(g for g, m in (groups or {}).items() if m) or "none"
            raise LorlibError(f"no experts in group {group!r} (groups: {known})")
        router = make_router(spec, members, top_k, temperature, mix)
        return router.limit(group, tuple(experts.index(m) for m in members))
    if name != "base" and not experts:
        raise LorlibError(f"router {spec!r} needs experts, but the library is empty")
    if mix not in MIXES:
        raise LorlibError(f"unknown mix {mix!r}; use outputs or parameters")
    if name == "expert":
        if arg not in experts:
            raise LorlibError(f"unknown expert {arg!r} (experts: {', '.join(experts) or 'none'})")
        return ExpertRouter(arg, experts.index(arg))
    if name == "arrow":
        k = min(DEFAULT_TOP_K, len(experts)) if top_k is None else top_k
        if not 1 <= k <= len(experts):
            raise LorlibError(f"top-k must be between 1 and the number of experts ({len(experts)}), got {k}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise LorlibError(f"temperature must be positive, got {temperature}")
        return ArrowRouter(k, float(temperature), mix)
    return ROUTERS[name]()
