"""Spectral routing: each token to the experts whose update moves it most, ‖s_e B_e A_e h‖.

Arrow scores a token by |h·v_e|, its component along the top right singular vector of ΔW_e: a
rank-1 proxy for how much expert e would change it. Spectral routing scores the change itself,
the norm of the expert's output, which is what SpectR/SEQR-style routers aim at. It is exact and
cheap with the stacked factors: the projections z_e = A_e h are computed for the output anyway,
and ‖s_e B_e z_e‖² = z_eᵀ G_e z_e with the r x r Gram matrix G_e = s_e² B_eᵀ B_e, computed once
per layer, so scoring adds E·r² multiplications per token (and skips Arrow's E·d prototype matmul).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorlib_ui.core.routers.base import LayerSlot, register
from lorlib_ui.core.routers.per_token import TopKConfig, TopKRouter


@register(TopKConfig)
@dataclass(frozen=True)
class SpectralRouter(TopKRouter):
    name: ClassVar[str] = "spectral"
    summary: ClassVar[str] = "spectral: each token to the top-k experts by the norm of their output ‖s·B·A·h‖"
    keys: ClassVar[str | None] = None  # scores the projections A_e h
    presets: ClassVar[dict[str, str]] = {"spectral": "spectral@private"}

    def logits(self, slot: LayerSlot, scores, h):
        # a whole layer: a router that scores the projections is never routed with an input group
        e, r = slot.n_experts, slot.rank
        gram = slot.derived(("spectral-gram",), lambda: _gram(slot))  # (E, r, r)
        z = scores.view(-1, e, r).to(gram.dtype)
        squared = (_times_gram(z, gram) * z).sum(dim=-1)  # z_eᵀ G_e z_e per token and expert
        return squared.clamp(min=0).sqrt()


def _times_gram(z, gram):
    """(z G)_e for every token: z (n, E, r), G (E, r, r) -> (n, E, r)."""
    return (z.unsqueeze(-2) @ gram).squeeze(-2)


def _gram(slot):
    stack = slot.stack
    bt = stack.lora_bt.view(slot.n_experts, slot.rank, -1).to(stack.scales.dtype)
    return (bt @ bt.transpose(1, 2)) * (stack.scales**2)[:, None, None]  # s_e² B_eᵀ B_e
