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
from dataclasses import dataclass, replace

import torch

from lorlib_ui.core.adapters import LoraAdapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router
from lorlib_ui.core.routers.poly import PolyTraining, mixed_factors
from lorlib_ui.training.config import TrainConfig
from lorlib_ui.training.training import Fit, encode_examples, fit, pad_id

LORA_METHODS = ("scratch", "mu", "shared")  # a LoRA trained by PEFT on the plain base model
ROUTER_METHODS = ("poly-router", "poly-full")  # a router learned on the routed model
ROUTER_LEARNING_RATE = 0.1  # the paper's code: module_logits_learning_rate


def mu_adapter(rm: RoutedModel, experts: list[str], config: TrainConfig) -> LoraAdapter:
    """µ of `experts` as one LoRA of the config's rank and alpha: the uniform router's merge
    (`uniform`, mix "parameters": at each module the mean A and the mean s_e·B_e over the experts
    that adapt it), so that training starts exactly where that router routes."""
    if not experts:
        raise LorlibError(f"library {rm.library.path} has no private experts to average")
    uniform = make_router("uniform@mixed", rm.experts, mix="parameters", groups={"mixed": experts})
    merged = rm.merged_adapter(uniform)
    if merged.rank > config.rank:
        raise LorlibError(f"µ of these experts has rank {merged.rank}, above the rank {config.rank}")
    return merged.at_rank(config.rank, config.alpha or 2 * config.rank)


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
            a, bt = mixed_factors(layer, index)
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
