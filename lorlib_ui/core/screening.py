"""Arrow's exact top-k for one token while reading half of the prototypes' bytes.

Decoding a token on a CPU is bound by memory traffic. With many experts, most of what a routed
layer reads is its prototypes: E·d float32 per layer, at 1024 experts on SmolLM2 283 MB per
token against the base model's 540 MB (issue #15). Screening reads them in float16 instead:

    1. approximate |h·v_e| for every expert from float16 copies of h/‖h‖ and of the prototypes
       (scaled by their largest norm m, so nothing overflows): a ≈ |h·v_e| / (‖h‖ m);
    2. keep as candidates the experts whose approximation lies within 2β of the k-th largest;
    3. score the candidates exactly, in float32, from their rows of the prototypes; the others
       get 0 and are never chosen.

It is exact, not approximate. Rounding h/‖h‖ and v_e/m to float16 moves each by at most u = 2^-11
relative (plus 2^-25 per entry below float16's normal range), the products are summed in float32
(checked once per process, `_sums_in_float32`: otherwise screening is off) and the sum is
rounded to float16 once, so |a_e − |h·v_e|/(‖h‖ m)| ≤ β = 4u + d·2^-22 for unit-norm h/‖h‖ and
v_e/m of norm at most 1. If e is among the true top k, |h·v_e| is at least the true k-th largest
t, so a_e ≥ t − β; and the k-th largest approximation is at most t + β. Hence every true top-k
expert has a_e ≥ (k-th largest a) − 2β: it is a candidate, and its exact score decides. (Exact
ties at a score of 0 are the one case where the choice among equal candidates may differ.)

Candidates are typically k plus a few; the cost is some fifteen small ops per token, and on a CPU
without float16 arithmetic the float16 matmul is slower than its bytes alone would make it, so
screening pays only with many experts (SCREEN_FROM).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

# Experts per layer from which decoding screens. bench_decode.py (2026-12-01, 2-core AVX2): the
# decode ratio to base fell from 0.76x to 0.70x with screening at 256 experts and rose from 0.60x
# to 0.65x at 1024; if both the saving and the fixed cost are as measured, they break even near 640.
SCREEN_FROM = 640


def beta(d: int) -> float:
    """The bound on the float16 approximation's error, in units of ‖h‖·m, for inputs of size d."""
    return 4 * 2.0**-11 + d * 2.0**-22


@functools.cache
def _sums_in_float32() -> bool:
    """Whether this torch's float16 matmul on a CPU sums in float32: 2048 + 576 ones is 2624 then
    (2623 rounded to float16), 2048 if summed in float16 (2048 + 1 rounds back to 2048)."""
    h = torch.ones(1, 577, dtype=torch.float16)
    h[0, 0] = 2048
    return F.linear(h, torch.ones(1, 577, dtype=torch.float16)).item() == 2624


def screen_keys(keys: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """What `screened_scores` reads for key vectors (rows, d): their float16 copy scaled by their
    largest norm m, and m; None where screening cannot run (not on a CPU, no float32 sums)."""
    if keys.device.type != "cpu" or not _sums_in_float32():
        return None
    m = float(keys.norm(dim=1).max())
    return (keys / m if m > 0 else keys).to(torch.float16), m


def screened_scores(
    h: torch.Tensor, keys: torch.Tensor, screen: tuple[torch.Tensor, float], rows: int, k: int, usable: torch.Tensor
) -> torch.Tensor:
    """|h·key| for one token h (1, d) against keys (rows·E, d), read as `rows` rows of E experts:
    exact (up to float32 rounding) for each row's candidates, 0 for the others; `usable` (rows, E)
    marks the experts a row may choose, of which it chooses k. See the module's docstring."""
    half, m = screen
    norm = float(h.norm())
    if norm == 0 or m == 0:  # every score is 0
        return h.new_zeros(rows, keys.shape[0] // rows)
    approx = F.linear((h / norm).to(torch.float16), half).float().view(rows, -1).abs()
    approx = approx.masked_fill(~usable, -1.0)  # below any usable expert's |score| >= 0
    kth = approx.topk(k, dim=1).values[:, -1:]
    chosen = (approx >= kth - 2 * beta(h.shape[1])).view(-1).nonzero().squeeze(1)
    scores = h.new_zeros(keys.shape[0])
    scores[chosen] = F.linear(h, keys.index_select(0, chosen))[0].abs()
    return scores.view(rows, -1)


class Screens:
    """`screen_keys` of the key sets a layer (or group) scores, made when first screened and kept
    while the key tensor is the same object (a set attached again, or moved, is a new one)."""

    def __init__(self):
        self._held: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, float] | None]] = {}

    def scores(
        self, h: torch.Tensor, keys: torch.Tensor, rows: int, router, usable: tuple[torch.Tensor, int], record: bool
    ) -> torch.Tensor:
        """h·key for tokens h (n, d) against keys (rows·E, d), as (n·rows, E): one matmul, or, for
        one token of a router that ranks by |h·key| with at least SCREEN_FROM experts and no
        record (which shows every exact score), `screened_scores`. `usable`: the layer's (mask
        (rows, E), count) for the router."""
        e = keys.shape[0] // rows
        screening = h.shape[0] == 1 and router.screens and not record and e >= SCREEN_FROM
        if screening and (screen := self.of(keys)) is not None:
            mask, n = usable
            return screened_scores(h, keys, screen, rows, min(router.top_k, n), mask.view(rows, e))
        return F.linear(h, keys).view(-1, e)

    def of(self, keys: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        held = self._held.get(id(keys))
        if held is None or held[0] is not keys:  # the tensor is held, so its id is never another's
            held = self._held[id(keys)] = (keys, screen_keys(keys))
        return held[1]

    def clear(self) -> None:
        self._held.clear()
