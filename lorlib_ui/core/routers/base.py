"""What every router is: its weights per expert, per token and per LoRA'd layer.

Every router has the same shape, and `mix` says how the weighted experts combine:

- "outputs":    y = W h + Σ_e w_e s_e B_e A_e h              (PEFT's Arrow; mixture of experts)
- "parameters": y = W h + (Σ_e w_e s_e B_e)(Σ_e w_e A_e) h  (the paper's code: merge, then apply)

A router is one of three kinds, and has the hooks of its kind only:

- `MergeRouter` (static: uniform, TIES, one expert, a learned Poly router) gives every token the
  same weights, `weights(slot)`, which the layer folds once into one small pair of factors, or
  merges the experts its own way, `merge(slot)`;
- `TokenRouter` scores each token from its dot products with one key vector per expert,
  `route(slot, scores, h)`; the layer computes those dots in the same matmul as the experts' A
  projections. Arrow's keys are its prototypes. Most are top-k routers (`per_token.TopKRouter`),
  which only say how they score;
- `TaskRouter` (the oracle, LoraHub) is resolved by an evaluation on each task, from a
  `TaskContext`, into the router that runs there, `for_task(context)`.

A router that a spec can name is registered with `register`, which lists it in `ROUTERS` (in the
order menus show them) with the frozen dataclass of the settings it takes, checked where that
dataclass is defined; the registry (`lorlib_ui.core.routers.registry`) parses specs, checks them
and offers the routers to menus, help texts and evaluations. A router made by code (LoraHub's
candidate merges, a Poly router in training) is not registered, so no spec names it. Routers
are immutable: limiting one to a group of experts returns a new router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar, runtime_checkable

from lorlib_ui.core.errors import LorlibError

if TYPE_CHECKING:  # routers only use the tensors they are handed: the registry loads without torch
    import torch

    from lorlib_ui.core.library import Library

MIXES = ("outputs", "parameters")
DEFAULT_TOP_K = 4  # capped at the number of experts
# What a spec's settings may hold (`make_router`'s arguments): a router's config declares those it
# reads as fields, and `experts`, the number of experts it is given, where its checks need it.
SETTINGS = ("top_k", "temperature", "mix", "density", "experts")


def check_mix(mix: str) -> None:
    if mix not in MIXES:
        raise LorlibError(f"unknown mix {mix!r}; use {' or '.join(MIXES)}")


@runtime_checkable
class RowSlot(Protocol):
    """What a top-k router reads to choose among the scores of a few rows: how many experts
    there are and which of them each row may use. A layer is one (`LayerSlot`); so are the
    layers of an input group (`lorlib_ui.core.input_groups`), each of its rows one layer's."""

    n_experts: int

    def usable(self, subset: tuple[int, ...] | None) -> tuple[torch.Tensor, int]: ...


@runtime_checkable
class LayerSlot(RowSlot, Protocol):
    """What a router reads of one LoRA'd layer: the routed model's `LibraryLinear`. Written
    here, below the routed model, so that routers need nothing of it."""

    name: str
    rank: int  # the largest expert rank at the layer; factors are padded to it
    ranks: list[int]  # per expert, 0 where it does not adapt the layer
    lora_a: torch.Tensor  # (E·r, d_in)
    lora_bt: torch.Tensor  # (E·r, d_out)
    scales: torch.Tensor  # (E,)
    prototypes: torch.Tensor  # Arrow's keys, (E, d_in)
    present: torch.Tensor  # (E,) bool: the experts that adapt the layer
    keys: dict[str, torch.Tensor]  # key sets by name (prototypes, gates, activations)
    stack: ExpertStack

    def derived(self, key: tuple, build): ...


@dataclass
class Routing:
    """A token router's decision for n tokens: dense weights, or the top-k experts per token."""

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
    """What every kind of router has: its spec's grammar, the experts it may use, how it mixes."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for help texts
    config: ClassVar[type | None] = None  # the settings it takes, a frozen dataclass (set by `register`)
    argument: ClassVar[str | None] = None  # the spec takes an argument: expert:NAME
    argument_of: ClassVar[str] = "experts"  # what menus offer as its argument: experts, or learned routers
    groupable: ClassVar[bool] = False  # may be limited to a group of experts: arrow@private
    applies_experts: ClassVar[bool] = True  # False for the base model alone
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
    def unavailable(cls, groups: dict[str, list[str]]) -> str | None:
        """Why this router cannot run on a library with these groups of experts, or None."""
        return None

    @classmethod
    def argument_problem(cls, argument: str, experts: list[str]) -> str | None:
        """Why a spec's argument (after ':') names nothing this router can use among `experts`, in
        one line; None when it is fine."""
        return None

    @classmethod
    def build(cls, argument: str, experts: list[str], config) -> Router:
        """The router for a checked spec's argument, over `experts`, with its checked `config`
        (None when it takes no settings). Builds only: every check is made before."""
        return cls()

    def limit(self, group: str | None, subset: tuple[int, ...]) -> Router:
        """This router, using only the experts at `subset` (a named group); a new router."""
        return replace(self, group=group, subset=subset)

    def missing(self, library: Library) -> str | None:
        """Why this router cannot run on `library` for want of something it stores there beyond
        the key sets of `needs` (a learned router's weights), in one line; None when it can."""
        return None

    def bind(self, library: Library, experts: list[str]) -> Router:
        """This router ready to run on a routed model of `library` whose experts are `experts`:
        itself, or for a router whose weights the library stores (a learned router), a copy that
        holds them. Called by the routed model when routing starts."""
        return self

    @property
    def key(self) -> tuple:
        """Identifies what the router computes from a layer's experts, for the layers' caches (a
        merge's folded factors, whether an input group can route it together)."""
        return (self.name, self.mix, self.subset)

    def describe(self) -> str:
        return self.name + (f"@{self.group}" if self.group else "")


@dataclass(frozen=True)
class MergeRouter(Router):
    """Static: the same weights for every token, folded once per layer into one pair of factors."""

    def weights(self, slot: LayerSlot) -> torch.Tensor:
        """One weight per expert (experts,), the same for every token."""
        raise NotImplementedError(f"{type(self).__name__} must say its weights")

    def merge(self, slot: LayerSlot) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a merge that is not a weighted sum of the experts' factors (TIES): the merged pair
        (A (r, d_in), s·Bᵀ (r, d_out)) at this layer; None folds `weights` instead."""
        return None


@dataclass(frozen=True)
class TokenRouter(Router):
    """Per token: weights from each token's scores against one key vector per expert."""

    # The per-expert key vectors a token's scores are dot products with, a key set of the layer
    # ("prototypes": Arrow's; "gates": PhatGoose's; "activations": mean hidden states), or None
    # for a router that scores the experts' projections A_e h themselves.
    keys: ClassVar[str | None] = "prototypes"

    @classmethod
    def prepare_keys(cls, raw: torch.Tensor) -> torch.Tensor:
        """The key vectors the layer holds, from those the library stores (experts, d_in)."""
        return raw

    def route(self, slot: LayerSlot, scores: torch.Tensor, h: torch.Tensor) -> Routing:
        """Weights per token for the tokens' inputs h (tokens, d_in), from scores = h·key_e
        (tokens, experts), or, where `keys` is None, the experts' projections A_e h
        (tokens, experts·r)."""
        raise NotImplementedError(f"{type(self).__name__} must say how it routes")

    def stack(self, slot: LayerSlot) -> ExpertStack:
        """The experts' stacked factors and keys this router mixes at a layer: the layer's own,
        unless the router changes the experts (GenKnowSub subtracts the general ones)."""
        return slot.stack


@dataclass(frozen=True)
class TaskRouter(Router):
    """Per evaluated task: resolved by an evaluation into the router that runs on that task."""

    # why `make_router` refuses it outside an evaluation, after "router NAME "
    usage: ClassVar[str] = "picks its expert per evaluated task; use it with evaluate"
    few_shot: ClassVar[bool] = False  # learns from a few of the task's training examples (LoraHub)

    def for_task(self, context: TaskContext) -> Router | None:
        """The router that runs on the context's task; None when none fits."""
        raise NotImplementedError(f"{type(self).__name__} must say what it runs per task")


KINDS = (MergeRouter, TokenRouter, TaskRouter)

# Every router a spec can name, by name, in the order they were registered: the order of menus,
# help texts and evaluation tables (`lorlib_ui.core.routers.registry` imports their modules so).
ROUTERS: dict[str, type[Router]] = {}

R = TypeVar("R", bound=type[Router])


def register(config: type | None = None) -> Callable[[R], R]:
    """Class decorator: list a router in `ROUTERS` under its name, after those registered before
    it, with `config`, the frozen dataclass of the settings it takes (None: it takes none). The
    config's fields are named after `SETTINGS`, and it checks them itself (`__post_init__`)."""
    if config is not None:
        if not (is_dataclass(config) and config.__dataclass_params__.frozen):
            raise TypeError(f"{config.__name__} must be a frozen dataclass")
        if unknown := [f.name for f in fields(config) if f.name not in SETTINGS]:
            raise TypeError(f"{config.__name__} declares {', '.join(unknown)}, not settings: {', '.join(SETTINGS)}")

    def add(cls: R) -> R:
        if not issubclass(cls, KINDS):
            raise TypeError(f"{cls.__name__} must be a {', '.join(k.__name__ for k in KINDS)}")
        if cls.name in ROUTERS:
            raise TypeError(f"a router named {cls.name!r} is registered already ({ROUTERS[cls.name].__name__})")
        cls.config = config
        ROUTERS[cls.name] = cls
        return cls

    return add
