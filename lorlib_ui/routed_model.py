"""A base model with every expert of a library attached, routed per token by a `Router`.

Each LoRA'd nn.Linear is replaced by a `LibraryLinear` that keeps, built once:

    keys_and_a  (E + E·r, d_in)  the routing keys (Arrow's prototypes), then all experts' A stacked
    lora_bt     (E·r, d_out)     all experts' (s_e·B_e)ᵀ stacked

(each expert zero-padded to the largest rank r: zero rows add nothing, so mixed ranks are exact).

Many tokens (prefill, scoring): one matmul gives every token's routing scores and all E experts'
projections A_e h; the router's weights scale those in place; one more matmul maps back through
lora_bt. No tokens x experts x d_out tensor is ever built and no weights are re-stacked per
forward; these are what make PEFT's Arrow slow and memory-hungry with many experts.

One token (decoding) on a CPU: the step is bound by memory traffic, not arithmetic, so after
scoring the experts we gather the rows of only the top-k chosen, instead of reading every
expert's weights for one token. (On a GPU the dense path is cheap.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorlib_ui.adapters import read_ranks
from lorlib_ui.base_model import linear_shapes, load_base_model, shapes_fingerprint
from lorlib_ui.errors import LorlibError
from lorlib_ui.library import Library
from lorlib_ui.record import RecordBuilder
from lorlib_ui.routers import Router


@dataclass
class RoutingState:
    """Shared by all layers of one routed model: the active router and, if asked, the record."""

    router: Router | None = None
    record: RecordBuilder | None = None


class LibraryLinear(nn.Module):
    """nn.Linear plus every library expert that adapts it."""

    def __init__(self, name: str, base: nn.Linear, ranks: list[int], state: RoutingState):
        """`ranks[e]` is expert e's rank at this layer, 0 where it does not adapt it; the
        factors are filled in afterwards, one expert at a time, by `set_expert`."""
        super().__init__()
        self.name, self.base, self.state = name, base, state
        self.n_experts, self.rank = len(ranks), max(ranks)
        e, r = self.n_experts, self.rank
        opts = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("keys_and_a", torch.zeros(e + e * r, base.in_features, **opts), persistent=False)
        self.register_buffer("lora_bt", torch.zeros(e * r, base.out_features, **opts), persistent=False)
        present = torch.tensor([rank > 0 for rank in ranks], device=base.weight.device)
        self.register_buffer("present", present, persistent=False)
        self.n_present = int(present.sum())
        self.gather_chosen = base.weight.device.type == "cpu"
        self._merged: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def prototypes(self) -> torch.Tensor:
        return self.keys_and_a[: self.n_experts]

    @property
    def lora_a(self) -> torch.Tensor:
        return self.keys_and_a[self.n_experts :]

    @torch.no_grad()
    def set_expert(self, e: int, a: torch.Tensor, b: torch.Tensor, scale: float, prototype: torch.Tensor) -> None:
        r = a.shape[0]
        self.lora_a.view(self.n_experts, self.rank, -1)[e, :r] = a.to(self.lora_a.dtype)
        self.lora_bt.view(self.n_experts, self.rank, -1)[e, :r] = b.T.float().mul(scale).to(self.lora_bt.dtype)
        self.prototypes[e] = prototype.to(self.prototypes.dtype)
        self._merged.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        router = self.state.router
        if router is None:
            return y
        h = x.reshape(-1, x.shape[-1]).to(self.keys_and_a.dtype)
        if router.static:
            weights, a, bt = self._merged_factors(router)
            logits = None
            delta = (h @ a.T) @ bt if router.applies_experts else None
        else:
            weights, logits, delta = self._route(router, h)
        if self.state.record is not None:
            self.state.record.add(self.name, weights, logits, h.shape[0])
        if delta is None:
            return y
        return y + delta.view(*x.shape[:-1], -1).to(y.dtype)

    def _route(self, router: Router, h: torch.Tensor):
        e, r = self.n_experts, self.rank
        if self.gather_chosen and h.shape[0] == 1 and router.top_k is not None and 2 * router.top_k <= e:
            routing = router.route(self, h @ self.prototypes.T)
            chosen = routing.index[0]
            a = self.lora_a.view(e, r, -1).index_select(0, chosen).flatten(0, 1)
            bt = self.lora_bt.view(e, r, -1).index_select(0, chosen).flatten(0, 1)
            delta = self._mix(h @ a.T, routing.top, bt, router.mix)
        else:
            projected = h @ self.keys_and_a.T  # [h·key_e | A_e h for every expert], one matmul
            routing = router.route(self, projected[:, :e])
            delta = self._mix(projected[:, e:], routing.dense(), self.lora_bt, router.mix)
        weights = routing.dense() if self.state.record is not None else None
        return weights, routing.logits, delta

    def _mix(self, z: torch.Tensor, w: torch.Tensor, bt: torch.Tensor, mix: str) -> torch.Tensor:
        """z: projections A_e h of m experts (tokens, m·r); w: their weights (tokens, m);
        bt: their stacked (s_e B_e)ᵀ (m·r, d_out)."""
        n, m = w.shape
        z = z.view(n, m, self.rank)
        w = w.to(z.dtype).unsqueeze(-1)
        if mix == "outputs":  # Σ_e w_e s_e B_e (A_e h)
            z = z * w
        else:  # (Σ_e w_e s_e B_e)(Σ_f w_f A_f h) = Σ_e s_e B_e (w_e · u), u = Σ_f w_f A_f h
            z = w * (z * w).sum(dim=1, keepdim=True)
        return z.flatten(1) @ bt

    def _merged_factors(self, router: Router) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A static router's weights and its merge folded into one low-rank pair (a, bt), cached."""
        if router.key not in self._merged:
            w = router.weights(self)
            e, r = self.n_experts, self.rank
            a = self.lora_a.view(e, r, -1)
            bt = self.lora_bt.view(e, r, -1)
            wa = w.to(a.dtype)
            if router.mix == "outputs":  # the experts with non-zero weight, side by side
                used = torch.nonzero(wa).flatten()
                merged = (a[used].flatten(0, 1), (bt[used] * wa[used, None, None]).flatten(0, 1))
            else:  # Σ w_e A_e and Σ w_e (s_e B_e)ᵀ
                merged = (torch.einsum("e,erd->rd", wa, a), torch.einsum("e,ero->ro", wa, bt))
            self._merged[router.key] = (w, *merged)
        return self._merged[router.key]


class RoutedModel:
    """A causal LM with all experts of a library attached to its linear layers."""

    def __init__(self, model: nn.Module, tokenizer, library: Library):
        fingerprint = shapes_fingerprint(linear_shapes(model))
        if fingerprint != library.base_fingerprint:
            raise LorlibError(
                f"this base model does not fit library {library.path}, which was built on "
                f"{library.base_model!r} (linear layer shapes differ)"
            )
        self.model, self.tokenizer, self.library = model, tokenizer, library
        self.experts = library.names
        self.state = RoutingState()
        # Experts stream in one at a time into preallocated buffers, so building never holds
        # the whole library twice (256 experts on SmolLM2 are about 0.5 GB in float32).
        ranks = {x: read_ranks(library.path / library.expert(x).path) for x in self.experts}
        self.modules = [name for name, _ in model.named_modules() if any(name in r for r in ranks.values())]
        layers = {}
        for name in self.modules:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            per_expert = [ranks[x].get(name, 0) for x in self.experts]
            layers[name] = LibraryLinear(name, getattr(parent, child), per_expert, self.state)
            setattr(parent, child, layers[name])
        protos = library.prototypes()
        for e, expert in enumerate(self.experts):
            adapter = library.load_adapter(expert)
            if adapter.ranks != ranks[expert]:
                raise LorlibError(f"expert {expert} changed on disk while the model was being built; try again")
            for module, (a, b) in adapter.factors.items():
                layers[module].set_expert(e, a, b, adapter.scales[module], protos[expert][module])

    @classmethod
    def load(cls, library: Library, base_model: str | None = None, device: str | None = None, dtype: str | None = None):
        model, tokenizer = load_base_model(base_model or library.base_model, device=device, dtype=dtype)
        return cls(model, tokenizer, library)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def routing(self, router: Router, record: bool = False):
        """Route with `router` inside the block; yields a RecordBuilder when record=True."""
        builder = RecordBuilder(self.modules, len(self.experts)) if record else None
        self.state.router, self.state.record = router, builder
        try:
            yield builder
        finally:
            self.state.router, self.state.record = None, None
