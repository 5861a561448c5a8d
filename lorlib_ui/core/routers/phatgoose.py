"""PhatGoose (Muqeeth et al., 2024, "Learning to Route Among Specialized Experts for Zero-Shot
Generalization"), a baseline of Ostapenko et al. (2024, Sec. 6).

After an expert is trained, a sigmoid gate σ(g·h) on its output is trained at each layer it
adapts, with everything else frozen (`lorlib_ui.training.keys`, stored in the library as "gates").
Routing compares a token with every expert's gate, both standardised as a LayerNorm without
affine parameters does (the paper's code, `norm_d`): score = LN(h)·LN(g) / √d, top-k (default
2), softmax(score / T). Since LN(g) sums to zero, LN(h)·LN(g) = h·LN(g) / σ(h): the layer holds
LN(g) as the key and the router divides by each token's standard deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lorlib_ui.core.routers.base import register
from lorlib_ui.core.routers.per_token import TopKConfig, TopKRouter

EPS = 1e-5  # torch.nn.LayerNorm's default


def spread(x):
    """sqrt(var + eps) over the last dimension, as LayerNorm divides by."""
    return (x.var(dim=-1, unbiased=False, keepdim=True) + EPS).sqrt()


def standardise(x):
    """(x - mean) / sqrt(var + eps) over the last dimension (LayerNorm without affine)."""
    return (x - x.mean(dim=-1, keepdim=True)) / spread(x)


@register(TopKConfig)
@dataclass(frozen=True)
class PhatGooseRouter(TopKRouter):
    name: ClassVar[str] = "phatgoose"
    summary: ClassVar[str] = "PhatGoose: each token to the top-k experts by its similarity to their trained gates"
    keys: ClassVar[str | None] = "gates"
    needs: ClassVar[str | None] = "gates"
    default_top_k: ClassVar[int] = 2
    presets: ClassVar[dict[str, str]] = {"phatgoose": "phatgoose@private"}

    top_k: int = 2

    @classmethod
    def prepare_keys(cls, raw):
        return standardise(raw)

    def logits(self, slot, scores, h):
        return scores / spread(h.to(scores.dtype)) / math.sqrt(h.shape[-1])
