"""Static routers: the base model alone, and the uniform merges of the library.

µ ("uniform") is the paper's merge baseline (Ostapenko et al., 2024, Sec. 6): the mean of the
experts' A factors and the mean of their B factors, as in its code. `mean_delta` averages the
experts' updates ΔW_e = s_e B_e A_e instead. Both are computed once per layer and folded into one
low-rank pair of factors by the layer (`LibraryLinear.merged_factors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorlib_ui.core.routers.base import MergeRouter, register


@register()
@dataclass(frozen=True)
class BaseRouter(MergeRouter):
    """The base model alone: no expert is applied."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = "the base model, no adapters"
    applies_experts: ClassVar[bool] = False
    presets: ClassVar[dict[str, str]] = {"base": "base"}

    def weights(self, slot):
        return slot.present.new_zeros(slot.n_experts).float()


@register()
@dataclass(frozen=True)
class UniformRouter(MergeRouter):
    """µ: the uniform merge, mean of the A's and mean of the B's (as in the paper's code).

    At a layer that only some experts adapt, the mean is over those experts.
    """

    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "µ, the mean of the A's and the mean of the B's"
    groupable: ClassVar[bool] = True
    presets: ClassVar[dict[str, str]] = {"uniform": "uniform@private"}

    mix: str = "parameters"

    def weights(self, slot):
        usable, n = slot.usable(self.subset)
        return usable.float() / max(n, 1)


@register()
@dataclass(frozen=True)
class MeanDeltaRouter(UniformRouter):
    """Mean of the experts' updates ΔW_e = s_e B_e A_e (over the experts adapting the layer)."""

    name: ClassVar[str] = "mean_delta"
    summary: ClassVar[str] = "the mean of the experts' ΔW"
    presets: ClassVar[dict[str, str]] = {"mean_delta": "mean_delta@private"}

    mix: str = "outputs"
