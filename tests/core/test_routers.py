import shutil

import numpy as np
import pytest
import torch
from conftest import build_library, make_adapter
from conftest import relative_error as _rel
from conftest import routed_logits as _logits
from conftest import routing_ids as _ids
from transformers import AutoModelForCausalLM

from lorlib_ui.core.adapters import read_adapter, read_layout, write_adapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import TaskRouter, make_router


def _delta(adapter, module):
    a, b = adapter.factors[module]
    return adapter.scales[module] * b @ a


@pytest.mark.parametrize("top_k", [1, 2, 3, 6])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_arrow_equals_peft_create_arrow_model(tiny_base, tiny_adapters, tiny_routed, top_k, temperature):
    from peft import ArrowConfig, create_arrow_model

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    peft_model = create_arrow_model(base, [str(p) for p in tiny_adapters], config)
    with torch.no_grad():
        expected = peft_model(input_ids=_ids(tiny_routed)).logits
    ours = _logits(tiny_routed, make_router("arrow", tiny_routed.experts, top_k=top_k, temperature=temperature))
    assert _rel(ours, expected) < 1e-4
    # and the routing does something: far from the base model
    assert _rel(_logits(tiny_routed, make_router("base", tiny_routed.experts)), expected) > 1e-2


def test_prototypes_match_peft_buffer_on_dominant_adapters(tiny_base, tiny_adapters, tiny_routed):
    from peft import ArrowConfig, create_arrow_model

    peft_model = create_arrow_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), [str(p) for p in tiny_adapters], ArrowConfig(top_k=2)
    )
    with torch.no_grad():
        peft_model(input_ids=_ids(tiny_routed))  # PEFT builds prototypes lazily on the first forward
    checked = 0
    for name, module in peft_model.named_modules():
        arrow = getattr(module, "lora_arrow", None)
        if arrow is None or "arrow_router" not in arrow:
            continue
        router = arrow["arrow_router"]
        ours = tiny_routed.model.get_submodule(name.removeprefix("base_model.model.")).prototypes
        cos = (ours * router.prototypes).sum(-1).abs() / router.prototypes.norm(dim=-1)
        assert cos.min() > 0.999
        checked += 1
    assert checked == 8  # 2 layers x q, k, v, o


def test_routing_rows_sum_to_one_with_k_nonzeros(tiny_routed):
    # a high temperature keeps every chosen weight above float32 underflow (exp(-100) is 0)
    for k in (1, 2, 4, 6):
        router = make_router("arrow", tiny_routed.experts, top_k=k, temperature=50.0)
        with torch.no_grad(), tiny_routed.routing(router, record=True) as builder:
            tiny_routed.model(input_ids=_ids(tiny_routed))
        for module in tiny_routed.modules:
            weights = torch.cat(builder.weights[module])
            assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[0]), atol=1e-5)
            assert ((weights > 0).sum(-1) == k).all()


def test_top1_outputs_and_parameters_agree(tiny_routed):
    outputs = _logits(tiny_routed, make_router("arrow", tiny_routed.experts, top_k=1, mix="outputs"))
    params = _logits(tiny_routed, make_router("arrow", tiny_routed.experts, top_k=1, mix="parameters"))
    assert _rel(params, outputs) < 1e-5
    # with k > 1 the two mixes differ (cross terms B_e A_f)
    outputs3 = _logits(tiny_routed, make_router("arrow", tiny_routed.experts, top_k=3, mix="outputs"))
    params3 = _logits(tiny_routed, make_router("arrow", tiny_routed.experts, top_k=3, mix="parameters"))
    assert _rel(params3, outputs3) > 1e-4


def _with_dense_updates(base_path, updates):
    model = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        for module, delta in updates.items():
            model.get_submodule(module).weight += delta
    return model


def test_merges_equal_closed_forms(tiny_base, tiny_adapters, tiny_routed):
    adapters = [read_adapter(p) for p in tiny_adapters]
    modules = tiny_routed.modules
    ids = _ids(tiny_routed)
    # uniform µ: (mean of s·B) (mean of A)
    mu = {}
    for m in modules:
        mean_a = torch.stack([a.factors[m][0] for a in adapters]).mean(0)
        mean_b = torch.stack([a.scales[m] * a.factors[m][1] for a in adapters]).mean(0)
        mu[m] = mean_b @ mean_a
    mean_delta = {m: torch.stack([_delta(a, m) for a in adapters]).mean(0) for m in modules}
    single = {m: _delta(adapters[2], m) for m in modules}
    for spec, updates in (("uniform", mu), ("mean_delta", mean_delta), (f"expert:{tiny_routed.experts[2]}", single)):
        with torch.no_grad():
            expected = _with_dense_updates(tiny_base, updates)(input_ids=ids).logits
        assert _rel(_logits(tiny_routed, make_router(spec, tiny_routed.experts)), expected) < 1e-4, spec


def _ties_reference(tensors: list[np.ndarray], density: float, sizes: list[int] | None = None) -> np.ndarray:
    """TIES written out entry by entry (Yadav et al., 2023): trim, elect sign, disjoint mean.
    `sizes`: how many leading entries of each flattened tensor are its own (the rest padding)."""
    trimmed = []
    for i, t in enumerate(tensors):
        flat = t.flatten()
        size = flat.size if sizes is None else sizes[i]
        keep = int(np.ceil(density * size))
        order = np.argsort(-np.abs(flat[:size]), kind="stable")[:keep]
        out = np.zeros_like(flat)
        out[order] = flat[order]
        trimmed.append(out)
    merged = np.zeros_like(trimmed[0])
    for j in range(merged.size):
        values = [t[j] for t in trimmed]
        sign = np.sign(sum(values))
        agreeing = [v for v in values if v != 0 and np.sign(v) == sign]
        merged[j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return merged.reshape(tensors[0].shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_a_direct_implementation(tiny_base, tiny_adapters, tiny_routed, density):
    """TIES on the A's and on the scaled B's, as the paper's code merges LoRA experts."""
    adapters = [read_adapter(p) for p in tiny_adapters]
    updates = {}
    for m in tiny_routed.modules:
        a = _ties_reference([x.factors[m][0].double().numpy() for x in adapters], density)
        b = _ties_reference([(x.scales[m] * x.factors[m][1]).double().numpy() for x in adapters], density)
        updates[m] = torch.from_numpy(b @ a).float()
    with torch.no_grad():
        expected = _with_dense_updates(tiny_base, updates)(input_ids=_ids(tiny_routed)).logits
    router = make_router("ties", tiny_routed.experts, density=density)
    assert router.describe() == f"ties(density={density:g})"
    assert _rel(_logits(tiny_routed, router), expected) < 1e-4
    # one expert alone, nothing trimmed: that expert
    alone = make_router("ties@one", tiny_routed.experts, density=1.0, groups={"one": [tiny_routed.experts[2]]})
    single = _logits(tiny_routed, make_router(f"expert:{tiny_routed.experts[2]}", tiny_routed.experts))
    assert _rel(_logits(tiny_routed, alone), single) < 1e-5


def test_ties_trims_each_expert_among_its_own_entries():
    """An expert of lower rank is padded with zero rows; its density share counts its own entries."""
    from lorlib_ui.core.routers.ties import ties_merge

    rng = np.random.default_rng(3)
    high = rng.normal(size=(2, 5))
    low = np.vstack([rng.normal(size=(1, 5)), np.zeros((1, 5))])  # rank 1, padded to 2
    expected = _ties_reference([high, low], 0.4, sizes=[10, 5])
    got = ties_merge(torch.from_numpy(np.stack([high, low])), [10, 5], 0.4).numpy()
    assert np.allclose(got, expected)
    assert not np.allclose(got, _ties_reference([high, low], 0.4))  # padding counted: another merge


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_ties_refuses_a_density_outside_0_1(density):
    with pytest.raises(LorlibError, match=r"density must be in \(0, 1\]"):
        make_router("ties", ["e0", "e1"], density=density)


def test_single_expert_equals_peft_model(tiny_base, tiny_adapters, tiny_routed):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapters[1])
    with torch.no_grad():
        expected = peft_model(input_ids=_ids(tiny_routed)).logits
    ours = _logits(tiny_routed, make_router(f"expert:{tiny_routed.experts[1]}", tiny_routed.experts))
    assert _rel(ours, expected) < 1e-5


def test_base_router_is_the_base_model(tiny_base, tiny_routed):
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=_ids(tiny_routed)).logits
    assert _rel(_logits(tiny_routed, make_router("base", tiny_routed.experts)), expected) < 1e-6


def test_mixed_ranks_and_targets(tmp_path, tiny_base):
    """Experts with different ranks and target modules share one library (PEFT's Arrow refuses this).
    With top_k = all experts at T -> small, Arrow at each layer must equal the dense sum over the
    experts present there, weighted by the softmax of |h·v|."""
    dirs = [
        make_adapter(tmp_path / "r2_qv", tiny_base, seed=10, rank=2, targets=["q_proj", "v_proj"]),
        make_adapter(tmp_path / "r8_all", tiny_base, seed=11, rank=8),
        make_adapter(tmp_path / "r4_o", tiny_base, seed=12, rank=4, targets=["o_proj"]),
    ]
    library = build_library(tmp_path / "lib", tiny_base, dirs)
    rm = RoutedModel.load(library, device="cpu")
    router = make_router("arrow", rm.experts, top_k=3)
    with torch.no_grad(), rm.routing(router, record=True) as builder:
        rm.model(input_ids=_ids(rm))
    weights = {m: torch.cat(builder.weights[m]) for m in rm.modules}
    # o_proj is adapted by r8_all and r4_o only: r2_qv never gets weight there
    o_proj = "model.layers.0.self_attn.o_proj"
    assert (weights[o_proj][:, 0] == 0).all() and (weights[o_proj][:, 1:] > 0).all()
    # k_proj is adapted by r8_all alone: it takes all the weight
    assert torch.allclose(weights["model.layers.1.self_attn.k_proj"][:, 1], torch.ones(len(weights[o_proj])))
    # each expert alone equals PEFT's own application of it
    from peft import PeftModel

    for i, folder in enumerate(dirs):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), folder)
        with torch.no_grad():
            expected = peft_model(input_ids=_ids(rm)).logits
        assert _rel(_logits(rm, make_router(f"expert:{rm.experts[i]}", rm.experts)), expected) < 1e-5
    # uniform merge over mixed ranks runs and moves away from the base model
    assert _rel(_logits(rm, make_router("uniform", rm.experts)), _logits(rm, make_router("base", rm.experts))) > 1e-3
    # so does TIES, which trims each expert by its own rank's entries, not the padding
    assert _rel(_logits(rm, make_router("ties", rm.experts)), _logits(rm, make_router("base", rm.experts))) > 1e-3


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("arrow", {"top_k": 0}, "top-k must be between 1 and the number of experts"),
        ("arrow", {"top_k": 7}, "top-k must be between 1 and the number of experts"),
        ("arrow", {"temperature": 0.0}, "temperature must be positive"),
        ("arrow", {"temperature": -1.0}, "temperature must be positive"),
        ("arrow", {"temperature": float("nan")}, "temperature must be positive"),
        ("expert:nope", {}, "unknown expert 'nope'"),
        ("nonsense", {}, "unknown router 'nonsense'"),
        ("arrow", {"mix": "both"}, "unknown mix"),
    ],
)
def test_router_options_are_checked(spec, kwargs, message):
    with pytest.raises(LorlibError, match=message):
        make_router(spec, [f"e{i}" for i in range(6)], **kwargs)


def test_routers_need_experts():
    with pytest.raises(LorlibError, match="library is empty"):
        make_router("arrow", [])
    assert make_router("base", []).name == "base"


@pytest.mark.parametrize("mix", ["outputs", "parameters"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_one_token_gather_path_equals_dense_path(tiny_routed, mix, top_k):
    """Decoding one token on a CPU gathers only the chosen experts' rows; it must equal the dense path."""
    router = make_router("arrow", tiny_routed.experts, top_k=top_k, mix=mix)
    layer = tiny_routed.model.get_submodule(tiny_routed.modules[5])
    x = torch.randn(1, 1, layer.base.in_features, generator=torch.Generator().manual_seed(top_k))
    outputs = {}
    with torch.no_grad(), tiny_routed.routing(router):
        for gather in (True, False):
            layer.gather_chosen = gather
            outputs[gather] = layer(x)
    layer.gather_chosen = True
    assert torch.allclose(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[True], layer.base(x), atol=1e-4)  # experts were applied


def test_sixteen_bit_experts_stay_sixteen_bit_and_exact(tmp_path, tiny_base, tiny_adapters):
    """Experts stored in bfloat16 are kept in bfloat16 and widened only for the arithmetic, so the
    result equals PEFT's, which upcasts such adapters to float32 when it loads them."""
    from peft import ArrowConfig, create_arrow_model
    from safetensors.torch import load_file, save_file

    folders = []
    for src in tiny_adapters[:4]:
        dst = tmp_path / f"bf16_{src.name}"
        shutil.copytree(src, dst)
        tensors = load_file(dst / "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, dst / "adapter_model.safetensors")
        folders.append(dst)
    rm = RoutedModel.load(build_library(tmp_path / "lib", tiny_base, folders), device="cpu")
    layer = rm.model.get_submodule(rm.modules[0])
    assert layer.lora_a.dtype == torch.bfloat16 and layer.lora_bt.dtype == torch.bfloat16
    assert layer.prototypes.dtype == torch.float32
    peft_model = create_arrow_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), [str(f) for f in folders], ArrowConfig(top_k=2, rng_seed=0)
    )
    with torch.no_grad():
        expected = peft_model(input_ids=_ids(rm)).logits
    assert _rel(_logits(rm, make_router("arrow", rm.experts, top_k=2)), expected) < 1e-4
    for mix in ("outputs", "parameters"):  # the one-token gather path widens the chosen rows too
        router = make_router("arrow", rm.experts, top_k=1, mix=mix)
        x = torch.randn(1, 1, layer.base.in_features)
        with torch.no_grad(), rm.routing(router):
            gathered = layer(x)
            layer.gather_chosen = False
            dense = layer(x)
            layer.gather_chosen = True
        assert torch.allclose(gathered, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["arrow", "uniform", "mean_delta"])
def test_router_limited_to_a_group_equals_that_group_alone(tmp_path, tiny_base, tiny_adapters, tiny_routed, spec):
    """arrow@g over the whole library must route exactly as arrow over a library holding only g."""
    members = [tiny_routed.experts[i] for i in (1, 3, 4)]
    small = RoutedModel.load(build_library(tmp_path / "small", tiny_base, [tiny_adapters[i] for i in (1, 3, 4)]))
    expected = _logits(small, make_router(spec, small.experts, top_k=2))
    limited = make_router(f"{spec}@g", tiny_routed.experts, top_k=2, groups={"g": members})
    assert limited.describe().startswith(f"{spec}@g")
    with torch.no_grad(), tiny_routed.routing(limited, record=True) as builder:
        ours = tiny_routed.model(input_ids=_ids(tiny_routed)).logits
    assert _rel(ours, expected) < 1e-5
    weights = torch.cat(builder.weights[tiny_routed.modules[0]])
    outside = [i for i in range(len(tiny_routed.experts)) if tiny_routed.experts[i] not in members]
    assert (weights[:, outside] == 0).all() and (weights.sum(-1) - 1).abs().max() < 1e-5
    # unlimited, the same router does use the other experts
    assert _rel(_logits(tiny_routed, make_router(spec, tiny_routed.experts, top_k=2)), expected) > 1e-3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("arrow@nope", "no experts in group 'nope'"),
        ("arrow@empty", "no experts in group 'empty'"),
        ("expert:e1@g", "only arrow, arrow_gks, .*, uniform, mean_delta, ties and lorahub can be limited"),
        ("base@g", "only arrow, arrow_gks, .*, uniform, mean_delta, ties and lorahub can be limited"),
    ],
)
def test_router_groups_are_checked(spec, message):
    with pytest.raises(LorlibError, match=message):
        make_router(spec, [f"e{i}" for i in range(6)], groups={"g": ["e1", "e2"], "empty": []})
    with pytest.raises(LorlibError, match="top-k must be between 1 and the number of experts \\(2\\)"):
        make_router("arrow@g", [f"e{i}" for i in range(6)], top_k=3, groups={"g": ["e1", "e2"]})


# ---- the registry ------------------------------------------------------------------------------


def test_menus_help_and_evaluations_read_the_registry(monkeypatch):
    """A router added to the registry (one class, one entry) appears in the menus, the help text,
    make_router and the evaluation's comparisons, with nothing else to edit."""
    from dataclasses import dataclass
    from typing import ClassVar

    from lorlib_ui.core.routers import MergeRouter, help_text, menu, presets, registry

    @dataclass(frozen=True)
    class HalfRouter(MergeRouter):
        name: ClassVar[str] = "half"
        summary: ClassVar[str] = "every expert at weight 1/2"
        groupable: ClassVar[bool] = True
        presets: ClassVar[dict[str, str]] = {"half-private": "half@private"}

        def weights(self, slot):
            return slot.usable(self.subset)[0].float() / 2

    experts, groups = ["a", "b", "c"], {"private": ["a", "b"], "cluster": ["c"]}
    assert "half" not in help_text() and "half" not in menu(experts, groups)[0]
    monkeypatch.setitem(registry.ROUTERS, "half", HalfRouter)
    assert "half" in help_text() and {"half", "half@private"} <= set(menu(experts, groups)[0])
    assert presets()["half-private"] == "half@private"
    router = make_router("half@private", experts, groups=groups)
    assert isinstance(router, HalfRouter) and router.subset == (0, 1) and router.describe() == "half@private"


def test_the_menu_offers_each_router_each_group_and_each_expert():
    from lorlib_ui.core.routers import menu

    specs, missing = menu(["a", "b", "c"], {"private": ["a", "b"], "cluster": ["c"], "shared": []})
    assert specs[:2] == ["arrow", "arrow@private"]  # dynamic routers first
    assert {"base", "uniform", "uniform@private", "mean_delta", "spectral", "phatgoose", "avg_act"} <= set(specs)
    assert specs[-3:] == ["expert:a", "expert:b", "expert:c"]
    assert "arrow@cluster" not in specs and "oracle" not in specs  # one-expert groups; per-task routers
    assert "arrow_gks" in missing and "general" in missing["arrow_gks"]  # what it lacks, in one line


def test_the_menu_lists_routers_whose_keys_are_missing_with_the_command():
    from lorlib_ui.core.routers import explain, menu

    groups = {"private": ["a", "b"], "cluster": ["c", "d"]}
    specs, missing = menu(["a", "b", "c", "d"], groups, {"gates": ["c", "d"], "activations": ["a"]})
    assert "phatgoose@private" in specs and {"phatgoose", "phatgoose@cluster"} <= set(missing)
    assert missing["phatgoose"] == "needs gates for 2 of its 4 experts: run `lorlib gates LIBRARY`"
    assert "avg_act@cluster" in specs and "avg_act@private" in missing and "avg_act" in missing
    assert not set(specs) & set(missing)
    line = explain("phatgoose@private")
    assert line.startswith("PhatGoose") and line.endswith("only the private experts")
    assert explain("expert:a") == "one expert alone (a)" and explain("nonsense") == ""


def test_routers_are_immutable():
    import dataclasses

    router = make_router("arrow", [f"e{i}" for i in range(6)], top_k=2)
    limited = router.limit("g", (1, 2))
    assert limited is not router and router.subset is None and router.group is None
    assert limited.subset == (1, 2) and limited.top_k == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        router.top_k = 3


def test_the_oracle_runs_only_where_it_is_resolved_per_task():
    experts, groups = ["e1", "c1"], {"private": ["e1"], "cluster": ["c1"]}
    with pytest.raises(LorlibError, match="picks its expert per evaluated task"):
        make_router("oracle", experts, groups=groups)
    assert isinstance(make_router("oracle", experts, groups=groups, per_task=True), TaskRouter)
    with pytest.raises(LorlibError, match="no cluster experts"):
        make_router("oracle", experts, groups={"private": ["e1"], "cluster": []}, per_task=True)


def test_an_expert_rewritten_while_the_model_is_built_is_a_one_line_error(tiny_library, monkeypatch):
    """The layers are sized from the headers first; weights rewritten on disk after that with
    another rank no longer fit them and are refused."""
    from lorlib_ui.core import routed_model

    def rewritten_after(folder):
        layout = read_layout(folder)
        if folder.name == "task3":  # grow one module's rank to twice
            adapter = read_adapter(folder)
            module = next(iter(adapter.factors))
            a, b = (t.clone() for t in adapter.factors[module])
            adapter.factors[module] = (torch.cat([a, a]), torch.cat([b, b], dim=1))
            adapter.config["rank_pattern"] = {module: 2 * a.shape[0]}
            write_adapter(folder, adapter)
        return layout

    monkeypatch.setattr(routed_model, "read_layout", rewritten_after)
    with pytest.raises(LorlibError, match="expert task3 changed on disk while the model was being built; try again"):
        RoutedModel.load(tiny_library, device="cpu")


def test_experts_are_placed_in_runs_exactly(tmp_path, tiny_base, monkeypatch):
    """Building copies runs of experts stored alike a module at a time (cut at FILL_RUN, and
    where the layout changes): every expert's factors and scale land in its own slice, zero
    padded, whatever the runs."""
    from lorlib_ui.core import routed_model

    monkeypatch.setattr(routed_model, "FILL_RUN", 2)
    kinds = [
        (4, None, None),
        (4, None, None),
        (4, None, None),
        (2, ["q_proj", "v_proj"], 7.0),
        (4, None, 3.0),
        (4, None, 3.0),
    ]
    dirs = [
        make_adapter(tmp_path / f"e{i}", tiny_base, seed=20 + i, rank=rank, targets=targets, alpha=alpha)
        for i, (rank, targets, alpha) in enumerate(kinds)
    ]
    library = build_library(tmp_path / "lib", tiny_base, dirs)
    rm = RoutedModel.load(library, device="cpu")
    for e, name in enumerate(rm.experts):
        adapter = library.load_adapter(name)
        for module, layer in rm.layers.items():
            a_rows = layer.lora_a.view(layer.n_experts, layer.rank, -1)[e]
            bt_rows = layer.lora_bt.view(layer.n_experts, layer.rank, -1)[e]
            if module not in adapter.factors:
                assert not a_rows.any() and not bt_rows.any() and layer.scales[e] == 0
                continue
            a, b = adapter.factors[module]
            r = a.shape[0]
            assert torch.equal(a_rows[:r], a) and torch.equal(bt_rows[:r], b.T)
            assert not a_rows[r:].any() and not bt_rows[r:].any()
            assert layer.scales[e] == pytest.approx(adapter.scales[module])
