"""What every per-token top-k router shares: score each expert per token, keep the top k among
the experts that adapt the layer, weight them by softmax(score / T), give the others 0.

A subclass says what its score is (`logits`) and which key vectors it reads (`TokenRouter.keys`):
Arrow's |h·v_e|, the hidden-state baseline's h·v_e, PhatGoose's gate cosine, spectral routing's
‖s_e B_e A_e h‖. It does not change `route`: decoding on a CPU repeats it in one compiled call
(`lorlib_ui.core.decode_kernel`). Its settings are a `TopKConfig`, which checks them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.base import DEFAULT_TOP_K, Routing, RowSlot, TokenRouter, check_mix


@dataclass(frozen=True)
class TopKConfig:
    """What a user sets on a top-k router (`--top-k`, `--temperature`, `--mix`)."""

    experts: int  # how many experts it routes among: top-k is at most that
    top_k: int | None = None  # None: the router's default, or all experts if fewer
    temperature: float = 1.0
    mix: str = "outputs"

    def __post_init__(self):
        if self.top_k is not None and not 1 <= self.top_k <= self.experts:
            raise LorlibError(f"top-k must be between 1 and the number of experts ({self.experts}), got {self.top_k}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LorlibError(f"temperature must be positive, got {self.temperature}")
        check_mix(self.mix)


@dataclass(frozen=True)
class TopKRouter(TokenRouter):
    groupable: ClassVar[bool] = True
    default_top_k: ClassVar[int] = DEFAULT_TOP_K  # capped at the number of experts

    top_k: int = DEFAULT_TOP_K
    temperature: float = 1.0

    @classmethod
    def build(cls, argument: str, experts: list[str], config: TopKConfig) -> TopKRouter:
        k = min(cls.default_top_k, config.experts) if config.top_k is None else config.top_k
        return cls(mix=config.mix, top_k=k, temperature=float(config.temperature))

    def logits(self, slot: RowSlot, scores: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Each expert's score per token (tokens, experts), higher is better; see `TokenRouter.route`.
        A router that scores key vectors reads no more of `slot` than a `RowSlot`, so an input
        group can hand it the rows of several layers at once."""
        raise NotImplementedError(f"{type(self).__name__} must say how it scores")

    def choices(self, slot: RowSlot, scores, h) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """What the top-k is taken over: the logits (tokens, experts) float32, the usable experts
        (experts,) bool or None when all are, and k (0 when none is usable)."""
        logits = self.logits(slot, scores, h)
        if logits.dtype != torch.float32:
            logits = logits.float()
        usable, n = slot.usable(self.subset)
        return logits, (usable if n < slot.n_experts else None), min(self.top_k, n)

    def route(self, slot: RowSlot, scores, h):
        # decoding on a CPU, `lorlib_ui.core.decode_kernel` does what follows `choices` in one call
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
