"""Routers learned on one task over a library's experts (Poly-style, by `adapt`), stored in the library.

    LIBRARY/routers/<name>-<hash>.safetensors
        for each LoRA'd layer <module> that a mixed expert adapts:
          <module>.logits    (n,)           one routing logit per mixed expert
          <module>.lora_a    (n, r, d_in)   and, where the experts were trained with the router
          <module>.lora_bt   (n, r, d_out)  (poly-full), their A and Bᵀ as trained

The manifest lists them under `learned_routers`: name -> the experts mixed (with the weights hash
each had when the router was learned), the method, task, shots and steps. A learned router routes
as `poly:NAME` (`lorlib_ui.core.routers.poly`); it refuses, in one line, once an expert it mixes
has changed or gone. They are the library's derived data of kind `learned_routers`, named entries
(`lorlib_ui.core.derived`): the file under a fresh name, then the manifest by one atomic rename;
a replaced router's file is swept afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime

import torch

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library, check_name

KIND = "learned_routers"  # their kind of derived data (`lorlib_ui.core.derived`): named entries
METHODS = ("poly-router", "poly-full")  # the experts frozen, or trained along with the router


@dataclass
class LearnedRouter:
    """Manifest entry of one learned router."""

    name: str
    method: str
    experts: list[str]  # the experts it mixes, in the order of its logits
    hashes: list[str]  # each one's weights hash when the router was learned
    file: str = ""  # relative to the library; filled in when stored
    content: str = ""  # hash of the file's tensors: identifies this version in caches
    task: str | None = None
    family: str | None = None
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> LearnedRouter:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def trains_experts(self) -> bool:
        return self.method == "poly-full"


def learned_routers(library: Library) -> dict[str, LearnedRouter]:
    """The library's learned routers by name (an entry that does not parse is left out)."""
    out = {}
    for name, entry in library.derived.entries(KIND).items():
        try:
            out[name] = LearnedRouter.from_dict({**entry, "name": name})
        except TypeError:
            continue
    return out


def learned_problem(library: Library, name: str, hashes: dict[str, str] | None = None) -> str | None:
    """Why `poly:NAME` cannot route on this library, in one line, or None: the router is unknown,
    or an expert it mixes is gone or has changed (checked against `hashes`, expert -> weights hash,
    by default the library's)."""
    known = learned_routers(library)
    if name not in known:
        listed = ", ".join(known) or "none; learn one with `lorlib adapt`"
        return f"library {library.path} has no learned router {name!r} (learned routers: {listed})"
    record = known[name]
    hashes = hashes if hashes is not None else {e.name: e.weights_hash for e in library.experts}
    for expert, stored in zip(record.experts, record.hashes):
        if expert not in hashes:
            return f"learned router {name} mixes expert {expert}, which is no longer in the library"
        if hashes[expert] != stored:
            return f"learned router {name} mixes expert {expert}, which has changed since; learn the router again"
    return None


def read_learned_router(library: Library, name: str) -> tuple[LearnedRouter, dict[str, torch.Tensor]]:
    """A learned router's record and tensors, as `library` (the one a request opened) names them."""
    if (problem := learned_problem(library, name)) is not None:
        raise LorlibError(problem)
    return learned_routers(library)[name], library.derived.read_entry(KIND, name)


def store_learned_router(
    library: Library, record: LearnedRouter, tensors: dict[str, torch.Tensor], force: bool = False
) -> LearnedRouter:
    """Add a learned router (replace one of that name only with `force`) in one atomic step."""
    check_name(record.name)
    if record.method not in METHODS:
        raise LorlibError(f"unknown method {record.method!r} for a learned router; use {', '.join(METHODS)}")

    def entry(current: Library, file: str) -> dict:
        hashes = {e.name: e.weights_hash for e in current.experts}
        if changed := [x for x, h in zip(record.experts, record.hashes) if hashes.get(x) != h]:
            raise LorlibError(f"expert {changed[0]} changed while the router was learned; run again")
        created = datetime.now(UTC).isoformat(timespec="seconds")
        return {k: v for k, v in asdict(record).items() if k != "name"} | {"file": file, "created": created}

    stored = library.derived.store_entry(KIND, record.name, tensors, entry, force=force)
    return LearnedRouter.from_dict({**stored, "name": record.name})


def remove_learned_router(library: Library, name: str) -> None:
    library.derived.remove_entry(KIND, name)


def summary(record: LearnedRouter) -> str:
    """One line about a learned router, for menus and listings."""
    what = "router and experts trained" if record.trains_experts else "a router over the frozen experts"
    shots = record.training.get("shots")
    return f"{record.method}: {what}, on {record.task or '?'}" + (f" ({shots} shots)" if shots else "")
