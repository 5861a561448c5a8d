"""Screening decodes with float16 copies of the prototypes, yet chooses exactly Arrow's top k."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from lorlib_ui.core import screening
from lorlib_ui.core.routers import make_router
from lorlib_ui.core.screening import beta, screen_keys, screened_scores


def _near_ties(seed: int, rows: int, experts: int, d: int, gap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A token h and keys (rows·experts, d) of unit norm whose |h·v| crowd around the top: each
    row holds a run of experts whose scores differ by `gap` (far below float16's resolution)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(1, d, generator=gen) * 30
    keys = F.normalize(torch.randn(rows * experts, d, generator=gen), dim=1)
    unit = F.normalize(h, dim=1)[0]
    for r in range(rows):
        for j in range(12):  # experts scoring 0.5, 0.5 - gap, ...: the k-th place is decided in the run
            other = F.normalize(torch.randn(d, generator=gen) - unit * (unit @ torch.randn(d, generator=gen)), dim=0)
            other = F.normalize(other - unit * (unit @ other), dim=0)
            cos = 0.5 - j * gap
            sign = 1 if j % 2 else -1  # Arrow ranks by |h·v|: the sign must not matter
            keys[r * experts + 3 * j] = sign * (cos * unit + (1 - cos**2) ** 0.5 * other)
    return h, keys


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 3),
    k=st.integers(1, 8),
    gap=st.sampled_from([1e-3, 1e-4, 1e-5]),  # all far below float16 resolution, above float32 rounding
    masked=st.booleans(),
)
def test_screening_chooses_the_exact_top_k(seed, rows, k, gap, masked):
    experts, d = 64, 96
    h, keys = _near_ties(seed, rows, experts, d, gap)
    usable = torch.ones(rows, experts, dtype=torch.bool)
    if masked:  # some experts do not adapt the layer: their keys are 0 and they are never chosen
        usable[:, 1::5] = False
        keys.view(rows, experts, d)[~usable] = 0
    exact = F.linear(h, keys).view(rows, experts).abs().masked_fill(~usable, -1)
    screened = screened_scores(h, keys, screen_keys(keys), rows, k, usable).masked_fill(~usable, -1)
    want, got = exact.topk(k, dim=1), screened.topk(k, dim=1)
    assert torch.equal(want.indices.sort(1).values, got.indices.sort(1).values)
    torch.testing.assert_close(got.values, want.values)  # the chosen ones are scored exactly


def test_the_bound_holds_for_the_float16_approximation():
    """The float16 pass is within β·‖h‖·m of |h·v| (what makes the candidates contain the top k)."""
    gen = torch.Generator().manual_seed(0)
    d = 576
    for scale in (1e-3, 1.0, 1e4):
        h = torch.randn(1, d, generator=gen) * scale
        keys = torch.randn(512, d, generator=gen) * torch.rand(512, 1, generator=gen)
        half, m = screen_keys(keys)
        approx = F.linear((h / h.norm()).half(), half).float() * h.norm() * m
        error = (approx.double() - h.double() @ keys.double().T).abs().max()
        assert error <= beta(d) * h.norm() * m


def test_screening_needs_float32_sums(monkeypatch):
    assert screening._sums_in_float32()  # this torch sums float16 products in float32
    monkeypatch.setattr(screening, "_sums_in_float32", lambda: False)
    assert screen_keys(torch.ones(4, 8)) is None  # then every score is computed in float32


@pytest.mark.parametrize("mix", ["outputs", "parameters"])
def test_decoding_with_screening_equals_decoding_without(tiny_routed, monkeypatch, mix):
    """With screening on at the tiny model's few experts, a decoding step's logits are those of the
    exact path, for the grouped q, k, v and the lone o_proj alike."""
    rm = tiny_routed
    router = make_router("arrow", rm.experts, top_k=2, mix=mix)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    calls = []
    original = screening.screened_scores

    def counted(*args):
        calls.append(args[3])  # rows: 3 for a q, k, v group, 1 for o_proj
        return original(*args)

    def last_logits(screen_from: int):
        monkeypatch.setattr(screening, "SCREEN_FROM", screen_from)
        with torch.no_grad(), rm.routing(router):
            out = rm.model(input_ids=ids[:, :-1], use_cache=True)
            return rm.model(input_ids=ids[:, -1:], past_key_values=out.past_key_values).logits

    monkeypatch.setattr(screening, "screened_scores", counted)
    screened = last_logits(1)
    assert sorted(set(calls)) == [1, 3]
    calls.clear()
    exact = last_logits(10**9)
    assert not calls
    torch.testing.assert_close(screened, exact, rtol=0, atol=1e-5)
