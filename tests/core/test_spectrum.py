import numpy as np
import pytest
import torch

from lorlib_ui.core.adapters import LoraAdapter, read_adapter
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.spectrum import delta_singular_values, expert_spectrum


def _dense(adapter: LoraAdapter, module: str) -> np.ndarray:
    a, b = adapter.factors[module]
    return adapter.scales[module] * b.double().numpy() @ a.double().numpy()


def _random_adapter(shapes: dict[str, tuple[int, int, int]], seed: int = 0) -> LoraAdapter:
    """module -> (r, d_out, d_in); scales differ per module, as alpha_pattern allows."""
    rng = np.random.default_rng(seed)
    factors, scales = {}, {}
    for i, (module, (r, d_out, d_in)) in enumerate(shapes.items()):
        factors[module] = (torch.tensor(rng.normal(size=(r, d_in))), torch.tensor(rng.normal(size=(d_out, r))))
        scales[module] = 0.5 + i
    return LoraAdapter(config={}, factors=factors, scales=scales)


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_singular_values_and_norms_match_a_full_svd_of_the_dense_update(rank):
    shapes = {"layers.0.q": (rank, 40, 56), "layers.0.v": (rank, 24, 56), "layers.1.q": (rank, 40, 56)}
    adapter = _random_adapter(shapes, seed=rank)
    spectrum = expert_spectrum(adapter)
    for module, norm, values in zip(spectrum.modules, spectrum.norms, spectrum.singular_values):
        dense = _dense(adapter, module)
        expected = np.linalg.svd(dense, compute_uv=False)
        assert values.shape == (rank,)
        np.testing.assert_allclose(values, expected[:rank], rtol=1e-5, atol=1e-5)
        assert np.all(expected[rank:] < 1e-8)  # a rank-r update: nothing beyond r
        np.testing.assert_allclose(norm, np.linalg.norm(dense, "fro"), rtol=1e-5)


def test_a_peft_adapter_in_the_libraries_format(tiny_adapters):
    """A PEFT-saved adapter (float32 factors, s = alpha / r = 2), against numpy's SVD."""
    adapter = read_adapter(tiny_adapters[2])
    spectrum = expert_spectrum(adapter)
    assert len(spectrum.modules) == 8
    for module, norm, values in zip(spectrum.modules, spectrum.norms, spectrum.singular_values):
        dense = _dense(adapter, module)
        np.testing.assert_allclose(values, np.linalg.svd(dense, compute_uv=False)[:4], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(norm, np.linalg.norm(dense), rtol=1e-5)
        assert np.all(np.diff(values) <= 0)  # descending


def test_rank_above_a_side_gives_that_sides_count():
    adapter = _random_adapter({"narrow": (8, 5, 30)})
    (values,) = expert_spectrum(adapter).singular_values
    np.testing.assert_allclose(values, np.linalg.svd(_dense(adapter, "narrow"), compute_uv=False), rtol=1e-6)
    assert values.shape == (5,)


def test_modules_come_in_the_order_asked_for_and_unknown_ones_are_refused():
    adapter = _random_adapter({"a": (2, 8, 8), "b": (3, 8, 8), "c": (2, 6, 8)})
    spectrum = expert_spectrum(adapter, ["c", "a", "b"])
    assert spectrum.modules == ["c", "a", "b"]
    assert [len(s) for s in spectrum.singular_values] == [2, 2, 3]
    np.testing.assert_allclose(spectrum.norms[0], np.linalg.norm(_dense(adapter, "c")), rtol=1e-6)
    with pytest.raises(LorlibError, match="does not adapt d"):
        expert_spectrum(adapter, ["a", "d"])


def test_scale_multiplies_every_singular_value():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 16, 4, generator=gen)
    once = delta_singular_values(a, b, torch.tensor([1.0, 1.0]))
    scaled = delta_singular_values(a, b, torch.tensor([3.0, 0.25]))
    torch.testing.assert_close(scaled, once * torch.tensor([[3.0], [0.25]], dtype=torch.float64))
