"""A base model with every expert of a library attached, routed per token by a `Router`.

Each LoRA'd nn.Linear is replaced by a `LibraryLinear` that keeps, built once:

    prototypes  (E, d_in)     the routing keys (Arrow's prototypes), stored expert-major
    lora_a      (E·r, d_in)   all experts' A stacked
    lora_bt     (E·r, d_out)  all experts' Bᵀ stacked
    scales      (E,)          each expert's LoRA scale s_e

(each expert zero-padded to the largest rank r: zero rows add nothing, so mixed ranks are exact).
Experts stored in 16 bits stay in 16 bits in memory and are widened only for the arithmetic,
which is exact and halves their share of memory under a float32 model.

Many tokens (prefill, scoring): one matmul gives all E experts' projections A_e h; the router's
weights scale those in place; one more matmul maps back through lora_bt. No tokens x experts x
d_out tensor is ever built and no weights are re-stacked per forward; these are what make PEFT's
Arrow slow and memory-hungry with many experts.

One token (decoding) on a CPU: the step is bound by memory traffic, not arithmetic, so after
scoring the experts we gather the rows of only the top-k chosen, instead of reading every
expert's weights for one token. (On a GPU the dense path is cheap.) For per-token top-k routers
everything after the scores runs in one call of a compiled function (`decode_kernel`); with many
experts, scoring every expert's key, E·d per layer, is then most of what a step adds to the base
model's.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lorlib_ui.core.adapters import LoraAdapter, PackedAdapter, Span, read_layout, read_packed
from lorlib_ui.core.base_model import linear_shapes, load_base_model, shapes_fingerprint
from lorlib_ui.core.decode_kernel import DecodePlan, chosen_weights, decodes
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.input_groups import InputGroup, input_groups
from lorlib_ui.core.library import Library
from lorlib_ui.core.prototypes import prototype_matrices
from lorlib_ui.core.record import RoutingRecord
from lorlib_ui.core.routers import MergeRouter, Router, TaskRouter, TokenRouter
from lorlib_ui.core.routers.base import ExpertStack

# Experts per chosen expert (E / k) from which computing only the chosen pairs beats the dense
# path for many tokens on a CPU: the dense path costs E·r·d multiply-adds per token, the sparse
# one k·r·d plus the cost of building its index. The ratio comes from timing one layer both ways;
# bench_arrow's lorlib_arrow_dense rows measure it (BENCHMARKS.md, Scale).
DISPATCH_RATIO = 8
FILL_RUN = 32  # experts copied together when building (see RoutedModel._fill)
MERGED_CACHE = 8  # static merges kept folded per layer; a search (LoraHub) tries a new one each step


@dataclass
class RoutingState:
    """Shared by all layers of one routed model: the active router and, if asked, the record."""

    router: Router | None = None
    record: RecordBuilder | None = None


def expert_major(keys: torch.Tensor) -> torch.Tensor:
    """Key vectors (E, d_in) with the same values, stored as the transpose of a contiguous (d_in, E).

    Scoring one token, h·keysᵀ, then reads the matrix as h @ (d_in, E), which on a CPU is faster
    than the matrix-vector product over rows of (E, d_in) that F.linear takes for one row when the
    keys come from memory. With many experts, scoring is most of what a decoding step adds
    (`benchmarks/bench_decode.py`, BENCHMARKS.md, Scale); many tokens run as fast either way."""
    return keys.T.contiguous().T


class LibraryLinear(nn.Module):
    """nn.Linear plus every library expert that adapts it."""

    def __init__(self, name: str, base: nn.Linear, ranks: list[int], state: RoutingState, storage: torch.dtype):
        """`ranks[e]` is expert e's rank at this layer, 0 where it does not adapt it; the
        factors are filled in afterwards by `set_factors` and `set_keys`. `storage` is
        the dtype the factors are kept in; the arithmetic runs in the base layer's dtype."""
        super().__init__()
        self.name, self.base, self.state = name, base, state
        self.n_experts, self.rank = len(ranks), max(ranks)
        self.ranks = ranks  # per expert; its factors are padded with zeros up to `rank`
        e, r, device = self.n_experts, self.rank, base.weight.device
        compute = base.weight.dtype
        buffers = {
            "prototypes": expert_major(torch.zeros(e, base.in_features, device=device, dtype=compute)),
            "lora_a": torch.zeros(e * r, base.in_features, device=device, dtype=storage),
            "lora_bt": torch.zeros(e * r, base.out_features, device=device, dtype=storage),
            "scales": torch.zeros(e, device=device, dtype=compute),
            "present": torch.tensor([rank > 0 for rank in ranks], device=device),
        }
        for key, value in buffers.items():
            self.register_buffer(key, value, persistent=False)
        self.n_present = int(self.present.sum())
        # key sets other than Arrow's prototypes (gates, activations), attached when first routed by
        self.keys: dict[str, torch.Tensor] = {"prototypes": self.prototypes}
        self._derived: dict[tuple, object] = {}  # what routers compute once from the experts (GenKnowSub)
        self._usable: dict[tuple[int, ...] | None, tuple[torch.Tensor, int]] = {None: (self.present, self.n_present)}
        self.gather_chosen = device.type == "cpu"
        self._merged: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # plain attributes: a buffer is looked up through nn.Module.__getattr__, which costs more
        # than the arithmetic of a decoding step at some layers
        self.compute_dtype = compute
        self.stack = ExpertStack(self.keys, self.lora_a, self.lora_bt, self.scales)
        self.group: InputGroup | None = None  # layers reading the same input, routed together
        self._decode: tuple[ExpertStack, DecodePlan | None] | None = None  # see _decode_plan

    def share_buffers(self, lora_a: torch.Tensor, prototypes: torch.Tensor) -> None:
        """Hold these views of a group's buffers as the A factors and prototypes (same values)."""
        self.lora_a, self.prototypes = lora_a, prototypes
        self.keys["prototypes"] = prototypes
        self.stack = ExpertStack(self.keys, self.lora_a, self.lora_bt, self.scales)

    def _apply(self, fn, recurse=True):
        """Moving or casting the module replaces its buffers: the stack must hold the new ones,
        and they are no longer views of the group's."""
        super()._apply(fn, recurse)
        self.keys["prototypes"] = self.prototypes
        self.compute_dtype = self.prototypes.dtype
        self.stack = ExpertStack(self.keys, self.lora_a, self.lora_bt, self.scales)
        if self.group is not None:
            self.group.stop()
        return self

    def set_factors(self, first: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """The factors of experts first, first + 1, ..., all of one rank r: A (n, r, d_in) and
        B (n, d_out, r), into their slices of the stacks (cast to the storage dtype)."""
        n, r = a.shape[:2]
        self.lora_a.view(self.n_experts, self.rank, -1)[first : first + n, :r].copy_(a)
        self.lora_bt.view(self.n_experts, self.rank, -1)[first : first + n, :r].copy_(b.transpose(1, 2))
        self._changed()

    def set_keys(self, scales: list[float], prototypes: torch.Tensor) -> None:
        """Every expert's LoRA scale and prototype (E, d_in) (zeros where it does not adapt this layer)."""
        self.scales.copy_(torch.tensor(scales))
        self.prototypes.copy_(prototypes)
        self._changed()

    def _changed(self) -> None:
        self._merged.clear()
        self._derived.clear()
        if self.group is not None:
            self.group.changed()

    def derived(self, key: tuple, build):
        """What `build()` computes from this layer's experts, once (until an expert changes)."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def usable(self, subset: tuple[int, ...] | None) -> tuple[torch.Tensor, int]:
        """Which experts a router limited to `subset` can use here (they adapt this layer), and how many."""
        if subset not in self._usable:
            mask = torch.zeros_like(self.present)
            mask[list(subset)] = True
            mask &= self.present
            self._usable[subset] = (mask, int(mask.sum()))
        return self._usable[subset]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        router = self.state.router
        if router is None:
            return y
        h = x.reshape(-1, x.shape[-1])
        if h.dtype != self.compute_dtype:
            h = h.to(self.compute_dtype)
        if isinstance(router, MergeRouter):
            weights, a, bt = self.merged_factors(router)
            logits = None
            delta = (h @ a.T) @ bt if router.applies_experts else None
        else:
            fused = None
            group = self.group
            if group is not None and h.shape[0] == 1 and self.gather_chosen and group.fusing and group.fits(router):
                fused = group.result(self, router, h, x, self.state.record is not None)
            weights, logits, delta = fused or self._route(router, h)
        if self.state.record is not None:
            self.state.record.add(self.name, weights, logits, h.shape[0])
        if delta is None:
            return y
        delta = delta.view(*x.shape[:-1], -1)
        return y + (delta if delta.dtype == y.dtype else delta.to(y.dtype))

    def _route(self, router: TokenRouter, h: torch.Tensor):
        stack = router.stack(self)
        if h.shape[0] == 1 and stack is self.stack and decodes(router, h) and (plan := self._decode_plan()):
            logits, usable, k = router.choices(self, F.linear(h, stack.keys[router.keys]), h)
            if k and plan(h, logits, usable, k, router.temperature, router.mix):
                weights = chosen_weights(plan, 0, k, self.n_experts) if self.state.record is not None else None
                return weights, logits, plan.outputs[0]
        z = None  # every expert's projection A_e h, when computed: one matmul
        if router.keys is None:  # the router scores the projections themselves
            z = F.linear(h, stack.lora_a.to(h.dtype))
            routing = router.route(self, z, h)
        else:
            routing = router.route(self, F.linear(h, stack.keys[router.keys]), h)
        if z is None and self._dispatches(h.shape[0], routing):
            delta = self._dispatch(h, routing, stack, router.mix)
        else:
            z = h @ stack.lora_a.to(h.dtype).T if z is None else z
            delta = self.coefficients(z, routing.dense(), stack.scales, router.mix) @ stack.lora_bt.to(z.dtype)
        weights = routing.dense() if self.state.record is not None else None
        return weights, routing.logits, delta

    def _decode_plan(self) -> DecodePlan | None:
        """The decoding kernel's plan for this layer's own experts, built once per stack."""
        if self._decode is None or self._decode[0] is not self.stack:
            self._decode = (self.stack, DecodePlan.build(self.lora_a, self.scales, [self.lora_bt], self.n_experts))
        return self._decode[1]

    def _dispatches(self, n_tokens: int, routing) -> bool:
        """Whether to compute only the chosen (token, expert) pairs: on a CPU, for top-k routing,
        when one token's step is bound by reading weights (decoding) or when the experts outnumber
        the chosen ones so far that gathering beats the dense matmul (DISPATCH_RATIO)."""
        if not self.gather_chosen or routing.index is None:
            return False
        k = routing.index.shape[1]
        return (n_tokens == 1 and 2 * k <= self.n_experts) or self.n_experts >= DISPATCH_RATIO * k

    def _dispatch(self, h: torch.Tensor, routing, stack: ExpertStack, mix: str) -> torch.Tensor:
        """Σ over each token's k chosen experts only, never all E. Decoding gathers one token's
        chosen rows. Many tokens: the projections A_e h of the chosen pairs alone (a sampled
        matmul, SDDMM, on the sparsity pattern of the choices), then the chosen rows of the
        stacked B_eᵀ summed with those coefficients (embedding_bag), reading k·r rows per token."""
        r = self.rank
        n, k = routing.index.shape
        e = stack.lora_a.shape[0] // r
        if n == 1:  # the chosen rows of (E, r, d) views, widened to the compute dtype
            chosen = routing.index[0]
            a = stack.lora_a.view(-1, r, h.shape[1]).index_select(0, chosen).view(k * r, -1)
            z = F.linear(h, a if a.dtype == h.dtype else a.to(h.dtype))
            bt = stack.lora_bt.view(-1, r, stack.lora_bt.shape[1]).index_select(0, chosen).view(k * r, -1)
            c = self.coefficients(z, routing.top, stack.scales.index_select(0, chosen), mix)
            return c @ (bt if bt.dtype == h.dtype else bt.to(h.dtype))
        index, order = routing.index.sort(dim=1)  # a sparse row lists its columns in order
        top = routing.top.gather(1, order)
        rows = (index.unsqueeze(-1) * r + torch.arange(r, device=h.device)).flatten(1)  # (n, k·r)
        with warnings.catch_warnings():  # torch: "Sparse CSR tensor support is in beta state"; tested here
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            pattern = torch.sparse_csr_tensor(
                torch.arange(0, n * k * r + 1, k * r, device=h.device),
                rows.flatten(),
                h.new_zeros(n * k * r),
                size=(n, e * r),
                check_invariants=False,
            )
        z = torch.sparse.sampled_addmm(pattern, h, stack.lora_a.to(h.dtype).T).values()
        c = self.coefficients(z.view(n, k * r), top, stack.scales[index], mix)
        return F.embedding_bag(rows, stack.lora_bt.to(h.dtype), per_sample_weights=c, mode="sum")

    def coefficients(self, z: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mix: str) -> torch.Tensor:
        """What multiplies the stacked B_eᵀ rows: z, the projections A_e h of m experts (tokens,
        m·r); w, their weights (tokens, m); scales, their s_e ((m,) or per token (tokens, m))."""
        n, m = w.shape
        z = z.view(n, m, self.rank)
        if w.dtype != z.dtype:
            w = w.to(z.dtype)
        ws = (w * scales).unsqueeze(-1)  # the B side carries w_e s_e
        if mix == "outputs":  # Σ_e w_e s_e B_e (A_e h)
            z = z * ws
        else:  # (Σ_e w_e s_e B_e)(Σ_f w_f A_f h) = Σ_e s_e B_e (w_e · u), u = Σ_f w_f A_f h
            z = ws * (z * w.unsqueeze(-1)).sum(dim=1, keepdim=True)
        return z.flatten(1)

    def merged_factors(self, router: MergeRouter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A static router's weights and its merge folded into one low-rank pair (a, bt), cached."""
        if router.key not in self._merged:
            w = router.weights(self)
            e, r, dtype = self.n_experts, self.rank, self.prototypes.dtype
            a = self.lora_a.to(dtype).view(e, r, -1)
            bt = self.lora_bt.to(dtype).view(e, r, -1)
            wa = w.to(dtype)
            ws = wa * self.scales
            if (own := router.merge(self)) is not None:  # a merge of its own (TIES)
                merged = own
            elif router.mix == "outputs":  # the experts with non-zero weight, side by side
                used = torch.nonzero(wa).flatten()
                merged = (a[used].flatten(0, 1), (bt[used] * ws[used, None, None]).flatten(0, 1))
            else:  # Σ w_e A_e and Σ w_e s_e B_eᵀ
                merged = (torch.einsum("e,erd->rd", wa, a), torch.einsum("e,ero->ro", ws, bt))
            if len(self._merged) >= MERGED_CACHE:  # drop the oldest: dicts keep insertion order
                self._merged.pop(next(iter(self._merged)), None)
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
        self.tokenizer, self.library = tokenizer, library
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            folders = [library.path / e.path for e in library.experts]  # in the order of library.names
            layouts = dict(zip(library.names, pool.map(read_layout, folders)))
            ranks = {x: layout[0] for x, layout in layouts.items()}
            storage = _storage_dtype({d for _, dtypes in layouts.values() for d in dtypes}, model.dtype)
            modules = [name for name, _ in model.named_modules() if any(name in r for r in ranks.values())]
            self._wire(model, library.names, {m: [ranks[x].get(m, 0) for x in library.names] for m in modules}, storage)
            scales = self._fill(self.layers, folders, [ranks[x] for x in self.experts], pool)
        prototypes = prototype_matrices(library)
        for name, layer in self.layers.items():
            layer.set_keys(scales[name], prototypes[name])

    @classmethod
    def unfilled(
        cls, model: nn.Module, experts: list[str], ranks: dict[str, list[int]], storage: torch.dtype
    ) -> RoutedModel:
        """A routed model over experts held in memory, not in a library folder: `ranks[module]`
        gives each expert's rank at that linear layer (model order), and the caller fills every
        layer with `set_factors` and `set_keys` before routing. Routers that read a library
        (learned routers, other key sets) cannot run on it. Benchmarks build thousands of random
        experts this way (benchmarks/bench_gpu.py)."""
        routed = cls.__new__(cls)
        routed.tokenizer, routed.library = None, None
        routed._wire(model, experts, ranks, storage)
        return routed

    def _wire(self, model: nn.Module, experts: list[str], ranks: dict[str, list[int]], storage: torch.dtype) -> None:
        """Put a `LibraryLinear` over `experts` in place of each linear layer named in `ranks`,
        and make their input groups before anything is filled (the members' A factors are views
        into their group's buffer)."""
        self.model, self.experts, self.state = model, list(experts), RoutingState()
        self.modules = list(ranks)
        layers = {}
        for name, per_expert in ranks.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layers[name] = LibraryLinear(name, getattr(parent, child), per_expert, self.state, storage)
            setattr(parent, child, layers[name])
        self.groups = input_groups(layers)
        self.layers: dict[str, LibraryLinear] = layers
        self._attached: dict[str, set[str]] = {"prototypes": set(self.experts)}  # key set -> experts that have it

    def _fill(
        self, layers: dict[str, LibraryLinear], folders: list, ranks: list[dict[str, int]], pool: ThreadPoolExecutor
    ) -> dict[str, list[float]]:
        """Read every expert into the layers' preallocated buffers. Threads read and check the
        files ahead (reading and torch's checks release the GIL) while this thread copies runs
        of experts stored alike, a module at a time: one copy per module and run of FILL_RUN
        experts rather than one per module and expert (a quarter of a million at 1024 experts).
        About four runs' files are held at once (read ahead, being copied, stacked), never the
        whole library twice. Returns module -> every expert's LoRA scale there."""
        scales = {name: [0.0] * len(self.experts) for name in self.modules}
        read = _read_ahead(pool, read_packed, folders, 2 * FILL_RUN)
        for first, run in _runs(read, FILL_RUN):
            layout = run[0].layout
            for i, packed in enumerate(run, start=first):
                if packed.layout.ranks != ranks[i]:
                    raise LorlibError(
                        f"expert {self.experts[i]} changed on disk while the model was being built; try again"
                    )
            data = torch.stack([packed.tensor()[: layout.size] for packed in run])  # (experts, bytes)
            for module, (a, b) in layout.modules.items():
                layers[module].set_factors(first, _columns(data, a), _columns(data, b))
                for i, packed in enumerate(run, start=first):
                    scales[module][i] = packed.scales[module]
        return scales

    @classmethod
    def load(cls, library: Library, base_model: str | None = None, device: str | None = None, dtype: str | None = None):
        model, tokenizer = load_base_model(base_model or library.base_model, device=device, dtype=dtype)
        return cls(model, tokenizer, library)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def merged_adapter(self, router: Router) -> LoraAdapter:
        """A static router's merge as one LoRA adapter, exactly the pair (a, bt) its layers fold:
        each expert's scale is already in bt, so the adapter's scale is 1 (lora_alpha = r), and
        every module is zero-padded to one rank r (zero rows add nothing). Only the modules that
        some expert the router uses adapts are kept, in float32."""
        if not (isinstance(router, MergeRouter) and router.applies_experts):
            raise LorlibError(f"router {router.describe()} is not a merge of experts, so it has no adapter")
        factors = {}
        for name, layer in self.layers.items():
            if layer.usable(router.subset)[1]:
                _, a, bt = layer.merged_factors(router)
                factors[name] = (a.detach().float().cpu(), bt.detach().float().cpu().T)
        rank = max((a.shape[0] for a, _ in factors.values()), default=0)
        if rank == 0:
            raise LorlibError(f"router {router.describe()} applies no expert at any layer")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank}
        merged = LoraAdapter(config=config | {"lora_dropout": 0.0, "bias": "none"}, factors=factors)
        return merged.at_rank(rank, rank)

    def _attach_keys(self, router: TokenRouter) -> None:
        """Give every layer the key set `router` scores tokens with, read from the library (again
        when some expert the router uses lacked it: it may have been computed since)."""
        kind = router.keys
        used = self.experts if router.subset is None else [self.experts[i] for i in router.subset]
        if kind is None or all(x in self._attached.get(kind, ()) for x in used):
            return
        if (problem := self.library.derived.lacks_for(router)) is not None:
            raise LorlibError(problem)
        stored = self.library.derived.read_experts(kind)
        for layer in self.layers.values():
            raw = torch.zeros_like(layer.prototypes)
            for e, expert in enumerate(self.experts):
                if (key := stored.get(expert, {}).get(layer.name)) is not None:
                    raw[e] = key.to(raw.dtype)
            layer.keys[kind] = expert_major(router.prepare_keys(raw))
        self._attached[kind] = {x for x in self.experts if x in stored}
        if missing := [x for x in used if x not in self._attached[kind]]:  # unreadable since checked
            raise LorlibError(f"router {router.describe()}: the {kind} of {', '.join(missing)} could not be read")

    @contextmanager
    def routing(self, router: Router, record: bool = False):
        """Route with `router` inside the block; yields a RecordBuilder when record=True."""
        if isinstance(router, TaskRouter):  # an evaluation resolves it into the router of each task
            raise LorlibError(f"router {router.describe()} {router.usage}")
        router = router.bind(self.library, self.experts)  # a learned router reads its weights
        if isinstance(router, TokenRouter):  # its keys, and what it derives from the experts, before any token
            self._attach_keys(router)
            for layer in self.layers.values():
                router.stack(layer)
        builder = RecordBuilder(self.modules, len(self.experts)) if record else None
        self.state.router, self.state.record = router, builder
        try:
            yield builder
        finally:
            self.state.router, self.state.record = None, None


def _read_ahead(pool: ThreadPoolExecutor, fn, items: list, window: int):
    """fn(item) for each item in order, computed on `pool` at most `window` items ahead."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _runs(adapters, longest: int):
    """(index of the first, list) of consecutive adapters with one layout, at most `longest` each."""
    run: list[PackedAdapter] = []
    first = 0
    for i, adapter in enumerate(adapters):
        if run and (len(run) == longest or adapter.layout is not run[0].layout):
            yield first, run
            run, first = [], i
        run.append(adapter)
    if run:
        yield first, run


def _columns(data: torch.Tensor, span: Span) -> torch.Tensor:
    """One factor of each of stacked weights files `data` (files, bytes): (files, *shape), a view
    where the bytes line up with the dtype."""
    block = data[:, span.begin : span.end]
    size = span.dtype.itemsize
    if span.begin % size or data.shape[1] % size:
        block = block.contiguous()
    return block.view(span.dtype).view(-1, *span.shape)


_SIXTEEN_BIT = {"BF16": torch.bfloat16, "F16": torch.float16}


def _storage_dtype(stored: set[str], compute: torch.dtype) -> torch.dtype:
    """Keep the experts in the one 16-bit dtype they are all stored in (exact), else in `compute`."""
    if len(stored) == 1 and (dtype := _SIXTEEN_BIT.get(next(iter(stored)))) is not None:
        return dtype if torch.finfo(dtype).bits < torch.finfo(compute).bits else compute
    return compute


class RecordBuilder:
    """Collects per-call routing tensors on the model's device; one transfer at the end."""

    def __init__(self, modules: list[str], n_experts: int):
        self.modules, self.n_experts = modules, n_experts
        self.weights: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
        self.logits: dict[str, list[torch.Tensor]] = {m: [] for m in modules}

    def add(self, module: str, weights: torch.Tensor, logits: torch.Tensor | None, n_tokens: int) -> None:
        weights = weights.detach().float()
        if weights.dim() == 1:
            weights = weights.expand(n_tokens, -1)
        self.weights[module].append(weights)
        self.logits[module].append(
            torch.full_like(weights, float("nan")) if logits is None else logits.detach().float()
        )

    def finish(self, router: str, experts: list[str], tokens: list[str]) -> RoutingRecord:
        def stack(parts: dict[str, list[torch.Tensor]]) -> np.ndarray:
            if not tokens or not self.modules:
                return np.zeros((len(self.modules), len(tokens), self.n_experts), dtype=np.float32)
            return torch.stack([torch.cat(parts[m]) for m in self.modules]).cpu().numpy()

        weights, logits = stack(self.weights), stack(self.logits)
        if weights.shape[1] != len(tokens):
            raise RuntimeError(f"routing record has {weights.shape[1]} tokens but {len(tokens)} were routed")
        return RoutingRecord(router, experts, self.modules, tokens, weights, logits)
