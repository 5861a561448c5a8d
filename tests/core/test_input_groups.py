"""q, k and v read one input: decoding a token, their group routes them together, exactly."""

import numpy as np
import pytest
import torch
from conftest import PROMPT_ROUTERS, with_every_key

from lorlib_ui.core.generation import generate
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router


@pytest.fixture
def keyed(tiny_library):
    return RoutedModel.load(with_every_key(tiny_library), device="cpu")


def _fusing(rm: RoutedModel, on: bool) -> None:
    for group in rm.groups:
        group.fusing = on


def test_q_k_v_of_each_layer_form_a_group_whose_buffer_they_share(tiny_routed):
    names = {tuple(m.name.rsplit(".", 1)[1] for m in g.members) for g in tiny_routed.groups}
    assert names == {("q_proj", "k_proj", "v_proj")} and len(tiny_routed.groups) == 2  # o_proj reads another input
    for group in tiny_routed.groups:
        e = group.n_experts
        for g, member in enumerate(group.members):
            assert member.group is group
            assert member.lora_a.data_ptr() == group.lora_a[g * e].data_ptr()  # a view, not a copy
            assert member.prototypes.data_ptr() == group.prototypes[g * e].data_ptr()
            assert member.keys["prototypes"] is member.prototypes and member.stack.lora_a is member.lora_a


def test_key_sets_are_stored_expert_major_so_one_token_scores_in_one_fast_matmul(keyed):
    """Every layer's key sets, and each group's stacks of them, hold one input dimension's
    values of all experts side by side (see routed_model.expert_major), also after a cast."""

    def expert_major(keys):
        return keys.dim() == 2 and keys.stride(0) == 1 and keys.stride(1) >= keys.shape[0]

    for spec in ("arrow", "phatgoose", "avg_act"):  # attaches the gates and the activations
        generate(keyed, "the", make_router(spec, keyed.experts, top_k=2), 2)
    for layer in keyed.layers.values():
        assert set(layer.keys) == {"prototypes", "gates", "activations"}
        assert all(expert_major(keys) for keys in layer.keys.values())
    for group in keyed.groups:
        assert all(group._stacked_keys(kind).T.is_contiguous() for kind in ("prototypes", "gates", "activations"))
    keyed.model.to(torch.float64)
    assert all(expert_major(keys) for layer in keyed.layers.values() for keys in layer.keys.values())


@pytest.mark.parametrize("spec", [r for r in PROMPT_ROUTERS if r not in ("base", "uniform", "mean_delta", "ties")])
@pytest.mark.parametrize("mix", ["outputs", "parameters"])
def test_fused_decoding_equals_each_layer_alone(keyed, spec, mix):
    """Generation with groups and without: the same tokens, routing weights and logits."""
    router = make_router(spec, keyed.experts, top_k=2, mix=mix, groups=keyed.library.groups())
    calls = []
    for group in keyed.groups:
        route = group._route
        group._route = lambda *a, route=route: calls.append(1) or route(*a)
    fused = generate(keyed, "the quick brown", router, 6)
    assert bool(calls) == (spec not in ("spectral", "arrow_gks"))  # they score A h or change the experts
    _fusing(keyed, False)
    alone = generate(keyed, "the quick brown", router, 6)
    assert fused.new_ids == alone.new_ids
    # one matmul over the stacked keys rounds in another order than three: float32 close, not equal
    np.testing.assert_allclose(fused.record.weights, alone.record.weights, atol=1e-5)
    np.testing.assert_allclose(fused.record.logits, alone.record.logits, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_a_group_limited_router_is_fused_and_exact(tiny_routed):
    router = make_router("arrow@g", tiny_routed.experts, top_k=2, groups={"g": tiny_routed.experts[1:5]})
    fused = generate(tiny_routed, "routing tokens", router, 5)
    _fusing(tiny_routed, False)
    alone = generate(tiny_routed, "routing tokens", router, 5)
    assert fused.new_ids == alone.new_ids
    np.testing.assert_allclose(fused.record.weights, alone.record.weights, atol=1e-5)
    assert set(np.flatnonzero(fused.record.weights.sum(axis=(0, 1)))) <= {1, 2, 3, 4}


def test_members_given_different_inputs_stop_fusing_and_stay_exact(tiny_routed):
    group = tiny_routed.groups[0]
    q, k, _ = group.members
    x1, x2 = torch.randn(2, 1, 1, q.base.in_features, generator=torch.Generator().manual_seed(0))
    router = make_router("arrow", tiny_routed.experts, top_k=2)
    with torch.no_grad(), tiny_routed.routing(router):
        q(x1)
        second = k(x2)  # k reads another input than q: its group's results for x1 are not its own
        assert not group.fusing
        _fusing(tiny_routed, False)
        assert torch.equal(second, k(x2))


def test_a_group_hands_top_k_routers_its_rows_as_a_row_slot_and_each_layer_is_a_layer_slot(tiny_routed):
    """Routers read a layer through the `LayerSlot` protocol; a group's rows are declared as the
    part of it a top-k router reads (`RowSlot`), not a silent copy of the layer's interface."""
    from lorlib_ui.core.input_groups import _GroupSlot
    from lorlib_ui.core.routers.base import LayerSlot, RowSlot

    assert RowSlot in _GroupSlot.__mro__ and RowSlot in LayerSlot.__mro__
    assert all(isinstance(layer, LayerSlot) for layer in tiny_routed.layers.values())
    group = tiny_routed.groups[0]
    slot = _GroupSlot(group.members, (1, 2))
    assert isinstance(slot, RowSlot) and not isinstance(slot, LayerSlot)
    mask, n = slot.usable((1, 2))
    assert mask.shape == (len(group.members), group.n_experts) and n == 2
    assert mask.sum(dim=1).tolist() == [2] * len(group.members)
