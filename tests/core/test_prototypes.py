import pytest
import torch

from lorlib_ui.core.prototypes import prototypes_for_adapter, top_right_singular_vectors


def _svd_top(a, b):
    return torch.linalg.svd(b.double() @ a.double())[2][..., 0, :]


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 8, 16])
def test_prototypes_match_full_svd(rank):
    gen = torch.Generator().manual_seed(rank)
    a = torch.randn(16, rank, 96, generator=gen)
    b = torch.randn(16, 80, rank, generator=gen)
    cos = (top_right_singular_vectors(a, b).double() * _svd_top(a, b)).sum(-1).abs()
    assert cos.min() >= 0.9999


def test_prototypes_are_unit_vectors():
    a, b = torch.randn(5, 4, 32), torch.randn(5, 24, 4)
    assert torch.allclose(top_right_singular_vectors(a, b).norm(dim=-1), torch.ones(5), atol=1e-5)


def test_mixed_ranks_in_one_adapter():
    gen = torch.Generator().manual_seed(0)
    factors = {f"m{r}": (torch.randn(r, 64, generator=gen), torch.randn(48, r, generator=gen)) for r in (1, 2, 5, 16)}
    protos = prototypes_for_adapter(factors)
    for name, (a, b) in factors.items():
        cos = (protos[name].double() @ _svd_top(a, b)).abs()
        assert cos >= 0.9999, name


def test_close_singular_values_still_exact():
    # Top two singular values 1.0 and 0.999: power iteration converges slowly here; QR+SVD does not care.
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(64, 4, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(96, 4, generator=gen, dtype=torch.float64))
    s = torch.diag(torch.tensor([1.0, 0.999, 0.5, 0.1], dtype=torch.float64))
    b, a = u @ s, v.T  # ΔW = U S Vᵀ
    proto = top_right_singular_vectors(a[None].float(), b[None].float())[0]
    assert (proto.double() @ v[:, 0]).abs() >= 0.9999
