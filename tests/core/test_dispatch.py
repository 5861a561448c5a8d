"""Many tokens, many experts: computing only the chosen (token, expert) pairs equals the dense path."""

import pytest
import torch
from conftest import mixed_library

from lorlib_ui.core import routed_model
from lorlib_ui.core.routed_model import RoutedModel
from lorlib_ui.core.routers import make_router


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_base):
    """A routed model over 256 random experts: most rank 4 on q, k, v, o; every 7th rank 2; every
    5th on q and v only, so padding and experts absent from a layer are both dispatched."""
    library = mixed_library(tmp_path_factory.mktemp("wide") / "lib", tiny_base, 256, ("q_proj", "v_proj"))
    return RoutedModel.load(library, device="cpu")


def _logits(rm: RoutedModel, router, dispatch: bool) -> torch.Tensor:
    ids = torch.randint(0, rm.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    for layer in rm.layers.values():
        layer.gather_chosen = dispatch
    try:
        with torch.no_grad(), rm.routing(router):
            return rm.model(input_ids=ids).logits
    finally:
        for layer in rm.layers.values():
            layer.gather_chosen = True


@pytest.mark.parametrize("mix", ["outputs", "parameters"])
@pytest.mark.parametrize("top_k", [1, 4])
@pytest.mark.parametrize("model, n_experts", [("tiny_routed", 6), ("wide", 8), ("wide", 256)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dispatched_pairs_equal_the_dense_path(request, monkeypatch, model, n_experts, top_k, mix, dtype):
    """A library of 6 experts, the first 8 of 256 (arrow@group: the others are masked) and all 256.
    In float64 the two paths agree to 1e-10; in float32 (what runs) they differ by the order of
    their sums: on this tiny random model the dense path itself is up to 2e-5 from float64 (with
    AVX-512 kernels), so 1e-4 there; a wrong expert, weight or scale moves logits by far more."""
    rm = request.getfixturevalue(model)
    rm.model.to(dtype)
    request.addfinalizer(lambda: rm.model.float())
    monkeypatch.setattr(routed_model, "DISPATCH_RATIO", 1)  # dispatch even where dense is faster
    calls = []
    dispatch = routed_model.LibraryLinear._dispatch
    monkeypatch.setattr(routed_model.LibraryLinear, "_dispatch", lambda self, *a: calls.append(1) or dispatch(self, *a))
    group = {"g": rm.experts[:n_experts]}
    router = make_router("arrow@g", rm.experts, top_k=top_k, mix=mix, groups=group)
    dense = _logits(rm, router, False)
    assert not calls
    dispatched = _logits(rm, router, True)
    assert len(calls) == len(rm.layers)  # every routed layer took the dispatch path
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(dispatched, dense, rtol=tolerance, atol=tolerance)
    with torch.no_grad():
        plain = rm.model(input_ids=torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(dispatched, plain.logits, atol=1e-3)  # the experts did change the output


def test_many_tokens_dispatch_only_where_experts_far_outnumber_the_chosen(wide):
    from lorlib_ui.core.routers.base import Routing

    layer = next(iter(wide.layers.values()))
    for n_tokens, k, expected in [(16, 4, True), (16, 4 * 256 // routed_model.DISPATCH_RATIO + 1, False), (1, 4, True)]:
        index = torch.zeros(n_tokens, k, dtype=torch.long)
        routing = Routing(logits=torch.zeros(n_tokens, 256), index=index, top=torch.ones(n_tokens, k))
        assert layer._dispatches(n_tokens, routing) is expected
    layer.gather_chosen = False  # a GPU: always dense
    try:
        routing = Routing(logits=torch.zeros(16, 256), index=torch.zeros(16, 1, dtype=torch.long))
        assert not layer._dispatches(16, routing)
    finally:
        layer.gather_chosen = True
