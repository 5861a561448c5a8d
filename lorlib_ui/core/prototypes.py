"""Arrow prototypes: the top right singular vector of each expert's ΔW = B·A, computed exactly.

Arrow (Ostapenko et al., 2024, Sec. 4.2) routes a token with hidden state h at a LoRA'd layer by
|h·v_e|, where v_e is the direction in input space that expert e's update ΔW_e stretches most:
its top right singular vector.

We never form ΔW (d_out x d_in). With thin QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A,

    ΔW = B A = Q_B (R_B R_Aᵀ) Q_Aᵀ,

and Q_B, Q_A have orthonormal columns, so the SVD of the small r x r core C = R_B R_Aᵀ = U S Vᵀ
gives the SVD of ΔW: ΔW = (Q_B U) S (Q_A V)ᵀ. The top right singular vector is Q_A V[:, 0].
This is exact (up to floating point), unlike the 15-step power iteration in PEFT's Arrow, which
converges slowly when the top two singular values are close. The vector's sign is arbitrary and
Arrow only uses |h·v|. The LoRA scale s does not change the direction, so it is left out.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def top_right_singular_vectors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of B·A for a batch of experts.

    a: (E, r, d_in), b: (E, d_out, r) -> (E, d_in), unit norm, float32.
    Experts of different ranks can share a batch if zero-padded to the same r: zero rows of A and
    zero columns of B add zero singular values and leave the top vector unchanged.
    """
    a64, b64 = a.double(), b.double()
    q_a, r_a = torch.linalg.qr(a64.transpose(1, 2))  # Aᵀ = Q_A R_A: (E, d_in, r), (E, r, r)
    _, r_b = torch.linalg.qr(b64)  # B = Q_B R_B: only R_B is needed
    core = r_b @ r_a.transpose(1, 2)  # (E, r, r)
    _, _, vh = torch.linalg.svd(core)
    top = q_a @ vh[:, 0, :].unsqueeze(-1)  # (E, d_in, 1)
    return top.squeeze(-1).float()


def prototypes_for_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One prototype (d_in,) per adapted module of one expert.

    Modules whose factors share shapes (all q_proj of a model, say) go through one batched call:
    many tiny QR/SVD calls would cost more in dispatch than in arithmetic.
    """
    groups: dict[tuple, list[str]] = {}
    for module, (a, b) in factors.items():
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(module)
    out = {}
    for modules in groups.values():
        a = torch.stack([factors[m][0] for m in modules])
        b = torch.stack([factors[m][1] for m in modules])
        out.update(zip(modules, top_right_singular_vectors(a, b)))
    return out
