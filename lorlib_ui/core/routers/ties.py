"""TIES merging (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models"),
the paper's static merge baseline, applied as in its code to the LoRA factors A and B.

For each factor tensor at a layer, over the experts that adapt it:
1. trim: keep each expert's `density` share of entries largest in magnitude, zero the rest;
2. elect: each entry's sign is the sign of the sum of the trimmed values;
3. disjoint mean: average only the trimmed, non-zero values that agree with the elected sign.
The merged A and the merged s·B (each expert's B carries its LoRA scale s_e = alpha/r, so experts
of different scales merge on the same footing) form one low-rank pair, folded into the layer once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.base import MergeRouter, register

DEFAULT_DENSITY = 0.2  # the TIES paper's and the Ostapenko et al. code's default


def ties_merge(tensors, sizes, density: float):
    """TIES over experts: `tensors` (experts, ...) stacked, `sizes[e]` the number of leading
    entries of expert e's flattened tensor that are its own (the rest is rank padding). Returns
    the merged tensor (...)."""
    flat = tensors.flatten(1)
    trimmed = flat.new_zeros(flat.shape)
    for e, size in enumerate(sizes):
        keep = math.ceil(density * size)
        if keep == 0:
            continue
        values = flat[e, :size]
        top = values.abs().topk(keep).indices
        trimmed[e, top] = values[top]
    sign = trimmed.sum(dim=0).sign()
    agree = (trimmed.sign() == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return merged.view(tensors.shape[1:])


@dataclass(frozen=True)
class TiesConfig:
    """What a user sets on TIES (`--density`)."""

    density: float = DEFAULT_DENSITY  # the share of each expert's entries kept

    def __post_init__(self):
        if not (math.isfinite(self.density) and 0 < self.density <= 1):
            raise LorlibError(f"density must be in (0, 1], got {self.density}")


@register(TiesConfig)
@dataclass(frozen=True)
class TiesRouter(MergeRouter):
    name: ClassVar[str] = "ties"
    summary: ClassVar[str] = "TIES: trim each expert to its largest entries, elect signs, average what agrees"
    groupable: ClassVar[bool] = True
    presets: ClassVar[dict[str, str]] = {"ties": "ties@private"}

    mix: str = "parameters"
    density: float = DEFAULT_DENSITY

    @classmethod
    def build(cls, argument: str, experts: list[str], config: TiesConfig) -> TiesRouter:
        return cls(density=float(config.density))

    @property
    def key(self):
        return (self.name, self.subset, self.density)

    def weights(self, slot):
        """For the routing record: every usable expert takes part equally."""
        usable, n = slot.usable(self.subset)
        return usable.float() / max(n, 1)

    def merge(self, slot):
        usable, _ = slot.usable(self.subset)
        used = usable.nonzero().flatten().tolist()
        e, r, dtype = slot.n_experts, slot.rank, slot.prototypes.dtype
        a = slot.lora_a.to(dtype).view(e, r, -1)
        bt = slot.lora_bt.to(dtype).view(e, r, -1) * slot.scales.to(dtype)[:, None, None]
        if not used:
            return a[0, :0], bt[0, :0]
        ranks = [slot.ranks[i] for i in used]
        merged_a = ties_merge(a[used], [k * a.shape[2] for k in ranks], self.density)
        merged_bt = ties_merge(bt[used], [k * bt.shape[2] for k in ranks], self.density)
        return merged_a, merged_bt

    def describe(self):
        group = f"@{self.group}" if self.group else ""
        return f"ties{group}(density={self.density:g})"
