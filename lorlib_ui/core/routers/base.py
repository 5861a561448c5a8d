"""What every router is: its weights per expert, per token and per LoRA'd layer.

Every router has the same shape, and `mix` says how the weighted experts combine:

- "outputs":    y = W h + Σ_e w_e s_e B_e A_e h              (PEFT's Arrow; mixture of experts)
- "parameters": y = W h + (Σ_e w_e s_e B_e)(Σ_e w_e A_e) h  (the paper's code: merge, then apply)

A static router (a merge) gives every token the same weights, `weights(slot)`, which the layer
folds once into one small pair of factors. A dynamic router scores each token from its dot
products with one key vector per expert, `route(slot, dots)`; the layer computes those dots in
the same matmul as the experts' A projections. Arrow's keys are its prototypes.

A router class declares what it supports (`static`, `groupable`, `argument`, `options`,
`per_task`, `few_shot`, `subtracts`) and builds itself from a spec with `from_spec`; the registry
(`lorlib_ui.core.routers.registry`) reads those declarations to parse specs, check them, and list
the routers that menus, help texts and evaluations offer. Routers are immutable: limiting one to a
group of experts returns a new router.

A per-task router (the oracle, LoraHub) is resolved by an evaluation on each task, from a
`TaskContext`, into the router that runs there (`for_task`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:  # routers only use the tensors they are handed: the registry loads without torch
    import torch

    from lorlib_ui.core.library import Library

MIXES = ("outputs", "parameters")


class LayerSlot(Protocol):
    """What a router reads of one LoRA'd layer: the routed model's `LayerSlot`, or the rows
    of an input group (`input_groups`) for the routers that score row by row. Written here, below
    the routed model, so that routers need nothing of it."""

    name: str
    n_experts: int
    rank: int  # the largest expert rank at the layer; factors are padded to it
    ranks: list[int]  # per expert, 0 where it does not adapt the layer
    lora_a: torch.Tensor  # (E·r, d_in)
    lora_bt: torch.Tensor  # (E·r, d_out)
    scales: torch.Tensor  # (E,)
    prototypes: torch.Tensor  # Arrow's keys, (E, d_in)
    present: torch.Tensor  # (E,) bool: the experts that adapt the layer
    keys: dict[str, torch.Tensor]  # key sets by name (prototypes, gates, activations)
    stack: ExpertStack

    def usable(self, subset: tuple[int, ...] | None) -> tuple[torch.Tensor, int]: ...

    def derived(self, key: tuple, build): ...


DEFAULT_TOP_K = 4  # capped at the number of experts


@dataclass(frozen=True)
class RouterSettings:
    """What a user may set on a router; each router class says which of these it takes (`options`)."""

    top_k: int | None = None  # None: DEFAULT_TOP_K, or all experts if fewer
    temperature: float = 1.0
    mix: str = "outputs"
    density: float | None = None  # TIES: the share of each expert's parameters kept (None: its default)


@dataclass
class Routing:
    """A dynamic router's decision for n tokens: dense weights, or the top-k experts per token."""

    logits: torch.Tensor  # (n, experts): the router's scores before top-k
    weights: torch.Tensor | None = None  # (n, experts)
    index: torch.Tensor | None = None  # (n, k): the chosen experts ...
    top: torch.Tensor | None = None  # (n, k): ... and their weights

    def dense(self) -> torch.Tensor:
        if self.weights is None:
            self.weights = self.logits.new_zeros(self.logits.shape).scatter_(-1, self.index, self.top)
        return self.weights


@dataclass(frozen=True)
class ExpertStack:
    """Every expert at one layer, stacked (each zero-padded to the largest rank r)."""

    keys: dict[str, torch.Tensor]  # key set -> (experts, d_in)
    lora_a: torch.Tensor  # (experts·r, d_in)
    lora_bt: torch.Tensor  # (experts·r, d_out)
    scales: torch.Tensor  # (experts,): each expert's LoRA scale s_e


@dataclass(frozen=True)
class TaskContext:
    """What a per-task router chooses from on one evaluated task: the library the routed model
    holds, the task and its family and, for a few-shot router, the loss of any router on a few of
    the task's training examples (the evaluation draws them and scores them on its routed model)."""

    library: Library
    task: str
    family: str | None
    loss: Callable[[Router], float] | None = None  # mean answer negative log-likelihood of the shots
    shots: int = 0  # how many training examples `loss` scores
    seed: int = 0  # which of them were drawn, and the seed of a search


@dataclass(frozen=True)
class Router:
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for help texts
    static: ClassVar[bool] = True  # the same weights for every token (a merge), or per token
    applies_experts: ClassVar[bool] = True
    groupable: ClassVar[bool] = False  # may be limited to a group of experts: arrow@private
    argument: ClassVar[str | None] = None  # the spec takes an argument: expert:NAME
    argument_of: ClassVar[str] = "experts"  # what menus offer as its argument: experts, or learned routers
    options: ClassVar[tuple[str, ...]] = ()  # the RouterSettings it reads: top_k, temperature, mix
    per_task: ClassVar[bool] = False  # chooses its experts per evaluation task (the oracle)
    per_task_hint: ClassVar[str] = "picks its expert per evaluated task; use it with evaluate"
    few_shot: ClassVar[bool] = False  # per task, learns from a few of its training examples (LoraHub)
    # Dynamic routers: the per-expert key vectors a token's scores are dot products with, a key
    # set of the layer ("prototypes": Arrow's; "gates": PhatGoose's; "activations": mean hidden
    # states), or None for a router that scores the experts' projections A_e h themselves.
    keys: ClassVar[str | None] = "prototypes"
    # routes each row of its scores alone (so rows of several layers may be stacked): see
    # `lorlib_ui.core.input_groups`
    rowwise: ClassVar[bool] = False
    needs: ClassVar[str | None] = None  # a key set the library must hold for every expert it uses
    presets: ClassVar[dict[str, str]] = {}  # the comparisons `evaluate` offers: name -> spec
    # A group of the library whose experts the router reads but never chooses (GenKnowSub
    # subtracts the "general" experts from the others): `make_router` leaves them out of its
    # subset and hands it their indices as `subtracted`.
    subtracts: ClassVar[str | None] = None

    mix: str = "outputs"
    group: str | None = None  # the experts it may use: a named group of the library, or all
    subset: tuple[int, ...] | None = None  # ... and their indices
    subtracted: tuple[int, ...] = ()  # the experts of the `subtracts` group, by index

    @classmethod
    def from_spec(cls, argument: str, experts: list[str], settings: RouterSettings) -> Router:
        """The router for a spec's argument (after ':'), over `experts`; checks what it reads."""
        return cls()

    @classmethod
    def unavailable(cls, groups: dict[str, list[str]]) -> str | None:
        """Why this router cannot run on a library with these groups of experts, or None."""
        return None

    def limit(self, group: str, subset: tuple[int, ...]) -> Router:
        """This router, using only the experts at `subset` (a named group); a new router."""
        return replace(self, group=group, subset=subset)

    def for_task(self, context: TaskContext) -> Router | None:
        """Per-task routers: the router that runs on the context's task; None when none fits."""
        raise NotImplementedError

    def weights(self, slot: LayerSlot) -> torch.Tensor:
        """Static routers: one weight per expert (experts,), the same for every token."""
        raise NotImplementedError

    def merge(self, slot: LayerSlot) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Static routers whose merge is not a weighted sum of the experts' factors (TIES): the
        merged pair (A (r, d_in), s·Bᵀ (r, d_out)) at this layer; None folds `weights` instead."""
        return None

    def route(self, slot: LayerSlot, scores: torch.Tensor, h: torch.Tensor) -> Routing:
        """Dynamic routers: weights per token for the tokens' inputs h (tokens, d_in), from
        scores = h·key_e (tokens, experts), or, where `keys` is None, the experts' projections
        A_e h (tokens, experts·r)."""
        raise NotImplementedError

    def stack(self, slot: LayerSlot) -> ExpertStack:
        """The experts' stacked factors and keys this router mixes at a layer: the layer's own,
        unless the router changes the experts (GenKnowSub subtracts the general ones)."""
        return slot.stack

    def missing(self, library: Library) -> str | None:
        """Why this router cannot run on `library` for want of something it stores there beyond
        the key sets of `needs` (a learned router's weights), in one line; None when it can."""
        return None

    def bind(self, library: Library, experts: list[str]) -> Router:
        """This router ready to run on a routed model of `library` whose experts are `experts`:
        itself, or for a router whose weights the library stores (a learned router), a copy that
        holds them. Called by the routed model when routing starts."""
        return self

    @classmethod
    def prepare_keys(cls, raw: torch.Tensor) -> torch.Tensor:
        """The key vectors the layer holds, from those the library stores (experts, d_in)."""
        return raw

    @property
    def key(self) -> tuple:
        """Identifies a static router's weights, for the layers' cache of merged factors."""
        return (self.name, self.mix, self.subset)

    def describe(self) -> str:
        return self.name + (f"@{self.group}" if self.group else "")
