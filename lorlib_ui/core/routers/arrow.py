"""Arrow (Ostapenko et al., 2024, Sec. 4.2): zero-shot routing by the experts' prototypes.

Each expert's prototype v_e at a layer is the top right singular vector of its ΔW_e
(`lorlib_ui.core.prototypes`). A token's input h is scored against every prototype by |h·v_e|
(the sign of a singular vector is arbitrary, hence the absolute value); the top-k experts get
softmax(score / T) weights and the others 0. Experts that do not adapt the layer cannot be chosen
there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorlib_ui.core.routers.base import register
from lorlib_ui.core.routers.per_token import TopKConfig, TopKRouter


@register(TopKConfig)
@dataclass(frozen=True)
class ArrowRouter(TopKRouter):
    name: ClassVar[str] = "arrow"
    summary: ClassVar[str] = "Arrow: each token to the top-k experts by |h·prototype|"
    presets: ClassVar[dict[str, str]] = {"arrow": "arrow@private", "arrow-cluster": "arrow@cluster"}

    def logits(self, slot, scores, h):
        return scores.abs()  # |h·v_e|
