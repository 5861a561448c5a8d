"""The one registry of routers: every name a user can type, a menu can offer or `evaluate` can run.

A spec names a registered router, with its argument and group where it takes them:
`arrow`, `arrow@private`, `uniform@cluster`, `expert:NAME`, `base`. Making a router from a spec
is a plan and a build. `plan_router` parses the spec and makes every check against the
library's experts and groups, and against the router's settings (its config checks those), with
no side effects: it returns a `RouterPlan`, plain data. `RouterPlan.build` then asks the router
class to build itself; `make_router` does both. A router that subtracts a group (GenKnowSub's
`arrow_gks`, the "general" experts) is limited to the other experts and told the indices of that
group's. Menus (`menu`), help texts (`help_text`) and the evaluation's comparisons (`presets`) are
all read from the routers registered here.

Adding a router: write its class in a module of this package, a subclass of its kind
(`MergeRouter` with `weights`, `TokenRouter` with `route` or `per_token.TopKRouter` with `logits`,
`TaskRouter` with `for_task`) that sets its name, summary and what its spec takes, decorate it
with `register` (with the frozen dataclass of its settings, if it takes any), and import its
module below, where its routers belong in the menus.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.base import ROUTERS, Router, TaskRouter, TokenRouter, check_mix

# Importing a module registers its routers (`register`), and menus, help texts and evaluation
# tables list them in the order they were registered: the static merges, the per-token routers,
# the routers of one named expert or learned router, then the per-task routers. So these imports
# keep that order, not the alphabet's.
# isort: off
from lorlib_ui.core.routers import merges, ties  # noqa: F401
from lorlib_ui.core.routers import arrow, gks, spectral, phatgoose, avg_act  # noqa: F401
from lorlib_ui.core.routers import expert, poly, oracle, lorahub  # noqa: F401

# isort: on


def _ordered() -> list[type[Router]]:
    """As menus and help list them: per-token routers first (what the explorer is about), then
    the others, each in registry order."""
    return sorted(ROUTERS.values(), key=lambda cls: not issubclass(cls, TokenRouter))


def _spec_of(cls: type[Router]) -> str:
    return cls.name + (f":{cls.argument}" if cls.argument else "")


def help_text() -> str:
    """One line listing the routers and how specs are written, for CLI help."""
    offered = [cls for cls in _ordered() if not issubclass(cls, TaskRouter)]
    names = ", ".join(_spec_of(cls) for cls in offered)
    groupable = ", ".join(cls.name for cls in offered if cls.groupable)
    return f"{names}; {groupable} take @KIND to use only the experts of one kind (e.g. arrow@private)"


@dataclass(frozen=True)
class RouterPlan:
    """A router spec parsed and checked against a library's experts and groups: what
    `make_router` builds, as plain data. Building it makes no further check."""

    router: type[Router]  # the registered class
    argument: str  # after ':' ('' when the spec has none)
    group: str | None  # after '@'
    experts: tuple[str, ...]  # the experts it routes over, in library order
    subset: tuple[int, ...] | None  # their indices in the library, where it is limited to them
    subtracted: tuple[int, ...]  # the indices of the experts of the group it subtracts
    config: object | None  # its settings, checked (`Router.config`); None when it takes none

    def build(self) -> Router:
        router = self.router.build(self.argument, list(self.experts), self.config)
        if self.subset is not None:
            router = router.limit(self.group, self.subset)
        if self.subtracted:
            router = replace(router, subtracted=self.subtracted)
        return router


def plan_router(
    spec: str,
    experts: list[str],
    top_k: int | None = None,
    temperature: float = 1.0,
    mix: str = "outputs",
    groups: dict[str, list[str]] | None = None,
    per_task: bool = False,
    density: float | None = None,
) -> RouterPlan:
    """Every check of `make_router` (same arguments, same one-line errors), and nothing built:
    the router a spec names over the library's `experts` (names, in library order), limited to a
    group of `groups` when the spec says `@GROUP`, and to the experts outside the group it
    subtracts, if it subtracts one. Routers that choose per evaluated task (the oracle) are
    planned only when `per_task` says the caller resolves them per task."""
    groups = groups or {}
    spec, _, group = spec.partition("@")
    name, colon, argument = spec.partition(":")
    cls = ROUTERS.get(name)
    if cls is None or bool(colon) != bool(cls.argument):
        known = ", ".join(_spec_of(c) for c in ROUTERS.values())
        raise LorlibError(f"unknown router {spec!r}; use one of {known}")
    if issubclass(cls, TaskRouter) and not per_task:
        raise LorlibError(f"router {name!r} {cls.usage}")
    if (problem := cls.unavailable(groups)) is not None:
        raise LorlibError(problem)
    check_mix(mix)  # every spec is given a mix, whether its router reads it or not
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
    if (problem := cls.argument_problem(argument, members)) is not None:
        raise LorlibError(problem)
    config = None
    if cls.config is not None:  # it takes the settings it declares; those not given keep its defaults
        given = {"top_k": top_k, "temperature": temperature, "mix": mix, "density": density, "experts": len(members)}
        config = cls.config(**{f.name: given[f.name] for f in fields(cls.config) if given[f.name] is not None})
    return RouterPlan(
        router=cls,
        argument=argument,
        group=group or None,
        experts=tuple(members),
        subset=tuple(experts.index(m) for m in members) if group or subtracted else None,
        subtracted=tuple(experts.index(m) for m in subtracted),
        config=config,
    )


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
    only when `per_task` says the caller resolves them per task. See `plan_router`."""
    return plan_router(spec, experts, top_k, temperature, mix, groups, per_task, density).build()


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
        if issubclass(cls, TaskRouter):
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
    few_shot = {cls.name: False for cls in ROUTERS.values() if issubclass(cls, TaskRouter) and cls.few_shot}
    return {name: True for name in presets()} | few_shot
