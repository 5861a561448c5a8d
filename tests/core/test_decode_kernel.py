"""Decoding a token on a CPU, the compiled kernel does what follows the scores: it equals the tensor path."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mixed_library, with_every_key

from lorlib_ui.core import decode_kernel
from lorlib_ui.core.decode_kernel import DecodePlan, decodes
from lorlib_ui.core.generation import generate
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router

pytestmark = pytest.mark.skipif(
    decode_kernel._kernel() is None, reason="LORLIB_DECODE_KERNEL=0: decoding routes with tensor operations only"
)


def _reference(h, logits, usable, k, temperature, mix, a, scales, bts, r):
    """The routing and each layer's result in float64, from the definitions (TopKRouter.route,
    LibraryLinear.coefficients): an independent check of the kernel."""
    g, e = logits.shape
    masked = logits if usable is None else logits.masked_fill(~usable, float("-inf"))
    top, index = masked.topk(k, dim=-1)
    w = (top / temperature).softmax(dim=-1).double()
    outs = []
    for i in range(g):
        rows = a.double().view(g, e, r, -1)[i, index[i]]  # (k, r, d)
        z = rows @ h[0].double()  # (k, r)
        ws = (w[i] * scales.double().view(g, e)[i, index[i]]).unsqueeze(-1)
        c = ws * z if mix == "outputs" else ws * (z * w[i].unsqueeze(-1)).sum(0, keepdim=True)
        bt = bts[i].double().view(e, r, -1)[index[i]]  # (k, r, d_out)
        outs.append(torch.einsum("kr,kro->o", c, bt))
    return index, w, outs


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", ["outputs", "parameters"])
@pytest.mark.parametrize("k, masked, temperature", [(1, False, 1.0), (3, True, 0.5), (12, False, 2.0), (9, True, 1.0)])
def test_a_plan_routes_as_the_definitions_say(storage, mix, k, masked, temperature):
    """Three layers (outputs of 24, 8 and 16) over 12 experts of rank 3, some not usable."""
    gen = torch.Generator().manual_seed(k)
    g, e, r, d, d_out = 3, 12, 3, 20, (24, 8, 16)
    a = torch.randn(g * e * r, d, generator=gen).to(storage)
    scales = torch.rand(g * e, generator=gen) + 0.5
    bts = [torch.randn(e * r, n, generator=gen).to(storage) for n in d_out]
    h = torch.randn(1, d, generator=gen)
    logits = torch.randn(g, e, generator=gen)
    usable = torch.ones(g, e, dtype=torch.bool)
    if masked:
        usable[:, ::4] = False  # 9 usable in each layer
    plan = DecodePlan.build(a, scales, bts, e)
    assert plan is not None
    assert plan(h, logits, usable if masked else None, k, temperature, mix)
    index, w, outs = _reference(h, logits, usable if masked else None, k, temperature, mix, a, scales, bts, r)
    assert torch.equal(plan.index[:, :k], index)
    torch.testing.assert_close(plan.top[:, :k].double(), w, rtol=1e-6, atol=1e-7)
    for out, expected in zip(plan.outputs, outs):
        assert out.shape == (1, expected.shape[0])
        torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_nan_counts_as_largest_ties_keep_the_lower_index_and_too_few_usable_is_refused():
    e = 6
    plan = DecodePlan.build(torch.ones(e, 4), torch.ones(e), [torch.ones(e, 2)], e)
    h = torch.ones(1, 4)
    logits = torch.tensor([[0.5, 2.0, float("nan"), 2.0, -1.0, 0.0]])
    assert plan(h, logits, None, 3, 1.0, "outputs")
    assert plan.index[0, :3].tolist() == [2, 1, 3]  # as torch.topk: NaN first
    usable = torch.tensor([[True, False, False, False, True, False]])
    assert not plan(h, logits, usable, 3, 1.0, "outputs")  # 2 usable, 3 asked: the caller's path runs
    assert plan(h, logits, usable, 2, 1.0, "outputs") and plan.index[0, :2].tolist() == [0, 4]
    assert not plan(h, logits, None, 0, 1.0, "outputs")  # no expert asked for: nothing to trust
    assert not plan(h, logits, None, e + 1, 1.0, "outputs")


def test_what_the_kernel_cannot_read_gets_no_plan():
    e = 4
    a, scales, bt = torch.ones(e, 8), torch.ones(e), torch.ones(e, 8)
    assert DecodePlan.build(a.half(), scales, [bt], e) is None
    assert DecodePlan.build(a, scales.double(), [bt], e) is None
    assert DecodePlan.build(a, scales, [bt, bt.bfloat16()], e) is None
    assert DecodePlan.build(a.T, scales, [bt], e) is None  # not laid out as it reads
    assert DecodePlan.build(a, scales, [bt], e) is not None


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def routed(request, tmp_path_factory, tiny_base):
    # 40 experts: some of rank 2 (padding), every 5th on q, k and v only (absent from o)
    partial = ("q_proj", "k_proj", "v_proj")
    library = mixed_library(tmp_path_factory.mktemp("decode") / "lib", tiny_base, 40, partial, request.param)
    library = with_every_key(library, general="e039")
    rm = RoutedModel.load(library, device="cpu")
    assert next(iter(rm.layers.values())).lora_a.dtype == request.param
    return rm


def _generate(rm, router, kernel: bool, monkeypatch):
    calls = []
    run = DecodePlan.__call__
    with monkeypatch.context() as patch:
        patch.setattr(DecodePlan, "__call__", lambda self, *a: calls.append(1) or run(self, *a))
        if not kernel:
            patch.setattr(decode_kernel, "_kernel", lambda: None)
        result = generate(rm, "the quick brown", router, 6)
    return result, len(calls)


@pytest.mark.parametrize(
    "spec, options",
    [
        ("arrow", {"top_k": 4}),
        ("arrow", {"top_k": 1, "temperature": 0.5}),
        ("arrow", {"top_k": 3, "mix": "parameters"}),
        ("arrow@g", {"top_k": 2}),  # 16 of the 40: the others masked
        ("arrow@g", {"top_k": 16, "mix": "parameters"}),  # all of the group's, at every layer
        ("phatgoose", {"top_k": 2}),
        ("avg_act", {"top_k": 2, "temperature": 2.0}),
    ],
)
def test_decoding_with_the_kernel_equals_tensor_operations(routed, monkeypatch, spec, options):
    """The same tokens, routing weights and logits; the kernel ran for every layer of every
    decoded token (q, k and v as one group, o alone), and not at all when unavailable."""
    groups = {"g": routed.experts[8:24]}
    router = make_router(spec, routed.experts, groups=groups, **options)
    fused, calls = _generate(routed, router, True, monkeypatch)
    plain, none = _generate(routed, router, False, monkeypatch)
    decoded = len(fused.new_ids)  # one forward per new token (the last for the record), after the prompt's
    lone = len(routed.layers) - sum(len(group.members) for group in routed.groups)  # o_proj
    assert calls == decoded * (len(routed.groups) + lone) and none == 0
    assert fused.new_ids == plain.new_ids
    np.testing.assert_allclose(fused.record.weights, plain.record.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.record.logits, plain.record.logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), routed.routing(router):  # and the model's outputs, one token after the prompt
        ids = routed.tokenizer("the quick brown", return_tensors="pt").input_ids
        out = routed.model(input_ids=ids, use_cache=True)
        step = routed.model(input_ids=ids[:, -1:], past_key_values=out.past_key_values).logits
        monkeypatch.setattr(decode_kernel, "_kernel", lambda: None)
        out = routed.model(input_ids=ids, use_cache=True)
        alone = routed.model(input_ids=ids[:, -1:], past_key_values=out.past_key_values).logits
    torch.testing.assert_close(step, alone, rtol=1e-5, atol=1e-5)


def test_with_gradients_or_another_dtype_decoding_takes_the_tensor_path(routed):
    router = make_router("arrow", routed.experts, top_k=2)
    h = torch.zeros(1, 8)
    with torch.no_grad():
        assert decodes(router, h)
        assert not decodes(router, h.double())
        assert not decodes(make_router("spectral", routed.experts, top_k=2), h)  # scores A h, not keys
        assert not decodes(make_router("uniform", routed.experts), h)
    with torch.enable_grad():
        assert not decodes(router, h)


def test_switched_off_decoding_takes_the_tensor_path(monkeypatch, routed):
    monkeypatch.setenv(decode_kernel.SWITCH, "0")
    decode_kernel._kernel.cache_clear()
    try:
        layer = next(iter(routed.layers.values()))
        assert DecodePlan.build(layer.lora_a, layer.scales, [layer.lora_bt], layer.n_experts) is None
        router = make_router("arrow", routed.experts, top_k=2)
        assert not decodes(router, torch.zeros(1, layer.lora_a.shape[1]))
    finally:
        monkeypatch.delenv(decode_kernel.SWITCH)
        decode_kernel._kernel.cache_clear()
    assert decode_kernel._kernel() is decode_kernel.route_decode


def test_the_compiled_code_is_cached_where_numba_keeps_it(tmp_path, monkeypatch, routed):
    """Nothing compiled is written to or loaded from lorlib's own cache folder (which a shared
    LORLIB_CACHE could let another user write): numba keeps it beside the module (or in the
    user's own cache where the package cannot be written)."""
    monkeypatch.setenv("LORLIB_CACHE", str(tmp_path))
    generate(routed, "the quick brown", make_router("arrow", routed.experts, top_k=2), 2)
    assert not list(tmp_path.rglob("*"))
    folder = Path(decode_kernel.route_decode._cache._cache_path)
    package = Path(decode_kernel.__file__).parent
    assert folder == package / "__pycache__" or Path.home() in folder.parents, folder
