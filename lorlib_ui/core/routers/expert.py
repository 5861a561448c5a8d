"""One expert alone, `expert:NAME`, as if it were the only adapter: how each expert does by itself
(the transfer matrix), the multi-task `shared` expert as a baseline (Ostapenko et al., 2024,
Sec. 6), a stored LoraHub merge, and what the oracle stands for on a task (`oracle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorlib_ui.core.routers.base import MergeRouter, register


@register()
@dataclass(frozen=True)
class ExpertRouter(MergeRouter):
    """One named expert, as if it were the only adapter."""

    name: ClassVar[str] = "expert"
    summary: ClassVar[str] = "one expert alone"
    argument: ClassVar[str | None] = "NAME"
    presets: ClassVar[dict[str, str]] = {"shared": "expert:shared"}  # the multi-task baseline

    expert: str = ""
    index: int = 0

    @classmethod
    def argument_problem(cls, argument: str, experts: list[str]) -> str | None:
        if argument in experts:
            return None
        return f"unknown expert {argument!r} (experts: {', '.join(experts) or 'none'})"

    @classmethod
    def build(cls, argument: str, experts: list[str], config=None) -> ExpertRouter:
        return cls(expert=argument, index=experts.index(argument))

    @property
    def key(self):
        return (self.name, self.index)

    def weights(self, slot):
        weights = slot.present.new_zeros(slot.n_experts).float()
        weights[self.index] = 1.0
        return weights

    def describe(self):
        return f"expert:{self.expert}"
