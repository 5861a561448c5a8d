"""Spectral, PhatGoose and hidden-state routing against a direct implementation on a tiny Llama.

The reference is the plain base model with a forward hook on every adapted linear layer that adds
Σ_e w_e(h) ΔW_e h, the weights computed from the closed form of each router's score, with every
ΔW_e = s_e B_e A_e formed densely: nothing of the routed model's stacking, Gram matrices, key
preparation or gathering is shared with it.
"""

import math

import pytest
import torch
from conftest import library_snapshot
from conftest import relative_error as _rel
from conftest import routed_logits as _routed_logits
from conftest import routing_ids as _ids
from transformers import AutoModelForCausalLM

from lorlib_ui.core.adapters import read_adapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router


def _reference_logits(base_path, adapters, ids, score, top_k, temperature):
    """score(module, h, deltas) -> (tokens, experts); outputs mixed over the top-k."""
    model = AutoModelForCausalLM.from_pretrained(base_path)
    modules = sorted(adapters[0].factors)
    deltas = {m: [a.scales[m] * a.factors[m][1] @ a.factors[m][0] for a in adapters] for m in modules}

    def hook(module_name):
        def add(module, inputs, output):
            h = inputs[0].reshape(-1, inputs[0].shape[-1])
            scores = score(module_name, h, deltas[module_name])
            top, index = scores.topk(top_k, dim=-1)
            weights = torch.zeros_like(scores).scatter(-1, index, (top / temperature).softmax(-1))
            change = sum(weights[:, e : e + 1] * (h @ d.T) for e, d in enumerate(deltas[module_name]))
            return output + change.view(output.shape)

        return add

    for m in modules:
        model.get_submodule(m).register_forward_hook(hook(m))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _random_keys(library, kind, seed):
    """Random keys for every expert, stored as `compute_keys` would store them."""
    gen = torch.Generator().manual_seed(seed)
    keys = {}
    for e in library.experts:
        adapter = library.load_adapter(e.name)
        keys[e.name] = {m: torch.randn(a.shape[1], generator=gen) for m, (a, _) in adapter.factors.items()}
        library.derived.write_expert(kind, e.name, keys[e.name], {"test": True}, e.weights_hash)
    return keys


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (4, 2.0)])
def test_spectral_equals_the_norm_of_each_experts_output(tiny_base, tiny_adapters, tiny_routed, top_k, temperature):
    adapters = [read_adapter(p) for p in tiny_adapters]

    def score(module, h, deltas):
        return torch.stack([(h @ d.T).norm(dim=-1) for d in deltas], dim=-1)

    expected = _reference_logits(tiny_base, adapters, _ids(tiny_routed), score, top_k, temperature)
    router = make_router("spectral", tiny_routed.experts, top_k=top_k, temperature=temperature)
    assert _rel(_routed_logits(tiny_routed, router), expected) < 1e-4
    assert _rel(_routed_logits(tiny_routed, make_router("arrow", tiny_routed.experts, top_k=top_k)), expected) > 1e-3


def _standardise(x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:])  # no affine parameters: the paper's norm_d


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_phatgoose_equals_layer_normed_gate_similarity(tiny_base, tiny_adapters, tiny_library, top_k):
    gates = _random_keys(tiny_library, "gates", seed=1)
    rm = RoutedModel.load(Library.open(tiny_library.path), device="cpu")
    adapters = [read_adapter(p) for p in tiny_adapters]

    def score(module, h, deltas):
        g = torch.stack([gates[name][module] for name in rm.experts])
        return _standardise(h) @ _standardise(g).T / math.sqrt(h.shape[-1])

    expected = _reference_logits(tiny_base, adapters, _ids(rm), score, top_k, 1.0)
    assert _rel(_routed_logits(rm, make_router("phatgoose", rm.experts, top_k=top_k)), expected) < 1e-4


def test_phatgoose_takes_two_experts_by_default(tiny_routed):
    assert make_router("phatgoose", tiny_routed.experts).top_k == 2
    assert make_router("avg_act", tiny_routed.experts).top_k == 4


def test_avg_act_equals_signed_dot_products_with_mean_states(tiny_base, tiny_adapters, tiny_library):
    keys = _random_keys(tiny_library, "activations", seed=2)
    rm = RoutedModel.load(Library.open(tiny_library.path), device="cpu")
    adapters = [read_adapter(p) for p in tiny_adapters]

    def score(module, h, deltas):
        v = torch.stack([keys[name][module] for name in rm.experts])
        return h @ v.T / math.sqrt(h.shape[-1])  # signed: no absolute value

    expected = _reference_logits(tiny_base, adapters, _ids(rm), score, 3, 0.7)
    assert _rel(_routed_logits(rm, make_router("avg_act", rm.experts, top_k=3, temperature=0.7)), expected) < 1e-4


@pytest.mark.parametrize("spec,kind", [("phatgoose", "gates"), ("avg_act", "activations")])
def test_a_router_whose_keys_are_missing_names_the_experts_and_changes_nothing(tiny_library, spec, kind):
    first = tiny_library.experts[0]
    one = {"model.layers.0.self_attn.q_proj": torch.ones(64)}
    tiny_library.derived.write_expert(kind, first.name, one, {}, first.weights_hash)
    before = library_snapshot(tiny_library.path)
    rm = RoutedModel.load(Library.open(tiny_library.path), device="cpu")
    with pytest.raises(LorlibError) as caught:
        _routed_logits(rm, make_router(spec, rm.experts))
    message = str(caught.value)
    assert "\n" not in message and kind in message and f"lorlib {kind}" in message
    assert rm.experts[1] in message and rm.experts[0] not in message.split("and")[0].split("needs")[1]
    assert library_snapshot(tiny_library.path) == before
    # once they are there, the same routed model picks them up
    _random_keys(Library.open(tiny_library.path), kind, seed=3)
    _routed_logits(rm, make_router(spec, rm.experts))


def test_keys_of_changed_weights_are_not_used(tiny_library, tiny_adapters):
    _random_keys(tiny_library, "gates", seed=4)
    assert tiny_library.derived.lacking("gates") == []
    name = tiny_library.experts[0].name
    from lorlib_ui.core.library import import_adapters

    import_adapters(tiny_library.path, [tiny_adapters[1]], names=[name], force=True)  # new weights, same name
    assert Library.open(tiny_library.path).derived.lacking("gates") == [name]


def test_stored_keys_refuse_a_stale_weights_hash(tiny_library):
    first = tiny_library.experts[0]
    before = library_snapshot(tiny_library.path)
    with pytest.raises(LorlibError, match="changed while"):
        tiny_library.derived.write_expert("gates", first.name, {"x": torch.ones(3)}, {}, "0" * 16)
    assert library_snapshot(tiny_library.path) == before
