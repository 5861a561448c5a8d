"""An expert's spectrum: per LoRA'd layer, the Frobenius norm and the singular values of its ΔW.

For a linear layer adapted by an expert, ΔW = s·B·A with A (r x d_in), B (d_out x r) and scale s
(`lorlib_ui.core.adapters`). Arrow (Ostapenko et al., 2024, Sec. 4.2) routes by the top right
singular vector of ΔW (`lorlib_ui.core.prototypes`); the singular values say how strongly the
expert changes that layer and along how many directions, and ‖ΔW‖_F where in the model it acts.

As for the prototypes, ΔW is never formed. With thin QR factorisations B = Q_B R_B and
Aᵀ = Q_A R_A,

    ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ,

and Q_B, Q_A have orthonormal columns, so ΔW's nonzero singular values are those of the small
core s·R_B R_Aᵀ (r x r, or smaller when a side is shorter than r), and
‖ΔW‖_F = sqrt(Σ σ_i²). That costs O((d_out + d_in) r²) per layer, where forming ΔW alone costs
O(d_out d_in r) and its SVD far more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorlib_ui.core.adapters import LoraAdapter
from lorlib_ui.core.errors import LorlibError


@dataclass
class Spectrum:
    """One expert's ΔW, layer by layer, in the order of `modules`."""

    modules: list[str]
    norms: np.ndarray  # (modules,): ‖ΔW‖_F
    singular_values: list[np.ndarray]  # per module, descending; min(r, d_out, d_in) of them


@torch.no_grad()
def delta_singular_values(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Singular values of s·B·A for a batch of layers, descending, in float64.

    a: (L, r, d_in), b: (L, d_out, r), scale: (L,) -> (L, min(r, d_out, d_in)).
    """
    _, r_a = torch.linalg.qr(a.double().transpose(1, 2))  # Aᵀ = Q_A R_A: only R_A is needed
    _, r_b = torch.linalg.qr(b.double())  # B = Q_B R_B
    core = r_b @ r_a.transpose(1, 2)
    # s > 0 in every LoRA config; abs keeps the values singular values should a config say otherwise
    return torch.linalg.svdvals(core) * scale.double().abs().unsqueeze(-1)


def expert_spectrum(adapter: LoraAdapter, modules: list[str] | None = None) -> Spectrum:
    """‖ΔW‖_F and the singular values of ΔW at each of the adapter's modules, in the order of
    `modules` (by default the adapter's own); layers of one shape go through one batched call."""
    modules = list(adapter.factors) if modules is None else list(modules)
    if unknown := [m for m in modules if m not in adapter.factors]:
        raise LorlibError(f"the expert does not adapt {unknown[0]}")
    groups: dict[tuple, list[str]] = {}
    for module in modules:
        a, b = adapter.factors[module]
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(module)
    values: dict[str, np.ndarray] = {}
    for group in groups.values():
        a = torch.stack([adapter.factors[m][0] for m in group])
        b = torch.stack([adapter.factors[m][1] for m in group])
        scale = torch.tensor([adapter.scales[m] for m in group])
        values.update(zip(group, delta_singular_values(a, b, scale).numpy()))
    singular_values = [values[m] for m in modules]
    norms = np.array([np.sqrt(np.sum(s**2)) for s in singular_values], dtype=np.float64)
    return Spectrum(modules, norms, singular_values)
