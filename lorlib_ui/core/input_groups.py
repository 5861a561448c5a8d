"""Routed layers that read the same input, routed together when decoding one token.

In a Llama-style block q, k and v project the same hidden state, and so do an MLP's gate and up.
Decoding one token, each routed layer costs some twenty small tensor operations whose fixed
overhead, not their arithmetic, makes the step slower than the base model's (BENCHMARKS.md, Scale). A group
does the work of its members at once, the first time one of them runs on a new input:

    scores    one matmul of h against all members' keys, stacked (G·E, d_in), read as G rows
    routing   one call of the router on those G rows (top-k and softmax are row by row)
    A side    one gather of the chosen rows of all members' A and one matmul with h
    B side    per member (their output sizes differ): its chosen rows of Bᵀ

and hands each member its own result when it runs. For per-token top-k routers the last three
steps are one call of the C decoding kernel (`lorlib_ui.core.decode_kernel`) where it is compiled,
with the tensor operations above as its fallback. The members' A factors and prototypes live in
one buffer per group (each member's are views into it), so nothing is copied per step and no
memory is added; key sets attached later (gates, activations) are stacked once per group.

The arithmetic per member is the same as its own path, so the result equals it (tested).
If a member turns out to be called with another input than the first one (a model that does not
share the input after all), the group stops fusing and every member routes alone.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lorlib_ui.core.decode_kernel import DecodePlan, chosen_weights, decodes
from lorlib_ui.core.routers.base import RowSlot, TokenRouter
from lorlib_ui.core.routers.per_token import TopKRouter

# Llama-style names of sibling layers that read one input (attention, MLP)
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def input_groups(layers: dict) -> list[InputGroup]:
    """Group the routed layers `layers` (name -> LibraryLinear) that share an input: siblings named
    as in SHARED_INPUT with the same input size, expert count and rank."""
    groups = []
    parents = {name.rpartition(".")[0] for name in layers}
    for parent in sorted(parents):
        for names in SHARED_INPUT:
            members = [layers[f"{parent}.{n}"] for n in names if f"{parent}.{n}" in layers]
            shapes = {(m.base.in_features, m.n_experts, m.rank, m.lora_a.dtype) for m in members}
            if len(members) >= 2 and len(shapes) == 1:
                groups.append(InputGroup(members))
    return groups


class InputGroup:
    """Routed layers of one block that read the same input (see the module's docstring)."""

    def __init__(self, members: list):
        self.members = members
        self.n_experts, self.rank = members[0].n_experts, members[0].rank
        e, r, d = self.n_experts, self.rank, members[0].base.in_features
        # one buffer for the members' A factors and one for their prototypes; members keep views
        self.lora_a = torch.cat([m.lora_a.view(e, r, d) for m in members])  # (G·E, r, d)
        self.prototypes = _stack_keys([m.prototypes for m in members])  # (G·E, d)
        for g, member in enumerate(members):
            member.share_buffers(self.lora_a[g * e : (g + 1) * e].view(e * r, d), self.prototypes[g * e : (g + 1) * e])
            member.group = self
        self.offsets = (torch.arange(len(members), device=self.lora_a.device) * e).unsqueeze(-1)  # (G, 1)
        self.fusing = True
        self._keys: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._fits: dict[tuple, bool] = {}
        self._input: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None  # the members' scales stacked, and with them ...
        self._plan: DecodePlan | None = None  # ... the decoding kernel's plan (None: tensor operations)
        self._slots: dict[tuple[int, ...] | None, _GroupSlot] = {}
        self._results: dict[str, tuple] = {}

    def stop(self) -> None:
        """Route every member alone from now on (its buffers were moved, or inputs differ)."""
        self.fusing = False
        self._results.clear()
        self._input = None

    def changed(self) -> None:
        """A member's experts changed: what was stacked from them is stale."""
        self._scales = None
        self._keys.clear()
        self._results.clear()
        self._input = None

    def fits(self, router: TokenRouter) -> bool:
        """Whether `router` can route the members together: a per-token top-k router (it routes
        each row of its scores alone) that scores key vectors, on each member's own experts, with
        as many usable experts in each."""
        if router.key not in self._fits:
            usable = {m.usable(router.subset)[1] for m in self.members}
            self._fits[router.key] = (
                isinstance(router, TopKRouter)
                and router.keys is not None
                and all(router.stack(m) is m.stack for m in self.members)
                and len(usable) == 1
                and usable.pop() > 0
            )
        return self._fits[router.key]

    def result(self, member, router: TopKRouter, h: torch.Tensor, x: torch.Tensor, record: bool):
        """(weights, logits, delta) of `member` for its one-token input `x` (h: x as (1, d_in)), or
        None when the members turn out not to share their input (then each routes alone)."""
        same = self._input is not None and self._input is x  # held here, so never another's id
        if same and member.name in self._results:
            return self._results.pop(member.name)
        if not same and self._results:  # a member before this one never took its result
            self.stop()
            return None
        self._input = x
        self._results = self._route(router, h, record)
        return self._results.pop(member.name)

    def _stacked_keys(self, kind: str) -> torch.Tensor:
        if kind == "prototypes":
            return self.prototypes
        keys = tuple(m.keys[kind] for m in self.members)
        held = self._keys.get(kind)
        # the tensors themselves are held, so a key set attached again is a new object, never an old id
        if held is None or any(a is not b for a, b in zip(held[0], keys)):
            self._keys[kind] = (keys, _stack_keys(keys))
        return self._keys[kind][1]

    def _route(self, router: TopKRouter, h: torch.Tensor, record: bool) -> dict[str, tuple]:
        g, e, r = len(self.members), self.n_experts, self.rank
        scores = F.linear(h, self._stacked_keys(router.keys)).view(g, e)
        if router.subset not in self._slots:
            self._slots[router.subset] = _GroupSlot(self.members, router.subset)
        slot = self._slots[router.subset]
        if self._scales is None:
            self._scales = torch.cat([m.scales for m in self.members])
            bts = [m.lora_bt for m in self.members]
            self._plan = DecodePlan.build(self.lora_a.view(g * e * r, -1), self._scales, bts, e)
        if self._plan is not None and decodes(router, h):  # all that follows the scores, in C
            logits, usable, k = router.choices(slot, scores, h)
            if k and self._plan(h, logits, usable, k, router.temperature, router.mix):
                return {
                    m.name: (chosen_weights(self._plan, i, k, e) if record else None, logits[i : i + 1], out)
                    for i, (m, out) in enumerate(zip(self.members, self._plan.outputs))
                }
        routing = router.route(slot, scores, h)
        index, top = routing.index, routing.top  # (G, k)
        k = index.shape[1]
        flat = (index + self.offsets).view(-1)
        a = self.lora_a.index_select(0, flat).view(g * k * r, -1)
        z = F.linear(h, a if a.dtype == h.dtype else a.to(h.dtype)).view(g, k * r)
        scales = self._scales.index_select(0, flat).view(g, k)
        coefficients = self.members[0].coefficients(z, top, scales, router.mix)  # (G, k·r)
        out = {}
        for i, member in enumerate(self.members):
            bt = member.lora_bt.view(e, r, -1).index_select(0, index[i]).view(k * r, -1)
            delta = coefficients[i : i + 1] @ (bt if bt.dtype == h.dtype else bt.to(h.dtype))
            weights = None
            if record:
                weights = top.new_zeros(1, e).scatter_(1, index[i : i + 1], top[i : i + 1])
            out[member.name] = (weights, routing.logits[i : i + 1], delta)
        return out


def _stack_keys(keys) -> torch.Tensor:
    """The members' key sets stacked (G·E, d) and stored expert-major, as each member's are
    (`lorlib_ui.core.routed_model.expert_major`): one contiguous (d, G·E) read by one matmul."""
    return torch.cat([k.T for k in keys], dim=1).T


class _GroupSlot(RowSlot):
    """The group's G rows as a top-k router reads them (`RowSlot`): which experts each member
    may use (G, E) and how many (the same for all: `InputGroup.fits`)."""

    def __init__(self, members: list, subset: tuple[int, ...] | None):
        masks = [m.usable(subset) for m in members]
        self.n_experts = members[0].n_experts
        self._usable = (torch.stack([mask for mask, _ in masks]), masks[0][1])

    def usable(self, subset: tuple[int, ...] | None) -> tuple[torch.Tensor, int]:
        return self._usable
