"""The routing record: which experts every token used at every LoRA'd layer.

Captured on request while a routed model runs (`routed_model.RecordBuilder`; nothing is kept
otherwise) and handed across the worker boundary as plain numpy arrays: this module imports no
torch, so the UI can hold records. Figures and the CLI's JSON are built from it by pure functions.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np

TOP = 3  # top experts listed per token in the downloads


@dataclass
class RoutingRecord:
    router: str
    experts: list[str]
    modules: list[str]  # LoRA'd linear layers, in model order
    tokens: list[str]  # every routed token: prompt, then generated
    weights: np.ndarray  # (modules, tokens, experts); rows sum to 1 (0 for the base router)
    logits: np.ndarray  # (modules, tokens, experts); NaN where the router computes none
    template: list[int] = field(default_factory=list)  # positions of the chat template's tokens around the prompt

    def content_tokens(self) -> list[int]:
        """The tokens of the user's text and of the answer: every token but the chat template's."""
        template = set(self.template)
        return [i for i in range(len(self.tokens)) if i not in template]

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

    def top_experts(self, k: int = TOP) -> list[list[tuple[str, float]]]:
        """Per token: the k experts with the most weight, averaged over layers."""
        if self.weights.size == 0:
            return [[] for _ in self.tokens]
        mean = self.weights.mean(axis=0)  # (tokens, experts)
        return [[(self.experts[i], float(row[i])) for i in np.argsort(-row)[:k] if row[i] > 0] for row in mean]

    def to_csv(self) -> str:
        """One row per token and layer: the token, the layer, each expert's weight, the top expert."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["token_index", "token", "layer", "top_expert", *self.experts])
        top = self.top_expert()
        for t, token in enumerate(self.tokens):
            for m, module in enumerate(self.modules):
                best = self.experts[top[t, m]] if top[t, m] >= 0 else ""
                writer.writerow([t, token, module, best, *(f"{w:.6f}" for w in self.weights[m, t])])
        return out.getvalue()

    def to_json(self) -> dict:
        """Everything of the record: `to_dict`, every weight (layers x tokens x experts) and each
        token's top experts averaged over layers."""
        return {
            **self.to_dict(),
            "weights": np.round(self.weights, 6).tolist(),
            "top_experts": [[{"expert": e, "weight": round(w, 6)} for e, w in row] for row in self.top_experts()],
        }
