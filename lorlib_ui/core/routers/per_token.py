"""What every per-token top-k router shares: score each expert per token, keep the top k among
the experts that adapt the layer, weight them by softmax(score / T), give the others 0.

A subclass says what its score is (`logits`) and which key vectors it reads (`Router.keys`):
Arrow's |h·v_e|, the hidden-state baseline's h·v_e, PhatGoose's gate cosine, spectral routing's
‖s_e B_e A_e h‖. It does not change `route`: decoding on a CPU repeats it in C
(`lorlib_ui.core.decode_kernel`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.base import DEFAULT_TOP_K, Router, RouterSettings, Routing


@dataclass(frozen=True)
class TopKRouter(Router):
    static: ClassVar[bool] = False
    groupable: ClassVar[bool] = True
    rowwise: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ("top_k", "temperature", "mix")
    default_top_k: ClassVar[int] = DEFAULT_TOP_K  # capped at the number of experts

    top_k: int = DEFAULT_TOP_K
    temperature: float = 1.0

    @classmethod
    def from_spec(cls, argument: str, experts: list[str], settings: RouterSettings) -> Router:
        k = min(cls.default_top_k, len(experts)) if settings.top_k is None else settings.top_k
        if not 1 <= k <= len(experts):
            raise LorlibError(f"top-k must be between 1 and the number of experts ({len(experts)}), got {k}")
        if not (math.isfinite(settings.temperature) and settings.temperature > 0):
            raise LorlibError(f"temperature must be positive, got {settings.temperature}")
        return cls(mix=settings.mix, top_k=k, temperature=float(settings.temperature))

    def logits(self, slot, scores, h):
        """Each expert's score per token (tokens, experts), higher is better; see `Router.route`."""
        raise NotImplementedError

    def choices(self, slot, scores, h) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """What the top-k is taken over: the logits (tokens, experts) float32, the usable experts
        (experts,) bool or None when all are, and k (0 when none is usable)."""
        logits = self.logits(slot, scores, h)
        if logits.dtype != torch.float32:
            logits = logits.float()
        usable, n = slot.usable(self.subset)
        return logits, (usable if n < slot.n_experts else None), min(self.top_k, n)

    def route(self, slot, scores, h):
        # decoding on a CPU, `lorlib_ui.core.decode_kernel` does what follows `choices` in C
        logits, usable, k = self.choices(slot, scores, h)
        if k == 0:  # none of this router's experts adapts the layer
            return Routing(logits, weights=logits.new_zeros(logits.shape))
        masked = logits if usable is None else logits.masked_fill(~usable, float("-inf"))
        top, index = masked.topk(k, dim=-1)
        if self.temperature != 1.0:
            top = top / self.temperature
        return Routing(logits, index=index, top=top.softmax(dim=-1))

    def describe(self):
        group = f"@{self.group}" if self.group else ""
        return f"{self.name}{group}(top_k={self.top_k}, T={self.temperature:g}, mix={self.mix})"
