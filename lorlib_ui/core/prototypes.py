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

A library keeps its experts' prototypes as derived data (`lorlib_ui.core.derived`, kind
"prototypes"): one (rows, d_in) matrix per module, each row keyed by the weights hash of the
expert it belongs to, so that a changed expert's row is computed again and no other.
"""

from __future__ import annotations

import json
from typing import Protocol

import torch

from lorlib_ui.core.derived import Derived, Host

KIND = "prototypes"


class Library(Host, Protocol):
    derived: Derived

    def load_adapter(self, name: str): ...


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


def stored_prototypes(library: Library) -> dict[str, dict[str, torch.Tensor]]:
    """What the store holds: weights hash -> module -> prototype (d_in,)."""
    by_hash: dict[str, dict[str, torch.Tensor]] = {}
    for module, (hashes, stack) in _read(library).items():
        for digest, prototype in zip(hashes, stack.unbind()):
            by_hash.setdefault(digest, {})[module] = prototype
    return by_hash


def expert_prototypes(library: Library) -> dict[str, dict[str, torch.Tensor]]:
    """expert name -> module -> prototype (d_in,), from the store where the weights are unchanged."""
    by_hash = stored_prototypes(library)
    out, missing = {}, False
    for e in library.experts:
        if e.weights_hash in by_hash:
            out[e.name] = by_hash[e.weights_hash]
        else:
            out[e.name] = prototypes_for_adapter(library.load_adapter(e.name).factors)
            missing = True
    if missing:  # a read-only library still routes; its prototypes are just computed again next time
        _write(library, out)
    return out


def cache_prototypes(library: Library) -> None:
    """Compute and keep the prototypes of the experts the store lacks them for."""
    stored = {digest for hashes, _ in _read(library).values() for digest in hashes}
    if any(e.weights_hash not in stored for e in library.experts):
        expert_prototypes(library)


def prototype_matrices(library: Library) -> dict[str, torch.Tensor]:
    """module -> (experts, d_in): row e is the prototype of expert e in the manifest's order,
    zeros where it does not adapt the module. Rows are picked from the stored stacks at once
    (a tensor per expert and module costs a second at 1024 experts); what the store lacks is
    computed (and kept) first."""
    stacks = _read(library)
    cached = {digest for hashes, _ in stacks.values() for digest in hashes}
    if any(e.weights_hash not in cached for e in library.experts):
        stacks = _stacked(expert_prototypes(library), {e.name: e.weights_hash for e in library.experts})
    out = {}
    for module, (hashes, stack) in stacks.items():
        row = {digest: i for i, digest in enumerate(hashes)}
        padded = torch.cat([stack.float(), stack.new_zeros(1, stack.shape[1], dtype=torch.float32)])
        out[module] = padded[[row.get(e.weights_hash, len(hashes)) for e in library.experts]]
    return out


def _read(library: Library) -> dict[str, tuple[list[str], torch.Tensor]]:
    """module -> (weights hash of each row, (rows, d_in) prototypes). One tensor per module
    however many experts there are; the hashes are in the file's metadata."""
    stacks, metadata = library.derived.read(KIND) or ({}, {})
    try:
        rows = json.loads(metadata.get("rows", "{}"))
        if any(len(hashes) != len(stacks[module]) for module, hashes in rows.items()):
            raise ValueError("rows and hashes differ")
    except (ValueError, KeyError, TypeError):
        return {}  # damaged (or older) derived data is computed again
    return {module: (hashes, stacks[module]) for module, hashes in rows.items()}


def _write(library: Library, protos: dict[str, dict[str, torch.Tensor]]) -> None:
    stacks = _stacked(protos, {e.name: e.weights_hash for e in library.experts})
    rows = {module: hashes for module, (hashes, _) in stacks.items()}
    library.derived.write(KIND, {module: stack for module, (_, stack) in stacks.items()}, {"rows": json.dumps(rows)})


def _stacked(
    protos: dict[str, dict[str, torch.Tensor]], hashes: dict[str, str]
) -> dict[str, tuple[list[str], torch.Tensor]]:
    """expert -> module -> prototype as the store holds them: module -> (weights hash of each
    row, (rows, d_in) float32)."""
    rows: dict[str, list[str]] = {}
    vectors: dict[str, list[torch.Tensor]] = {}
    for name, by_module in protos.items():
        for module, vector in by_module.items():
            rows.setdefault(module, []).append(hashes[name])
            vectors.setdefault(module, []).append(vector.float())
    return {module: (rows[module], torch.stack(parts)) for module, parts in vectors.items()}
