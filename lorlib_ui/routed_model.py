"""A base model with every expert of a library attached, routed per token by a `Router`.

Each LoRA'd nn.Linear is replaced by a `LibraryLinear` that keeps, built once:

    lora_a  (E·r, d_in)   all experts' A stacked          (zero-padded to the largest rank r)
    lora_b  (d_out, E·r)  all experts' s_e·B_e side by side

so the low-rank projections of all E experts cost one matmul, z = h·lora_aᵀ (tokens x E·r), the
router's per-token weights scale z in place, and one more matmul maps back through lora_b. No
tokens x experts x d_out tensor is ever built and no weights are re-stacked per forward; these are
what make PEFT's Arrow slow and memory-hungry with many experts.

Zero padding makes mixed ranks exact: zero rows of A and zero columns of B add nothing.
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
        d_out, d_in = base.out_features, base.in_features
        opts = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("lora_a", torch.zeros(self.n_experts * self.rank, d_in, **opts), persistent=False)
        self.register_buffer("lora_b", torch.zeros(d_out, self.n_experts * self.rank, **opts), persistent=False)
        # prototypes stay float32 even under a bf16 model: routing scores decide top-k, and
        # bf16 rounding would flip close choices
        protos = torch.zeros(self.n_experts, d_in, device=base.weight.device)
        self.register_buffer("prototypes", protos, persistent=False)
        present = torch.tensor([r > 0 for r in ranks], device=base.weight.device)
        self.register_buffer("present", present, persistent=False)
        self.n_present = int(present.sum())
        self._merged: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def set_expert(self, e: int, a: torch.Tensor, b: torch.Tensor, scale: float, prototype: torch.Tensor) -> None:
        r = a.shape[0]
        self.lora_a.view(self.n_experts, self.rank, -1)[e, :r] = a.to(self.lora_a.dtype)
        self.lora_b.view(-1, self.n_experts, self.rank)[:, e, :r] = b.float().mul(scale).to(self.lora_b.dtype)
        self.prototypes[e] = prototype.float()
        self._merged.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        router = self.state.router
        if router is None:
            return y
        h = x.reshape(-1, x.shape[-1]).to(self.lora_a.dtype)
        routing = router.route(self, h)
        if self.state.record is not None:
            self.state.record.add(self.name, routing.weights, routing.logits, h.shape[0])
        if not router.applies_experts:
            return y
        if router.static:
            a, b = self._merged_factors(router, routing.weights)
            delta = (h @ a.T) @ b.T
        else:
            delta = self._mix(h, routing.weights, router.mix)
        return y + delta.view(*x.shape[:-1], -1).to(y.dtype)

    def _mix(self, h: torch.Tensor, w: torch.Tensor, mix: str) -> torch.Tensor:
        n, e, r = h.shape[0], self.n_experts, self.rank
        z = (h @ self.lora_a.T).view(n, e, r)  # every expert's projection A_e h, one matmul
        w = w.to(z.dtype).unsqueeze(-1)  # (n, e, 1)
        if mix == "outputs":  # Σ_e w_e s_e B_e (A_e h)
            z = z * w
        else:  # (Σ_e w_e s_e B_e)(Σ_f w_f A_f h) = Σ_e s_e B_e (w_e · u), u = Σ_f w_f A_f h
            z = w * (z * w).sum(dim=1, keepdim=True)
        return z.reshape(n, e * r) @ self.lora_b.T

    def _merged_factors(self, router: Router, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A static router's merge folded into one low-rank pair (a, b), cached per router."""
        if router.key not in self._merged:
            e, r = self.n_experts, self.rank
            a = self.lora_a.view(e, r, -1)
            b = self.lora_b.view(-1, e, r)
            w = w.to(a.dtype)
            if router.mix == "outputs":  # concatenate the experts with non-zero weight
                used = torch.nonzero(w).flatten()
                merged = (a[used].reshape(-1, a.shape[-1]), (b[:, used] * w[used, None]).reshape(b.shape[0], -1))
            else:  # Σ w_e A_e and Σ w_e s_e B_e
                merged = (torch.einsum("e,erd->rd", w, a), torch.einsum("e,oer->or", w, b))
            self._merged[router.key] = merged
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
