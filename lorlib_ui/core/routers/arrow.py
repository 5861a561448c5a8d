"""Arrow (Ostapenko et al., 2024, Sec. 4.2): zero-shot routing by the experts' prototypes.

Each expert's prototype v_e at a layer is the top right singular vector of its ΔW_e
(`lorlib_ui.core.prototypes`). A token's input h is scored against every prototype by |h·v_e|
(the sign of a singular vector is arbitrary, hence the absolute value); the top-k experts get
softmax(score / T) weights and the others 0. Experts that do not adapt the layer cannot be chosen
there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.base import DEFAULT_TOP_K, Router, RouterSettings, Routing


@dataclass(frozen=True)
class ArrowRouter(Router):
    name: ClassVar[str] = "arrow"
    summary: ClassVar[str] = "Arrow: each token to the top-k experts by |h·prototype|"
    static: ClassVar[bool] = False
    groupable: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ("top_k", "temperature", "mix")
    presets: ClassVar[dict[str, str]] = {"arrow": "arrow@private", "arrow-cluster": "arrow@cluster"}

    top_k: int = DEFAULT_TOP_K
    temperature: float = 1.0

    @classmethod
    def from_spec(cls, argument: str, experts: list[str], settings: RouterSettings) -> Router:
        k = min(DEFAULT_TOP_K, len(experts)) if settings.top_k is None else settings.top_k
        if not 1 <= k <= len(experts):
            raise LorlibError(f"top-k must be between 1 and the number of experts ({len(experts)}), got {k}")
        if not (math.isfinite(settings.temperature) and settings.temperature > 0):
            raise LorlibError(f"temperature must be positive, got {settings.temperature}")
        return cls(mix=settings.mix, top_k=k, temperature=float(settings.temperature))

    def route(self, slot, dots):
        logits = dots.float().abs()  # |h·v_e|
        usable, n = slot.usable(self.subset)
        if n == 0:  # none of this router's experts adapts the layer
            return Routing(logits, weights=logits.new_zeros(logits.shape))
        k = min(self.top_k, n)
        scores = logits.masked_fill(~usable, float("-inf")) if n < slot.n_experts else logits
        top, index = scores.topk(k, dim=-1)
        return Routing(logits, index=index, top=(top / self.temperature).softmax(dim=-1))

    def describe(self):
        group = f"@{self.group}" if self.group else ""
        return f"arrow{group}(top_k={self.top_k}, T={self.temperature:g}, mix={self.mix})"
