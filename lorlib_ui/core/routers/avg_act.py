"""The hidden-state baseline (Ostapenko et al., 2024, Sec. 6; `avg_act` in their code).

Each expert's key at a layer is the L2-normalised mean input hidden state of the base model over
examples of the expert's own tasks (`lorlib_ui.training.keys`, stored in the library as
"activations"). A token is scored by h·v_e, signed (unlike Arrow's singular vectors, a mean has a
meaningful sign), divided by √d as in the paper's code, then top-k and softmax(score / T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lorlib_ui.core.routers.base import register
from lorlib_ui.core.routers.per_token import TopKConfig, TopKRouter


@register(TopKConfig)
@dataclass(frozen=True)
class AverageActivationRouter(TopKRouter):
    name: ClassVar[str] = "avg_act"
    summary: ClassVar[str] = "hidden states: each token to the top-k experts by h·(mean hidden state of their tasks)"
    keys: ClassVar[str | None] = "activations"
    needs: ClassVar[str | None] = "activations"
    presets: ClassVar[dict[str, str]] = {"avg_act": "avg_act@private"}

    def logits(self, slot, scores, h):
        return scores / math.sqrt(h.shape[-1])
