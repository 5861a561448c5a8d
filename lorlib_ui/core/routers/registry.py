"""The one registry of routers: every name a user can type, a menu can offer or `evaluate` can run.

A spec names a registered router, with its argument and group where it takes them:
`arrow`, `arrow@private`, `uniform@cluster`, `expert:NAME`, `base`. `make_router` parses a spec,
checks it against the library's experts and groups and the router's declared options, and asks
the router class to build itself. Menus (`menu`), help texts (`help_text`) and the evaluation's
comparisons (`presets`) are all read from the classes listed here.

Adding a router: write its class in a module of this package (a subclass of `Router` that sets
its name, summary and what it supports, with `from_spec` if it reads settings, and `weights` or
`route`), and add it to `ROUTERS` below.
"""

from __future__ import annotations

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.arrow import ArrowRouter
from lorlib_ui.core.routers.base import MIXES, Router, RouterSettings
from lorlib_ui.core.routers.lorahub import LoraHubRouter
from lorlib_ui.core.routers.merges import BaseRouter, ExpertRouter, MeanDeltaRouter, UniformRouter
from lorlib_ui.core.routers.oracle import OracleRouter
from lorlib_ui.core.routers.ties import TiesRouter

# In this order in menus (dynamic routers first), help texts and evaluation tables.
ROUTERS: dict[str, type[Router]] = {
    cls.name: cls
    for cls in (
        BaseRouter,
        UniformRouter,
        MeanDeltaRouter,
        TiesRouter,
        ArrowRouter,
        ExpertRouter,
        OracleRouter,
        LoraHubRouter,
    )
}


def _ordered() -> list[type[Router]]:
    """As menus and help list them: dynamic routers first (what the explorer is about), then the
    static ones, each in registry order."""
    return sorted(ROUTERS.values(), key=lambda cls: cls.static)


def _spec_of(cls: type[Router]) -> str:
    return cls.name + (f":{cls.argument}" if cls.argument else "")


def help_text() -> str:
    """One line listing the routers and how specs are written, for CLI help."""
    names = ", ".join(_spec_of(cls) for cls in _ordered() if not cls.per_task)
    groupable = ", ".join(cls.name for cls in _ordered() if cls.groupable and not cls.per_task)
    return f"{names}; {groupable} take @KIND to use only the experts of one kind (e.g. arrow@private)"


def make_router(
    spec: str,
    experts: list[str],
    top_k: int | None = None,
    temperature: float = 1.0,
    mix: str = "outputs",
    groups: dict[str, list[str]] | None = None,
    per_task: bool = False,
    density: float | None = None,
) -> Router:
    """The router a spec names, over the library's `experts` (names, in library order), limited to
    a group of `groups` when the spec says `@GROUP`. Routers that choose per evaluated task (the
    oracle) are built only when `per_task` says the caller resolves them per task."""
    spec, _, group = spec.partition("@")
    name, colon, argument = spec.partition(":")
    cls = ROUTERS.get(name)
    if cls is None or bool(colon) != bool(cls.argument):
        known = ", ".join(_spec_of(c) for c in ROUTERS.values())
        raise LorlibError(f"unknown router {spec!r}; use one of {known}")
    if cls.per_task and not per_task:
        raise LorlibError(f"router {name!r} {cls.per_task_hint}")
    if (problem := cls.unavailable(groups or {})) is not None:
        raise LorlibError(problem)
    if mix not in MIXES:
        raise LorlibError(f"unknown mix {mix!r}; use {' or '.join(MIXES)}")
    settings = RouterSettings(top_k, temperature, mix, density)
    if group:
        if not cls.groupable:
            *most, last = [c.name for c in _ordered() if c.groupable]
            limitable = f"{', '.join(most)} and {last}" if most else last
            raise LorlibError(f"only {limitable} can be limited to a group, not {spec + '@' + group!r}")
        members = (groups or {}).get(group)
        if not members:
            known = ", ".join(g for g, m in (groups or {}).items() if m) or "none"
            raise LorlibError(f"no experts in group {group!r} (groups: {known})")
        router = cls.from_spec(argument, members, settings)
        return router.limit(group, tuple(experts.index(m) for m in members))
    if cls.applies_experts and not experts:
        raise LorlibError(f"router {spec!r} needs experts, but the library is empty")
    return cls.from_spec(argument, experts, settings)


def menu(experts: list[str], groups: dict[str, list[str]]) -> list[str]:
    """The router specs to offer for a library: each router (even where the library is empty: the
    refusal then says what it lacks), limited to each group of two or more experts where it can
    be, then each expert alone."""
    kinds = [kind for kind, members in groups.items() if len(members) > 1]
    specs: list[str] = []
    for cls in _ordered():
        if cls.per_task or cls.unavailable(groups) is not None:
            continue
        if cls.argument:
            specs += [f"{cls.name}:{name}" for name in experts]
            continue
        specs.append(cls.name)
        if cls.groupable:
            specs += [f"{cls.name}@{kind}" for kind in kinds]
    specs.sort(key=lambda s: ":" in s)  # experts alone last
    return specs


def presets() -> dict[str, str]:
    """The comparisons `evaluate` runs by default, by name: the paper's baselines and Arrow."""
    return {name: spec for cls in ROUTERS.values() for name, spec in cls.presets.items()}
