"""Routers learned on one task over a library's experts (Poly-style, by `adapt`), stored in the library.

    LIBRARY/routers/<name>-<hash>.safetensors
        for each LoRA'd layer <module> that a mixed expert adapts:
          <module>.logits    (n,)           one routing logit per mixed expert
          <module>.lora_a    (n, r, d_in)   and, where the experts were trained with the router
          <module>.lora_bt   (n, r, d_out)  (poly-full), their A and Bᵀ as trained

The manifest lists them under `learned_routers`: name -> the experts mixed (with the weights hash
each had when the router was learned), the method, task, shots and steps. A learned router routes
as `poly:NAME` (`lorlib_ui.core.routers.poly`); it refuses, in one line, once an expert it mixes
has changed or gone. Writes follow the library's rule: the file under a fresh name, then the
manifest by one atomic rename; a replaced router's file is swept afterwards.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from lorlib_ui.core.adapters import read_regular
from lorlib_ui.core.atomic import fsync_dir, save_tensors, temporary_name
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import LEARNED_ROUTERS as MANIFEST_KEY
from lorlib_ui.core.library import ROUTERS_FOLDER as FOLDER
from lorlib_ui.core.library import Library, check_name

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
    for name, entry in (library.extra.get(MANIFEST_KEY) or {}).items():
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
    """A learned router's record and tensors, read from the library as it is on disk now."""
    current = Library.open(library.path)
    if (problem := learned_problem(current, name, {e.name: e.weights_hash for e in library.experts})) is not None:
        raise LorlibError(problem)
    record = learned_routers(current)[name]
    try:
        tensors = load(read_regular(current.path / record.file))  # not memory-mapped (see read_adapter)
    except (OSError, SafetensorError) as exc:
        raise LorlibError(f"learned router {name}: its file {record.file} is unreadable ({exc})") from None
    return record, tensors


def store_learned_router(
    library: Library, record: LearnedRouter, tensors: dict[str, torch.Tensor], force: bool = False
) -> LearnedRouter:
    """Add a learned router (replace one of that name only with `force`) in one atomic step."""
    check_name(record.name)
    if record.method not in METHODS:
        raise LorlibError(f"unknown method {record.method!r} for a learned router; use {', '.join(METHODS)}")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    with library.edit() as current:
        stored = current.extra.setdefault(MANIFEST_KEY, {})
        if record.name in stored and not force:
            raise LorlibError(
                f"library {library.path} already has a learned router {record.name!r} (use --force to replace it)"
            )
        hashes = {e.name: e.weights_hash for e in current.experts}
        if changed := [x for x, h in zip(record.experts, record.hashes) if hashes.get(x) != h]:
            raise LorlibError(f"expert {changed[0]} changed while the router was learned; run again")
        folder = current.path / FOLDER
        folder.mkdir(exist_ok=True)
        path = folder / f"{record.name}-{digest.hexdigest()[:12]}.safetensors"
        tmp = temporary_name(path)
        try:
            save_tensors(tensors, tmp, metadata={"router": record.name})
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            fsync_dir(folder)
        except (OSError, SafetensorError) as exc:
            tmp.unlink(missing_ok=True)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise LorlibError(f"library {library.path}: could not write ({reason}); the library is unchanged") from None
        record.file, record.content = f"{FOLDER}/{path.name}", digest.hexdigest()[:16]
        record.created = datetime.now(UTC).isoformat(timespec="seconds")
        stored[record.name] = {k: v for k, v in asdict(record).items() if k != "name"}
    return record


def remove_learned_router(library: Library, name: str) -> None:
    with library.edit() as current:
        stored = current.extra.get(MANIFEST_KEY) or {}
        if name not in stored:
            raise LorlibError(f"library {library.path} has no learned router {name!r}")
        del stored[name]


def summary(record: LearnedRouter) -> str:
    """One line about a learned router, for menus and listings."""
    what = "router and experts trained" if record.trains_experts else "a router over the frozen experts"
    shots = record.training.get("shots")
    return f"{record.method}: {what}, on {record.task or '?'}" + (f" ({shots} shots)" if shots else "")
