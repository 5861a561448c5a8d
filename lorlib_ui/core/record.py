"""The routing record: which experts every token used at every LoRA'd layer.

Captured on request while a routed model runs (`routed_model.RecordBuilder`; nothing is kept
otherwise) and handed across the worker boundary as plain numpy arrays: this module imports no
torch, so the UI can hold records. Figures and the CLI's JSON are built from it by pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RoutingRecord:
    router: str
    experts: list[str]
    modules: list[str]  # LoRA'd linear layers, in model order
    tokens: list[str]  # every routed token: prompt, then generated
    weights: np.ndarray  # (modules, tokens, experts); rows sum to 1 (0 for the base router)
    logits: np.ndarray  # (modules, tokens, experts); NaN where the router computes none

    def layer_expert_weights(self) -> np.ndarray:
        """(modules, experts): mean routing weight over tokens."""
        if not self.tokens:
            return np.zeros((len(self.modules), len(self.experts)), dtype=np.float32)
        return self.weights.mean(axis=1)

    def top_expert(self) -> np.ndarray:
        """(tokens, modules): index of each token's highest-weighted expert, -1 where none is used."""
        if self.weights.size == 0:  # no expert or no LoRA'd layer
            return np.full((len(self.tokens), len(self.modules)), -1)
        top = self.weights.argmax(axis=2).T
        return np.where(self.weights.max(axis=2).T > 0, top, -1)

    def to_dict(self) -> dict:
        names = self.experts
        return {
            "router": self.router,
            "experts": names,
            "layers": self.modules,
            "tokens": self.tokens,
            "layer_expert_weights": np.round(self.layer_expert_weights(), 6).tolist(),
            "top_expert": [[names[i] if i >= 0 else None for i in row] for row in self.top_expert().tolist()],
        }
