"""The router registry: kinds, the `register` decorator, settings checked by their configs, and
`plan_router`, which makes every check of `make_router` and builds nothing."""

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import ClassVar

import pytest

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers import (
    ROUTERS,
    MergeRouter,
    Router,
    RouterPlan,
    TaskRouter,
    TokenRouter,
    help_text,
    make_router,
    menu,
    plan_router,
    register,
)
from lorlib_ui.core.routers.per_token import TopKConfig, TopKRouter
from lorlib_ui.core.routers.ties import TiesConfig

# the order menus, help texts and evaluation tables list the routers in
BUILT_IN = [
    "base",
    "uniform",
    "mean_delta",
    "ties",
    "arrow",
    "arrow_gks",
    "spectral",
    "phatgoose",
    "avg_act",
    "expert",
    "poly",
    "oracle",
    "lorahub",
]
HOOKS = {MergeRouter: ("weights", "merge"), TokenRouter: ("route", "stack", "prepare_keys"), TaskRouter: ("for_task",)}


@pytest.fixture
def registry():
    """The registry, restored after the test whatever it registered."""
    saved = dict(ROUTERS)
    yield ROUTERS
    ROUTERS.clear()
    ROUTERS.update(saved)


def test_the_built_in_routers_are_registered_in_menu_order_each_of_one_kind_with_its_hooks_only():
    assert list(ROUTERS) == BUILT_IN
    for cls in ROUTERS.values():
        (kind,) = [k for k in HOOKS if issubclass(cls, k)]
        others = [hook for k, hooks in HOOKS.items() if k is not kind for hook in hooks]
        assert all(hasattr(cls, hook) for hook in HOOKS[kind]), cls
        assert not any(hasattr(cls, hook) for hook in others), cls
    configs = {name: cls.config for name, cls in ROUTERS.items() if cls.config is not None}
    top_k = dict.fromkeys(["arrow", "arrow_gks", "spectral", "phatgoose", "avg_act"], TopKConfig)
    assert configs == {"ties": TiesConfig} | top_k


def test_the_decorator_registers_in_order_and_the_registry_offers_what_it_registers(registry):
    @dataclass(frozen=True)
    class HalfConfig:
        density: float = 0.5

        def __post_init__(self):
            if not 0 < self.density < 1:
                raise LorlibError(f"half needs a density in (0, 1), got {self.density}")

    @register(HalfConfig)
    @dataclass(frozen=True)
    class HalfRouter(MergeRouter):
        name: ClassVar[str] = "half"
        summary: ClassVar[str] = "every expert at a weight"
        groupable: ClassVar[bool] = True

        weight: float = 0.5

        @classmethod
        def build(cls, argument, experts, config):
            return cls(weight=config.density)

        def weights(self, slot):
            return slot.usable(self.subset)[0].float() * self.weight

    @register(TopKConfig)
    @dataclass(frozen=True)
    class EchoRouter(TopKRouter):
        name: ClassVar[str] = "echo"
        summary: ClassVar[str] = "each token to the experts it scores highest"

    assert list(registry) == [*BUILT_IN, "half", "echo"]
    assert HalfRouter.config is HalfConfig and EchoRouter.config is TopKConfig
    experts, groups = ["a", "b", "c"], {"private": ["a", "b"]}
    assert help_text().startswith("arrow, arrow_gks, spectral, phatgoose, avg_act, echo, base")  # per-token first
    assert {"half", "half@private", "echo", "echo@private"} <= set(menu(experts, groups)[0])
    router = make_router("half@private", experts, groups=groups, density=0.25)
    assert router == HalfRouter(group="private", subset=(0, 1), weight=0.25)
    with pytest.raises(LorlibError, match=r"^half needs a density in \(0, 1\), got 2$"):
        make_router("half", experts, density=2)
    assert (
        make_router("echo@private", experts, top_k=1, groups=groups).describe()
        == "echo@private(top_k=1, T=1, mix=outputs)"
    )


def test_the_decorator_refuses_what_the_registry_could_not_list(registry):
    class Loose(MergeRouter):
        name: ClassVar[str] = "loose"

    with pytest.raises(TypeError, match="a router named 'arrow' is registered already"):
        register()(type("Again", (TokenRouter,), {"name": "arrow"}))
    with pytest.raises(TypeError, match="must be a MergeRouter, TokenRouter, TaskRouter"):
        register()(type("Kindless", (Router,), {"name": "kindless"}))
    with pytest.raises(TypeError, match="must be a frozen dataclass"):
        register(dataclass(type("Mutable", (), {"__annotations__": {"top_k": int}})))(Loose)
    with pytest.raises(TypeError, match="declares budget, not settings"):
        register(dataclass(frozen=True)(type("Budget", (), {"__annotations__": {"budget": int}})))(Loose)
    assert list(registry) == BUILT_IN


@pytest.mark.parametrize(
    "config, settings, message",
    [
        (TopKConfig, {"experts": 3, "top_k": 0}, r"top-k must be between 1 and the number of experts \(3\), got 0"),
        (TopKConfig, {"experts": 3, "top_k": 4}, r"top-k must be between 1 and the number of experts \(3\), got 4"),
        (TopKConfig, {"experts": 3, "temperature": 0.0}, "temperature must be positive, got 0.0"),
        (TopKConfig, {"experts": 3, "temperature": float("inf")}, "temperature must be positive, got inf"),
        (TopKConfig, {"experts": 3, "mix": "sum"}, "unknown mix 'sum'; use outputs or parameters"),
        (TiesConfig, {"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
        (TiesConfig, {"density": float("nan")}, r"density must be in \(0, 1\], got nan"),
    ],
)
def test_a_config_refuses_bad_settings_itself_with_make_routers_message(config, settings, message):
    with pytest.raises(LorlibError, match=f"^{message}$"):
        config(**settings)
    spec = "ties" if config is TiesConfig else "arrow"
    given = {k: v for k, v in settings.items() if k != "experts"}
    with pytest.raises(LorlibError, match=f"^{message}$"):
        make_router(spec, ["a", "b", "c"], **given)


def test_a_config_is_frozen_and_checked_again_when_changed():
    config = TopKConfig(experts=3, top_k=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 3
    assert dataclasses.replace(config, top_k=3).top_k == 3 and config.top_k == 2
    with pytest.raises(LorlibError, match="got 5"):
        dataclasses.replace(config, top_k=5)


def test_plan_router_checks_builds_nothing_and_changes_nothing():
    experts = ["a", "b", "c", "g"]
    groups = {"private": ["a", "b", "c"], "general": ["g"]}
    before = (copy.deepcopy(experts), copy.deepcopy(groups), dict(ROUTERS))
    plan = plan_router("arrow_gks@private", experts, top_k=2, temperature=0.5, groups=groups)
    assert (experts, groups, dict(ROUTERS)) == before
    assert plan == RouterPlan(
        router=ROUTERS["arrow_gks"],
        argument="",
        group="private",
        experts=("a", "b", "c"),
        subset=(0, 1, 2),
        subtracted=(3,),
        config=TopKConfig(experts=3, top_k=2, temperature=0.5),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.group = None
    router = plan.build()
    assert router == make_router("arrow_gks@private", experts, top_k=2, temperature=0.5, groups=groups)
    assert router.subset == (0, 1, 2) and router.subtracted == (3,) and router.top_k == 2
    assert plan_router("poly:stored", experts).build().learned == "stored"  # no library read to plan or build


EXPERTS = ["a", "b", "c", "general"]
GROUPS = [
    {},
    {"private": ["a", "b"], "cluster": ["c"], "general": ["general"]},
    {"private": ["a"], "cluster": [], "general": []},
]
SPECS = [*BUILT_IN, *(f"{n}@private" for n in BUILT_IN), "arrow@cluster", "uniform@none", "expert:a", "expert:x"]
SPECS += ["poly:saved", "poly:../x", "expert", "arrow:a", "nonsense"]
SETTINGS = [
    {},
    {"top_k": 1, "temperature": 2.0, "mix": "parameters"},
    {"top_k": 0},
    {"top_k": 3},
    {"temperature": -1.0},
    {"mix": "sum"},
    {"density": 0.5},
    {"density": 1.5},
    {"top_k": 9, "temperature": 0.0, "mix": "sum", "density": 0.0},
]


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("per_task", [False, True])
def test_plan_router_reports_every_error_make_router_reports(groups, per_task):
    """Whatever the spec and settings, planning fails exactly where making fails, with the same
    one line, and a plan that passed builds the router `make_router` makes, without an error."""
    failed = 0
    for spec, settings, experts in itertools.product(SPECS, SETTINGS, [EXPERTS, []]):
        if not experts and groups:
            continue  # groups name experts of the library
        arguments = dict(settings, groups=groups, per_task=per_task)
        try:
            made = make_router(spec, experts, **arguments)
        except LorlibError as exc:
            failed += 1
            with pytest.raises(LorlibError) as planned:
                plan_router(spec, experts, **arguments)
            assert str(planned.value) == str(exc)
        else:
            assert repr(plan_router(spec, experts, **arguments).build()) == repr(made)  # every field
    assert failed  # the matrix does reach the checks


def test_routers_made_by_code_are_not_registered_and_poly_training_lives_beside_poly():
    from lorlib_ui.core.routers import poly
    from lorlib_ui.core.routers.lorahub import WeightedMerge
    from lorlib_ui.training import adaptation_methods

    assert poly.PolyTraining.__module__ == poly.PolyRouter.__module__ == "lorlib_ui.core.routers.poly"
    assert adaptation_methods.PolyTraining is poly.PolyTraining  # what train_poly trains
    assert issubclass(poly.PolyRouter, MergeRouter) and issubclass(poly.PolyTraining, TokenRouter)
    specs, missing = menu(["a", "b"], {"private": ["a", "b"]}, learned={"l": ["a", "b"]})
    for cls in (poly.PolyTraining, WeightedMerge):
        assert cls.name not in ROUTERS and not any(cls.name in s for s in [*specs, *missing, help_text()])
        with pytest.raises(LorlibError, match=f"unknown router '{cls.name}'"):
            make_router(cls.name, ["a", "b"])


def test_a_per_task_router_does_not_route_until_an_evaluation_resolves_it(tiny_routed):
    from lorlib_ui.core.routers.oracle import OracleRouter

    refused = "^router oracle picks its expert per evaluated task; use it with evaluate$"
    with pytest.raises(LorlibError, match=refused), tiny_routed.routing(OracleRouter()):
        pass
    assert tiny_routed.state.router is None
