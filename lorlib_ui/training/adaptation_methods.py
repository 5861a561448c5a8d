"""Supervised adaptation: the ways to learn a new task from a few of its examples by reusing a
library, after the paper's second half (Ostapenko et al., 2024, Sec. 6.2; their code's
`finetune_experts.py`, whose `finetune_regime` names are in brackets):

- scratch      a new LoRA, trained as `build` trains a private expert            (`private`)
- mu           a LoRA that starts at µ: the mean A and mean B of the private experts  (`lib_mu`)
- shared       a LoRA that starts at the shared, multi-task expert               (`shared`)
- poly-router  the library frozen; one logit per expert per LoRA'd layer, softmax
               mixing of the experts' outputs, starting uniform                  (`polylib_selector`)
- poly-full    the same router, with the mixed experts' factors trained as well  (`polylib_full`)
- lorahub      LoraHub's gradient-free merge (`lorlib_ui.training.lorahub`)        (`nevergrad`)

Every gradient method runs the same loop (`lorlib_ui.training.training.fit`) on the same examples.
The routers' logits get their own learning rate, 0.1, as in the paper's code
(`module_logits_learning_rate`); the factors keep the experts' learning rate. This module holds
the methods; `lorlib_ui.analysis.adaptation_runs` runs them on a task, stores and scores what they learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from lorlib_ui.core.adapters import LoraAdapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers.base import ExpertStack, Router, Routing
from lorlib_ui.core.routers.poly import poly_weights
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.training import Fit, encode_examples, fit, pad_id

LORA_METHODS = ("scratch", "mu", "shared")  # a LoRA trained by PEFT on the plain base model
ROUTER_METHODS = ("poly-router", "poly-full")  # a router learned on the routed model
ROUTER_LEARNING_RATE = 0.1  # the paper's code: module_logits_learning_rate


def mu_adapter(library: Library, experts: list[str], config: TrainConfig) -> LoraAdapter:
    """µ of `experts` as one LoRA of the config's rank and alpha: at each module, the mean A and
    the mean s_e·B_e over the experts that adapt it, B divided by the config's scale so that the
    adapter computes exactly what the uniform router `uniform` (mix "parameters") does."""
    if not experts:
        raise LorlibError(f"library {library.path} has no private experts to average")
    sums: dict[str, list] = {}
    for name in experts:
        adapter = library.load_adapter(name)
        for module, (a, b) in adapter.factors.items():
            if a.shape[0] > config.rank:
                raise LorlibError(f"expert {name} has rank {a.shape[0]} at {module}, above the rank {config.rank}")
            pad = config.rank - a.shape[0]
            a = torch.cat([a.float(), a.new_zeros(pad, a.shape[1]).float()])
            b = torch.cat([b.float(), b.new_zeros(b.shape[0], pad).float()], dim=1) * adapter.scales[module]
            total = sums.setdefault(module, [torch.zeros_like(a), torch.zeros_like(b), 0])
            total[0] += a
            total[1] += b
            total[2] += 1
    alpha = config.alpha or 2 * config.rank
    scale = alpha / config.rank
    factors = {m: (a / n, b / n / scale) for m, (a, b, n) in sums.items()}
    targets = sorted({m.rsplit(".", 1)[-1] for m in factors})
    lora = {"peft_type": "LORA", "r": config.rank, "lora_alpha": alpha, "target_modules": targets}
    return LoraAdapter(config=lora, factors=factors, scales=dict.fromkeys(factors, scale))


@dataclass(frozen=True, eq=False)
class PolyTraining(Router):
    """A Poly router while it learns: the same weights as `poly:NAME` (`poly_weights`) from
    trainable logits, over a stack of only the mixed experts (their factors trainable too, for
    poly-full). It scores nothing: the layer hands it the experts' projections (keys None)."""

    name: ClassVar[str] = "poly-training"
    summary: ClassVar[str] = "a Poly router in training"
    static: ClassVar[bool] = False
    keys: ClassVar[str | None] = None

    logits: dict = field(default_factory=dict)  # module -> (n,) Parameter
    factors: dict = field(default_factory=dict)  # module -> (A (n·r, d_in), Bᵀ (n·r, d_out)) Parameters

    def route(self, slot, scores, h):
        weights = poly_weights(slot, self.subset, self.logits.get(slot.name))
        mixed = weights.index_select(0, slot.scales.new_tensor(self.subset).long())
        mixed = mixed.unsqueeze(0).expand(scores.shape[0], -1)
        return Routing(mixed, weights=mixed)

    def stack(self, slot):
        index = slot.scales.new_tensor(self.subset).long()
        if slot.name in self.factors:
            a, bt = self.factors[slot.name]
        else:
            a, bt = slot.derived(("poly-training", self.subset), lambda: _rows(slot, index))
        return ExpertStack(slot.keys, a, bt, slot.scales.index_select(0, index))


def _rows(slot, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked factors of the experts at `index` only, in the layer's compute dtype."""
    e, r, dtype = slot.n_experts, slot.rank, slot.prototypes.dtype
    a = slot.lora_a.view(e, r, -1).index_select(0, index).flatten(0, 1).to(dtype)
    bt = slot.lora_bt.view(e, r, -1).index_select(0, index).flatten(0, 1).to(dtype)
    return a, bt


@dataclass
class PolyResult:
    tensors: dict[str, torch.Tensor]  # as `lorlib_ui.core.learned_routers` stores them
    fit: Fit


def train_poly(
    rm: RoutedModel,
    mixed: list[str],
    pairs: list[tuple[str, str]],
    config: TrainConfig,
    full: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> PolyResult:
    """Learn a Poly router over the experts `mixed` of `rm` on (prompt, answer) pairs: the logits
    only (the experts frozen, byte for byte), or with `full` the mixed experts' factors as well
    (trained copies; the library's experts are never changed)."""
    if not mixed:
        raise LorlibError("a Poly router needs experts to mix")
    torch.manual_seed(config.seed)
    rm.model.requires_grad_(False)
    subset = tuple(rm.experts.index(x) for x in mixed)
    index = torch.tensor(subset, device=rm.device)
    layers = {name: layer for name, layer in rm.layers.items() if layer.usable(subset)[1]}
    logits = {name: torch.nn.Parameter(torch.zeros(len(subset), device=rm.device)) for name in layers}
    factors = {}
    if full:
        for name, layer in layers.items():
            a, bt = _rows(layer, index)
            factors[name] = (torch.nn.Parameter(a.float().clone()), torch.nn.Parameter(bt.float().clone()))
    router = replace(PolyTraining(logits=logits, factors=factors), subset=subset)
    groups = [{"params": list(logits.values()), "lr": ROUTER_LEARNING_RATE}]
    if factors:
        groups.append({"params": [p for pair in factors.values() for p in pair], "lr": config.learning_rate})
    encoded = encode_examples(rm.tokenizer, pairs, config.max_length)
    with rm.routing(router):
        run = fit(rm.model, groups, encoded, config, pad_id(rm.tokenizer), progress, cancel)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.logits"] = logits[name].detach()
        if full:
            a, bt = factors[name]
            tensors[f"{name}.lora_a"] = a.detach().view(len(subset), layer.rank, -1)
            tensors[f"{name}.lora_bt"] = bt.detach().view(len(subset), layer.rank, -1)
    return PolyResult(tensors, run)


def trainable_numbers(rm: RoutedModel, mixed: list[str], full: bool) -> int:
    """How many numbers a Poly router over `mixed` trains: one logit per mixed expert per layer,
    plus, with `full`, each mixed expert's (padded) A and B at every layer it adapts."""
    subset = tuple(rm.experts.index(x) for x in mixed)
    total = 0
    for layer in rm.layers.values():
        if layer.usable(subset)[1]:
            total += len(subset)
            if full:
                total += len(subset) * layer.rank * (layer.base.in_features + layer.base.out_features)
    return total
