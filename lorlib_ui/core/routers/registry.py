"""The one registry of routers: every name a user can type, a menu can offer or `evaluate` can run.

A spec names a registered router, with its argument and group where it takes them:
`arrow`, `arrow@private`, `uniform@cluster`, `expert:NAME`, `base`. `make_router` parses a spec,
checks it against the library's experts and groups and the router's declared options, and asks
the router class to build itself. A router that subtracts a group (GenKnowSub's `arrow_gks`, the
"general" experts) is limited to the other experts and told the indices of that group's. Menus
(`menu`), help texts (`help_text`) and the evaluation's comparisons (`presets`) are all read from
the classes listed here.

Adding a router: write its class in a module of this package (a subclass of `Router` that sets
its name, summary and what it supports, with `from_spec` if it reads settings, and `weights` or
`route`), and add it to `ROUTERS` below.
"""

from __future__ import annotations

from dataclasses import replace

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.arrow import ArrowRouter
from lorlib_ui.core.routers.avg_act import AverageActivationRouter
from lorlib_ui.core.routers.base import MIXES, Router, RouterSettings
from lorlib_ui.core.routers.gks import ArrowGksRouter
from lorlib_ui.core.routers.lorahub import LoraHubRouter
from lorlib_ui.core.routers.merges import BaseRouter, ExpertRouter, MeanDeltaRouter, UniformRouter
from lorlib_ui.core.routers.oracle import OracleRouter
from lorlib_ui.core.routers.phatgoose import PhatGooseRouter
from lorlib_ui.core.routers.poly import PolyRouter
from lorlib_ui.core.routers.spectral import SpectralRouter
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
        ArrowGksRouter,
        SpectralRouter,
        PhatGooseRouter,
        AverageActivationRouter,
        ExpertRouter,
        PolyRouter,
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
    a group of `groups` when the spec says `@GROUP`, and to the experts outside the group it
    subtracts, if it subtracts one. Routers that choose per evaluated task (the oracle) are built
    only when `per_task` says the caller resolves them per task."""
    groups = groups or {}
    spec, _, group = spec.partition("@")
    name, colon, argument = spec.partition(":")
    cls = ROUTERS.get(name)
    if cls is None or bool(colon) != bool(cls.argument):
        known = ", ".join(_spec_of(c) for c in ROUTERS.values())
        raise LorlibError(f"unknown router {spec!r}; use one of {known}")
    if cls.per_task and not per_task:
        raise LorlibError(f"router {name!r} {cls.per_task_hint}")
    if (problem := cls.unavailable(groups)) is not None:
        raise LorlibError(problem)
    if mix not in MIXES:
        raise LorlibError(f"unknown mix {mix!r}; use {' or '.join(MIXES)}")
    settings = RouterSettings(top_k, temperature, mix, density)
    members = experts
    if group:
        if not cls.groupable:
            *most, last = [c.name for c in _ordered() if c.groupable]
            limitable = f"{', '.join(most)} and {last}" if most else last
            raise LorlibError(f"only {limitable} can be limited to a group, not {spec + '@' + group!r}")
        members = groups.get(group)
        if not members:
            known = ", ".join(g for g, m in groups.items() if m) or "none"
            raise LorlibError(f"no experts in group {group!r} (groups: {known})")
    elif cls.applies_experts and not experts:
        raise LorlibError(f"router {spec!r} needs experts, but the library is empty")
    subtracted = groups.get(cls.subtracts, []) if cls.subtracts else []
    if subtracted:
        members = [m for m in members if m not in subtracted]
        if not members:
            where = f"group {group!r}" if group else "the library"
            raise LorlibError(f"router {name!r} routes over the experts that are not {cls.subtracts}; {where} has none")
    router = cls.from_spec(argument, members, settings)
    if group or subtracted:
        router = router.limit(group or None, tuple(experts.index(m) for m in members))
    if subtracted:
        router = replace(router, subtracted=tuple(experts.index(m) for m in subtracted))
    return router


# The command that computes a key set a router needs (`Router.needs`), for menus and refusals.
KEY_COMMANDS = {"gates": "lorlib gates LIBRARY", "activations": "lorlib activations LIBRARY"}


def _candidates(
    cls: type[Router], experts: list[str], groups: dict[str, list[str]], learned: dict[str, list[str]]
) -> list[tuple[str, list[str]]]:
    """Every spec of one router class a library could run, with the experts each would use: the
    router, limited to each group of two or more experts where it can be, each expert alone, or
    each learned router (with the experts it mixes)."""
    if cls.argument and cls.argument_of == "learned":
        return [(f"{cls.name}:{name}", mixed) for name, mixed in learned.items()]
    if cls.argument:
        return [(f"{cls.name}:{name}", [name]) for name in experts]
    left_out = set(groups.get(cls.subtracts, [])) if cls.subtracts else set()
    specs = [(cls.name, [x for x in experts if x not in left_out])]
    if cls.groupable:  # groups it can choose among two or more of
        for g, members in groups.items():
            if len(kept := [m for m in members if m not in left_out]) > 1:
                specs.append((f"{cls.name}@{g}", kept))
    return specs


def menu(
    experts: list[str],
    groups: dict[str, list[str]],
    lacking: dict[str, list[str]] | None = None,
    learned: dict[str, list[str]] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The router specs a library can run, and those it cannot yet, each with one line saying
    what is missing and how to get it. `lacking` maps a key set (gates, activations) to the
    experts without it; `learned` maps the library's usable learned routers to the experts they
    mix. Routers that choose per evaluated task (the oracle, LoraHub) are not offered: they run
    in evaluations."""
    lacking, learned = lacking or {}, learned or {}
    specs: list[str] = []
    missing: dict[str, str] = {}
    for cls in _ordered():
        if cls.per_task:
            continue
        if (problem := cls.unavailable(groups)) is not None:
            missing[cls.name] = problem
            continue
        for spec, used in _candidates(cls, experts, groups, learned):
            if cls.needs and (short := [x for x in used if x in set(lacking.get(cls.needs, []))]):
                missing[spec] = (
                    f"needs {cls.needs} for {len(short)} of its {len(used)} experts: "
                    f"run `{KEY_COMMANDS.get(cls.needs, cls.needs)}`"
                )
            else:
                specs.append(spec)
    specs.sort(key=lambda s: ":" in s)  # experts alone last
    return specs, missing


def explain(spec: str) -> str:
    """One line about a router spec, for menus: what the router does, and the group it uses."""
    spec, _, group = spec.partition("@")
    name, _, argument = spec.partition(":")
    cls = ROUTERS.get(name)
    if cls is None:
        return ""
    line = cls.summary + (f" ({argument})" if argument else "")
    return line + (f"; only the {group} experts" if group else "")


def presets() -> dict[str, str]:
    """The comparisons `evaluate` runs by default, by name: the paper's baselines and Arrow."""
    return {name: spec for cls in ROUTERS.values() for name, spec in cls.presets.items()}


def evaluable() -> dict[str, bool]:
    """Every router an evaluation can run by name, and whether it runs by default: the presets,
    then the few-shot routers (LoraHub), which search per task and so are run only when asked."""
    few_shot = {cls.name: False for cls in ROUTERS.values() if cls.few_shot}
    return {name: True for name in presets()} | few_shot
