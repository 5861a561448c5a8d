"""GenKnowSub (`arrow_gks`): Arrow over the experts minus the mean of the general ones."""

import pytest
import torch
from conftest import library_snapshot, make_adapter
from conftest import relative_error as _rel
from conftest import routed_logits as _logits
from conftest import routing_ids as _ids
from transformers import AutoModelForCausalLM

from lorlib_ui.core.adapters import read_adapter
from lorlib_ui.core.base_model import base_model_info
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library, expert_from_adapter
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router, menu

# task experts and general ones interleaved, so that no code may assume the general ones come last
ORDER = [("task0", "imported"), ("gen0", "general"), ("task1", "imported"), ("task2", "private")]
ORDER += [("gen1", "general"), ("task3", "imported")]


def _library(path, base, folders: dict, order=ORDER) -> Library:
    info = base_model_info(str(base))
    library = Library.create(path, info)
    entries = []
    for name, kind in order:
        adapter = read_adapter(folders[name])
        entries.append((expert_from_adapter(name, adapter, info.name, kind=kind), adapter))
    library.add_experts(entries)
    return library


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_base, tiny_adapters):
    root = tmp_path_factory.mktemp("general")
    general = {f"gen{i}": make_adapter(root / f"gen{i}", tiny_base, seed=20 + i) for i in range(2)}
    return {f"task{i}": tiny_adapters[i] for i in range(4)} | general


@pytest.fixture(scope="module")
def gks_routed(tmp_path_factory, tiny_base, folders):
    return RoutedModel.load(_library(tmp_path_factory.mktemp("lib") / "lib", tiny_base, folders), device="cpu")


def _router(rm, spec="arrow_gks", **options):
    return make_router(spec, rm.experts, groups=rm.library.groups(), **options)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_arrow_gks_equals_peft_create_arrow_model_with_gks(tiny_base, folders, gks_routed, top_k, temperature):
    from peft import ArrowConfig, create_arrow_model

    tasks = [name for name, kind in ORDER if kind != "general"]
    general = [name for name, kind in ORDER if kind == "general"]
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=True, rng_seed=0)
    peft_model = create_arrow_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        [str(folders[n]) for n in tasks],
        config,
        general_adapter_paths=[str(folders[n]) for n in general],
    )
    with torch.no_grad():
        expected = peft_model(input_ids=_ids(gks_routed)).logits
    router = _router(gks_routed, top_k=top_k, temperature=temperature)
    ours = _logits(gks_routed, router)
    assert _rel(ours, expected) < 1e-4 and (ours - expected).abs().max() < 1e-4
    assert _rel(_logits(gks_routed, _router(gks_routed, "base")), expected) > 1e-2  # experts applied
    # the subtraction matters: Arrow over the same task experts, unsubtracted, is far from it
    plain = make_router(
        "arrow@tasks", gks_routed.experts, top_k=top_k, temperature=temperature, groups={"tasks": tasks}
    )
    assert _rel(_logits(gks_routed, plain), expected) > 1e-3


def test_the_subtracted_experts_are_the_closed_form(gks_routed, folders):
    """A_e − Ā and B_e − B̄ for every routed expert, Ā and B̄ the plain means of the general
    experts' factors; prototypes the top right singular vectors of (B_e − B̄)(A_e − Ā); general
    experts as they are, and the layer's own factors untouched."""
    router = _router(gks_routed)
    names = gks_routed.experts
    general = [names.index(n) for n in ("gen0", "gen1")]
    assert router.subset == tuple(i for i in range(6) if i not in general) and router.subtracted == tuple(general)
    adapters = {n: read_adapter(folders[n]) for n in names}
    for module in gks_routed.modules[:3]:
        layer = gks_routed.model.get_submodule(module)
        own_a, own_bt = layer.lora_a.clone(), layer.lora_bt.clone()
        stack = router.stack(layer)
        mean_a = torch.stack([adapters[n].factors[module][0] for n in ("gen0", "gen1")]).mean(0)
        mean_b = torch.stack([adapters[n].factors[module][1] for n in ("gen0", "gen1")]).mean(0)
        a, bt = stack.lora_a.view(6, 4, -1), stack.lora_bt.view(6, 4, -1)
        for e, name in enumerate(names):
            a_e, b_e = adapters[name].factors[module]
            if e in general:
                assert torch.equal(a[e], a_e) and torch.equal(bt[e], b_e.T)
                continue
            assert torch.allclose(a[e], a_e - mean_a, atol=1e-6) and torch.allclose(bt[e], (b_e - mean_b).T, atol=1e-6)
            delta = ((b_e - mean_b) @ (a_e - mean_a)).double()
            top = torch.linalg.svd(delta).Vh[0]
            assert (stack.keys["prototypes"][e].double() @ top).abs() > 1 - 1e-6
            assert torch.equal(stack.scales[e], layer.scales[e])  # each keeps its own LoRA scale
        assert torch.equal(layer.lora_a, own_a) and torch.equal(layer.lora_bt, own_bt)
        assert router.stack(layer) is stack  # derived once per layer


def test_general_experts_are_never_chosen(gks_routed):
    general = [gks_routed.experts.index(n) for n in ("gen0", "gen1")]
    router = _router(gks_routed, top_k=4, temperature=50.0)  # every task expert, with weight
    with torch.no_grad(), gks_routed.routing(router, record=True) as builder:
        gks_routed.model(input_ids=_ids(gks_routed))
    for module in gks_routed.modules:
        weights = torch.cat(builder.weights[module])
        assert (weights[:, general] == 0).all() and ((weights > 0).sum(-1) == 4).all()
        assert torch.allclose(weights.sum(-1), torch.ones(len(weights)), atol=1e-5)
    # limited to a group that holds a general expert: still only the group's task experts
    mixed = make_router(
        "arrow_gks@mixed", gks_routed.experts, groups={"mixed": ["task0", "gen0", "task1"], "general": ["gen0", "gen1"]}
    )
    assert mixed.subset == (0, 2) and mixed.subtracted == (1, 4) and mixed.top_k == 2
    assert mixed.describe() == "arrow_gks@mixed(top_k=2, T=1, mix=outputs)"


def test_the_menu_offers_arrow_gks_only_with_general_experts():
    groups = {"private": ["a", "b", "g"], "cluster": [], "general": []}
    assert not any(s.startswith("arrow_gks") for s in menu(["a", "b", "g"], groups)[0])
    groups["general"] = ["g", "h"]
    specs, _ = menu(["a", "b", "g", "h"], groups)
    assert specs[:4] == ["arrow", "arrow@private", "arrow@general", "arrow_gks"]
    assert "arrow_gks@private" in specs and "arrow_gks@general" not in specs  # no task experts in it


@pytest.mark.parametrize(
    ("spec", "groups", "message"),
    [
        ("arrow_gks", {"private": ["a", "b"], "general": []}, "arrow_gks needs experts of kind general"),
        ("arrow_gks@private", {"private": ["a", "b"]}, "lorlib mark-general LIB NAME"),
        ("arrow_gks@general", {"general": ["a", "b"]}, "not general; group 'general' has none"),
        ("arrow_gks", {"general": ["a", "b"]}, "not general; the library has none"),
        ("arrow_gks:x", {"general": ["a"]}, "unknown router 'arrow_gks:x'"),
    ],
)
def test_bad_arrow_gks_specs_are_one_line(spec, groups, message):
    with pytest.raises(LorlibError, match=message) as refused:
        make_router(spec, ["a", "b"], groups=groups)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("general", "message"),
    [
        ({"rank": 2}, "the general and the routed experts have ranks 2, 4"),
        ({"targets": ["q_proj", "v_proj"]}, "no general expert adapts model.layers.0.self_attn.k_proj"),
    ],
)
def test_subtraction_needs_one_rank_and_general_experts_on_every_layer(tmp_path, tiny_base, folders, general, message):
    """PEFT refuses such libraries too; here the refusal is one line, before any token is routed."""
    folders = folders | {"odd": make_adapter(tmp_path / "odd", tiny_base, seed=30, **general)}
    library = _library(tmp_path / "lib", tiny_base, folders, [("task0", "imported"), ("odd", "general")])
    rm = RoutedModel.load(library, device="cpu")
    before = library_snapshot(library.path)
    with pytest.raises(LorlibError, match=message) as refused, rm.routing(_router(rm)):
        pytest.fail("routed")
    assert "\n" not in str(refused.value) and rm.state.router is None
    assert library_snapshot(library.path) == before
    # Arrow itself does not subtract, and runs on the same library
    assert _rel(_logits(rm, _router(rm, "arrow")), _logits(rm, _router(rm, "base"))) > 1e-3


@pytest.mark.parametrize("mix", ["outputs", "parameters"])
def test_one_token_gather_path_uses_the_subtracted_experts(gks_routed, mix):
    """Decoding one token on a CPU gathers the chosen experts' rows: from the subtracted stack."""
    router = _router(gks_routed, top_k=2, mix=mix)
    layer = gks_routed.model.get_submodule(gks_routed.modules[2])
    x = torch.randn(1, 1, layer.base.in_features, generator=torch.Generator().manual_seed(5))
    outputs = {}
    with torch.no_grad(), gks_routed.routing(router):
        for gather in (True, False):
            layer.gather_chosen = gather
            outputs[gather] = layer(x)
    layer.gather_chosen = True
    assert torch.allclose(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)
