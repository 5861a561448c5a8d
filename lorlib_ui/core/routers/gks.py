"""GenKnowSub (general knowledge subtraction; ACL 2025, aclanthology.org/2025.acl-short.54): Arrow
over task experts from which the library's general knowledge has been subtracted.

Some experts hold general knowledge rather than one task's: adapters trained on general text, or
the multi-task `shared` expert. At each layer, over the general experts that adapt it,

    Ā = mean_g A_g,   B̄ = mean_g B_g             (the factors themselves, without LoRA scales)

and every routed expert e is replaced by A_e − Ā, B_e − B̄ ("forgetting via negation", task
arithmetic), keeping its own scale s_e. Arrow then runs on the subtracted experts: their
prototypes are the top right singular vectors of (B_e − B̄)(A_e − Ā), and the chosen experts
contribute s_e (B_e − B̄)(A_e − Ā) h. General experts are never chosen. This is PEFT's
`create_arrow_model(..., general_adapter_paths=..., arrow_config=ArrowConfig(use_gks=True))`,
with exact prototypes instead of its power iteration.

Which experts are general is the library's to say (`lorlib_ui.core.library`): an expert imported
with kind `general`, or any expert marked general (`mark-general`). A mark is a flag beside the
kind, not a new kind, so a marked `shared` expert stays the `shared` baseline of `evaluate` and
is still retrained by `build` when its tasks change. `library.groups()["general"]` lists them;
`make_router` leaves them out of this router's experts (`Router.subtracts`) and hands it their
indices. Like PEFT, the subtraction needs the general and the routed experts at a layer to share
one rank, and a general expert wherever a routed expert adapts a layer; elsewhere it is refused,
in one line, before any token is routed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.routers.arrow import ArrowRouter
from lorlib_ui.core.routers.base import ExpertStack, LayerSlot, register
from lorlib_ui.core.routers.per_token import TopKConfig


def subtract_general(slot: LayerSlot, routed: list[int], general: list[int]) -> ExpertStack:
    """The layer's experts with the general experts' mean factors subtracted from each routed
    expert, and the prototypes of what is left; the other experts as they are. The layer's own
    buffers are not changed (other routers read them)."""
    from lorlib_ui.core.prototypes import top_right_singular_vectors  # loads torch; the registry need not

    present = slot.present.tolist()
    routed = [i for i in routed if present[i]]
    general = [i for i in general if present[i]]
    if not routed:  # none of the routed experts adapts this layer: nothing to subtract from
        return slot.stack
    if not general:
        raise LorlibError(
            f"arrow_gks: no general expert adapts {slot.name}, which the routed experts adapt; "
            "GenKnowSub needs general experts on every layer the others adapt"
        )
    if len(ranks := {slot.ranks[i] for i in routed + general}) > 1:
        raise LorlibError(
            f"arrow_gks: at {slot.name} the general and the routed experts have ranks "
            f"{', '.join(map(str, sorted(ranks)))}; GenKnowSub subtracts factors of one rank"
        )
    e, r, dtype = slot.n_experts, slot.rank, slot.prototypes.dtype
    a = slot.lora_a.to(dtype, copy=True).view(e, r, -1)
    bt = slot.lora_bt.to(dtype, copy=True).view(e, r, -1)
    # rows beyond an expert's rank are zero in every expert used here (one rank), so they stay zero
    a[routed] -= a[general].mean(dim=0)
    bt[routed] -= bt[general].mean(dim=0)
    prototypes = slot.prototypes.clone()
    prototypes[routed] = top_right_singular_vectors(a[routed], bt[routed].transpose(1, 2)).to(dtype)
    return ExpertStack({**slot.keys, "prototypes": prototypes}, a.flatten(0, 1), bt.flatten(0, 1), slot.scales)


@register(TopKConfig)
@dataclass(frozen=True)
class ArrowGksRouter(ArrowRouter):
    name: ClassVar[str] = "arrow_gks"
    summary: ClassVar[str] = "GenKnowSub: Arrow over the experts minus the mean of the general ones"
    presets: ClassVar[dict[str, str]] = {"arrow-gks": "arrow_gks@private"}
    subtracts: ClassVar[str | None] = "general"

    @classmethod
    def unavailable(cls, groups: dict[str, list[str]]) -> str | None:
        if groups.get("general"):
            return None
        return (
            "arrow_gks needs experts of kind general: import them with "
            "`lorlib import-peft LIB DIRS --kind general` or mark one with `lorlib mark-general LIB NAME`"
        )

    def stack(self, slot):
        routed = list(range(slot.n_experts)) if self.subset is None else list(self.subset)
        routed = [i for i in routed if i not in self.subtracted]
        build = partial(subtract_general, slot, routed, list(self.subtracted))
        return slot.derived((self.name, self.subset, self.subtracted), build)
