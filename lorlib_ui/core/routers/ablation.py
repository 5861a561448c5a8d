"""A router with one expert taken out: what an answer loses without it (`lorlib_ui.core.explain`).

For a per-token router the removed expert's weight is set to zero at every token and layer and
the other chosen experts' weights are renormalised to sum to one, as if it had never been a
candidate among the chosen: the others keep their relative shares. A merge is limited to the
other experts (`Router.limit`), so uniform, TIES or a mean of ΔW are recomputed without it.

Made by code, never named by a spec: not registered.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from lorlib_ui.core.routers.base import MergeRouter, Router, Routing, TokenRouter


@dataclass(frozen=True)
class WithoutExpert(TokenRouter):
    """A token router `inner` with expert `removed` (an index of the routed model) taken out."""

    name: ClassVar[str] = "without"
    summary: ClassVar[str] = "a token router with one expert taken out"

    inner: TokenRouter | None = None
    removed: int = -1

    @property
    def keys(self):  # the key set the inner router scores with
        return self.inner.keys

    @property
    def needs(self):
        return self.inner.needs

    def prepare_keys(self, raw):
        return self.inner.prepare_keys(raw)

    def missing(self, library):
        return self.inner.missing(library)

    def bind(self, library, experts):
        return replace(self, inner=self.inner.bind(library, experts))

    def stack(self, slot):
        return self.inner.stack(slot)

    def route(self, slot, scores, h) -> Routing:
        routing = self.inner.route(slot, scores, h)
        weights = routing.dense().clone()
        weights[:, self.removed] = 0
        total = weights.sum(-1, keepdim=True)
        weights = weights / total.clamp_min(1e-30) * (total > 0)
        return Routing(routing.logits, weights=weights)

    @property
    def key(self) -> tuple:
        return (self.name, self.inner.key, self.removed)

    def describe(self) -> str:
        return f"{self.inner.describe()} without expert #{self.removed}"


def without(router: Router, removed: int, n_experts: int) -> Router:
    """`router` with the expert at index `removed` taken out (of `n_experts` in the routed model)."""
    if isinstance(router, MergeRouter):
        used = range(n_experts) if router.subset is None else router.subset
        return router.limit(router.group, tuple(i for i in used if i != removed))
    if isinstance(router, TokenRouter):
        fields = {"mix": router.mix, "group": router.group, "subset": router.subset, "subtracted": router.subtracted}
        return WithoutExpert(**fields, inner=router, removed=removed)
    raise TypeError(f"no expert can be taken out of router {router.describe()}")
