"""What a library keeps beside its experts that was computed from them: one store, one API.

Every kind of derived data is keyed by the weights hashes of the experts it was computed from
(as mttl's library keeps its "auxiliary data"), so a stale entry is recognised and never used for
experts that have changed. The store decides where each kind lives; the module that computes a
kind only names it. `KINDS` lists them all, in four shapes:

    tensors     LIBRARY/<kind>.safetensors                  over many experts, each row keyed by
                                                            a weights hash in its metadata
    json        LIBRARY/<kind>.json                         an analysis; the manifest's
                                                            `side_files` names it, with a summary
    per_expert  LIBRARY/experts/<name>/<kind>.safetensors   one expert's vectors, stamped with
                                                            its weights hash
    named       LIBRARY/<folder>/<entry>-<digest>.safetensors
                                                            entries over some experts, each
                                                            recorded in the manifest under <kind>

Adding a kind is one line here and the module that computes it. Reads never fail: a missing,
damaged or stale entry reads as absent (what can be computed again is computed again). Only a
view that marks it may read a stale entry on purpose, with what changed since (`Changes`: experts
added, removed or retrained, from the hashes it was computed with); nothing routes with one. Writes
are atomic and refused when the experts changed while the data was computed. `sweep` deletes
only the store's own leftovers: temporary files of its writes, and the files of replaced
named entries.

The store reads and writes through its library (`Host`), which it never imports: the library
opens a store over itself (`Library.derived`).
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from lorlib_ui.core.adapters import read_metadata, read_regular, read_safetensors
from lorlib_ui.core.atomic import atomic_save_tensors, atomic_write_text
from lorlib_ui.core.errors import LorlibError

SHAPES = ("tensors", "json", "per_expert", "named")
MAX_SIDE_FILE = 256 * 2**20  # a side file larger than this is not one lorlib wrote: not read
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,159}")  # a file name the store writes
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{32}")  # `atomic.temporary_name`'s names


@dataclass(frozen=True)
class Kind:
    name: str
    shape: str
    folder: str = ""  # named: where its entries' files go

    @property
    def file(self) -> str:
        return f"{self.name}.json" if self.shape == "json" else f"{self.name}.safetensors"


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("prototypes", "tensors"),  # Arrow's prototypes (core.prototypes)
        Kind("mbc-gram", "tensors"),  # MBC's similarity of task experts (training.clusters)
        Kind("gates", "per_expert"),  # PhatGoose's gates (training.keys)
        Kind("activations", "per_expert"),  # mean hidden states at each layer (training.keys)
        Kind("transfer", "json"),  # which expert helps which task (analysis.transfer)
        Kind("routing", "json"),  # routing statistics on held-out tasks (analysis.routing_stats)
        Kind("learned_routers", "named", folder="routers"),  # Poly routers (core.learned_routers)
    )
}
KEY_SETS = tuple(name for name, kind in KINDS.items() if kind.shape == "per_expert")


class Expert(Protocol):
    name: str
    path: str
    weights_hash: str


class Host(Protocol):
    """What the store reads of its library (`lorlib_ui.core.library.Library`)."""

    path: Path
    experts: list
    extra: dict

    def edit(self) -> AbstractContextManager: ...  # the manifest, changed in one atomic step

    def locked(self) -> AbstractContextManager: ...  # the library as it is on disk, under its lock

    def expert(self, name: str) -> Expert: ...


def _kind(name: str, shape: str) -> Kind:
    kind = KINDS.get(name)
    if kind is None or kind.shape != shape:
        raise ValueError(f"{name!r} is not a kind of derived data of shape {shape}")
    return kind


def _one(kind: str) -> str:
    """One entry of a named kind, in words: learned_routers -> learned router."""
    return kind.replace("_", " ").removesuffix("s")


def _write_error(path: Path, exc: Exception) -> LorlibError:
    reason = getattr(exc, "strerror", None) or str(exc)  # safetensors' errors carry only a message
    return LorlibError(f"library {path}: could not write ({reason}); the library is unchanged")


@dataclass(frozen=True)
class Changes:
    """What changed among a library's experts since some derived data was computed from them."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    retrained: tuple[str, ...] = ()  # same name, other weights

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.retrained)

    def describe(self, added: str = "added") -> str:
        """In words, for a stale mark: '1 expert added since', '2 experts retrained and 1 removed since'."""
        counts = [(len(n), verb) for n, verb in ((self.added, added), (self.retrained, "retrained")) if n]
        counts += [(len(self.removed), "removed")] if self.removed else []
        if not counts:
            return "the experts changed since"  # the same experts in another order
        words = [f"{n} {verb}" for n, verb in counts]
        words[0] = f"{counts[0][0]} expert{'s' if counts[0][0] != 1 else ''} {counts[0][1]}"
        listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        return f"{listed} since"


def changes(then: Mapping[str, str], now: Mapping[str, str]) -> Changes:
    """How the experts `now` differ from those `then` (each: expert name -> weights hash)."""
    return Changes(
        added=tuple(n for n in now if n not in then),
        removed=tuple(n for n in then if n not in now),
        retrained=tuple(n for n in now if n in then and then[n] != now[n]),
    )


def created_since(created: str, moment: float | str) -> bool:
    """Whether an expert created at `created` came after `moment` (a time stamp, or ISO like
    `created`): ISO times count to the second, so the same second is not after."""
    try:
        stamp = datetime.fromisoformat(created).timestamp()
        moment = datetime.fromisoformat(moment).timestamp() if isinstance(moment, str) else moment
    except (TypeError, ValueError):
        return False
    return stamp > int(moment)


class Derived:
    """The derived data of one library."""

    def __init__(self, library: Host):
        self.library = library

    @property
    def hashes(self) -> dict[str, str]:
        """Expert name -> weights hash, as the library holds them now."""
        return {e.name: e.weights_hash for e in self.library.experts}

    # ---- tensors over many experts -----------------------------------------------------------
    def read(self, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The tensors and metadata of a library-wide kind, or None where missing or unreadable."""
        path = self.library.path / _kind(kind, "tensors").file
        if not path.is_file():
            return None
        try:
            return read_safetensors(path, f"the cache {path.name}")
        except LorlibError:
            return None

    def write(self, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Replace a library-wide kind whole, atomically, under the write lock. Where it cannot be
        written (a read-only library, a full disk) nothing is: it is computed again next time."""
        path = self.library.path / _kind(kind, "tensors").file
        try:
            with self.library.locked():
                atomic_save_tensors(path, {k: v.contiguous() for k, v in tensors.items()}, metadata)
        except (OSError, SafetensorError, LorlibError):  # LorlibError: a read-only snapshot from the hub
            pass

    # ---- JSON side files ---------------------------------------------------------------------
    def read_json(self, kind: str) -> dict | None:
        """The side file of `kind`, or None when there is none or it is unreadable."""
        entry = self.library.extra.get("side_files", {}).get(_kind(kind, "json").name)
        if entry is None:
            return None
        try:
            return json.loads(read_regular(self.library.path / entry["file"], MAX_SIDE_FILE).decode("utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def update_json(self, kind: str, update: Callable[[dict | None, Host], tuple[dict, dict]]) -> None:
        """Rewrite the side file of `kind` atomically under the write lock: `update(stored, library)`
        gets what is stored now (None if nothing) and the library as it is on disk, and returns
        the new contents and a summary of them (a few fields) for the manifest, which names the file."""
        kind_ = _kind(kind, "json")
        with self.library.edit() as current:
            data, summary = update(Derived(current).read_json(kind), current)
            try:
                atomic_write_text(current.path / kind_.file, json.dumps(data, separators=(",", ":")))
            except OSError as exc:
                raise _write_error(self.library.path, exc) from None
            updated = datetime.now(UTC).isoformat(timespec="seconds")
            current.extra.setdefault("side_files", {})[kind] = {"file": kind_.file, "updated": updated, **summary}

    # ---- one expert's vectors ----------------------------------------------------------------
    def _expert_file(self, expert: Expert, kind: str) -> Path:
        return self.library.path / expert.path / _kind(kind, "per_expert").file

    def expert_info(self, kind: str) -> dict[str, dict]:
        """Expert name -> how its `kind` was computed, for the experts that have it for their
        current weights (only the files' headers are read)."""
        out = {}
        for e in self.library.experts:
            path = self._expert_file(e, kind)
            if not path.is_file():
                continue
            try:
                meta = read_metadata(path)
                info = json.loads(meta.get("info", "{}"))
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # damaged: as if missing, computed again
            if meta.get("weights_hash") == e.weights_hash and isinstance(info, dict):
                out[e.name] = info
        return out

    def lacking(self, kind: str, names: list[str] | None = None) -> list[str]:
        """The experts among `names` (default: all) without `kind` for their current weights."""
        have = self.expert_info(kind)
        return [e.name for e in self.library.experts if (names is None or e.name in names) and e.name not in have]

    def changes_since(self, hashes: Mapping[str, str]) -> Changes:
        """What changed among the experts since data was computed from these (name -> weights hash)."""
        return changes(hashes, self.hashes)

    def _stamps(self, kind: str) -> dict[str, tuple[str | None, float, dict]]:
        """Expert name -> (the weights hash its `kind` file is stamped with, the file's time, its
        info), for every expert with a readable file, fresh or stale."""
        out = {}
        for e in self.library.experts:
            path = self._expert_file(e, kind)
            try:
                meta = read_metadata(path)
                info = json.loads(meta.get("info", "{}"))
                out[e.name] = (meta.get("weights_hash"), path.stat().st_mtime, info if isinstance(info, dict) else {})
            except (OSError, ValueError, TypeError, AttributeError):
                continue
        return out

    def key_changes(self, kind: str, names: list[str] | None = None) -> Changes:
        """Why experts among `names` (default: all) lack `kind` for their weights, where it went
        stale: computed for weights they no longer have (retrained), or never, though they were
        added after the others' were computed (added; a replaced expert is stored anew, so it is
        among these). Those never given it are in neither."""
        _kind(kind, "per_expert")
        stamps = self._stamps(kind)
        by_name = {e.name: e for e in self.library.experts}
        fresh = [when for name, (stamp, when, _) in stamps.items() if stamp == by_name[name].weights_hash]
        newest = max(fresh, default=None)  # when the last of the others' was computed
        lacking = self.lacking(kind, names)
        return Changes(
            added=tuple(n for n in lacking if n not in stamps and newest and created_since(by_name[n].created, newest)),
            retrained=tuple(n for n in lacking if n in stamps and stamps[n][0] != by_name[n].weights_hash),
        )

    def seconds_per_expert(self, kind: str) -> float | None:
        """What computing `kind` took per expert in this library, as measured: the median of the
        times its files record, else the last recorded command that computed it over the experts
        holding it; None where nothing was measured."""
        stamps = self._stamps(kind)
        timed = [info["seconds"] for _, _, info in stamps.values() if isinstance(info.get("seconds"), int | float)]
        if timed:
            return float(statistics.median(timed))
        runs = [
            h.get("seconds")
            for h in self.library.extra.get("history", [])
            if isinstance(h, dict) and kind in str(h.get("command", "")).split()
        ]
        runs = [s for s in runs if isinstance(s, int | float) and s > 0]
        return runs[-1] / len(stamps) if runs and stamps else None

    def read_experts(self, kind: str) -> dict[str, dict[str, torch.Tensor]]:
        """Expert name -> its `kind` tensors, for the experts that have them for their weights."""
        out = {}
        for name in self.expert_info(kind):
            try:
                out[name] = load(read_regular(self._expert_file(self.library.expert(name), kind)))
            except (SafetensorError, OSError):
                continue
        return out

    def write_expert(self, kind: str, name: str, tensors: dict[str, torch.Tensor], info: dict, weights_hash: str):
        """Store one expert's `kind` tensors computed for the weights with hash `weights_hash`,
        atomically, next to its adapter. Refused if the expert has changed since."""
        with self.library.locked() as current:
            expert = current.expert(name)
            if expert.weights_hash != weights_hash:
                raise LorlibError(f"expert {name} changed while its {kind} were computed; run again")
            tensors = {m: v.detach().float().contiguous().cpu() for m, v in tensors.items()}
            metadata = {"weights_hash": weights_hash, "info": json.dumps(info)}
            try:
                atomic_save_tensors(Derived(current)._expert_file(expert, kind), tensors, metadata)
            except (OSError, SafetensorError) as exc:
                raise _write_error(self.library.path, exc) from None

    # ---- named entries -----------------------------------------------------------------------
    def entries(self, kind: str) -> dict[str, dict]:
        """The manifest's records of a named kind, by entry name (each names its `file`)."""
        _kind(kind, "named")
        return dict(self.library.extra.get(kind) or {})

    def read_entry(self, kind: str, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one named entry, as its record in this library names them."""
        record = self.entries(kind).get(name) or {}
        try:
            return load(read_regular(self.library.path / record["file"]))  # not memory-mapped
        except (OSError, SafetensorError, KeyError, TypeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise LorlibError(f"{kind} {name}: its file {record.get('file')} is unreadable ({reason})") from None

    def store_entry(
        self,
        kind: str,
        name: str,
        tensors: dict[str, torch.Tensor],
        record: Callable[[Host, str], dict],
        force: bool = False,
    ) -> dict:
        """Add a named entry (replace one of that name only with `force`) in one atomic step: its
        file under a fresh name, then the manifest. `record(current, file)` makes the manifest's
        record from the library as it is on disk (and may refuse, for experts changed meanwhile)."""
        kind_ = _kind(kind, "named")
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
        digest = hashlib.sha256()
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(tensors[key].numpy().tobytes())
        with self.library.edit() as current:
            stored = current.extra.setdefault(kind, {})
            if name in stored and not force:
                raise LorlibError(
                    f"library {self.library.path} already has a {_one(kind)} {name!r} (use --force to replace it)"
                )
            folder = current.path / kind_.folder
            path = folder / f"{name}-{digest.hexdigest()[:12]}.safetensors"
            entry = record(current, f"{kind_.folder}/{path.name}") | {"content": digest.hexdigest()[:16]}
            try:
                folder.mkdir(exist_ok=True)
                atomic_save_tensors(path, tensors, {kind: name})
            except (OSError, SafetensorError) as exc:
                raise _write_error(self.library.path, exc) from None
            stored[name] = entry
        return entry

    def remove_entry(self, kind: str, name: str) -> None:
        with self.library.edit() as current:
            stored = current.extra.get(_kind(kind, "named").name) or {}
            if name not in stored:
                raise LorlibError(f"library {self.library.path} has no {_one(kind)} {name!r}")
            del stored[name]

    # ---- what routers need -------------------------------------------------------------------
    def lacks_for(self, router) -> str | None:
        """Why `router` cannot run on this library, in one line (what it stores here is gone or
        stale, or the per-expert key set it scores with is missing for some of the experts it
        would use); None when it can."""
        if (problem := router.missing(self.library)) is not None:
            return problem
        kind = router.needs
        if kind not in KEY_SETS:
            return None
        names = [e.name for e in self.library.experts]
        used = names if router.subset is None else [names[i] for i in router.subset]
        lacking = self.lacking(kind, used)
        if not lacking:
            return None
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        return (
            f"router {router.describe()} needs {kind} for every expert it uses, and {shown} "
            f"{'has' if len(lacking) == 1 else 'have'} none; compute them with `lorlib {kind} {self.library.path}`"
        )

    # ---- checks and housekeeping -------------------------------------------------------------
    def problem(self) -> str | None:
        """Why the manifest's records of derived data are unsafe to follow, in one line, or None:
        they may name only the files this store writes, inside the library."""
        side = self.library.extra.get("side_files", {})
        named = {k: self.library.extra.get(k) or {} for k, kind in KINDS.items() if kind.shape == "named"}
        if not isinstance(side, dict) or not all(isinstance(v, dict) for v in named.values()):
            return f"side_files and {', '.join(named)} must be JSON objects"
        for key, entry in side.items():
            file = entry.get("file") if isinstance(entry, dict) else None
            if not (isinstance(key, str) and _PLAIN.fullmatch(key) and ".." not in key and file == f"{key}.json"):
                shown = f"side file {str(key)[:60]!r} names {str(file)[:60]!r}"
                return f"{shown}; a side file is <name>.json in the library itself"
        for kind, records in named.items():
            folder = KINDS[kind].folder
            for name, entry in records.items():
                file = str(entry.get("file", "")) if isinstance(entry, dict) else ""
                where, _, base = file.partition("/")
                plain = _PLAIN.fullmatch(base) and ".." not in base and base.endswith(".safetensors")
                if where != folder or not plain:
                    return f"{_one(kind)} {str(name)[:60]!r} names file {file[:60]!r}, which is not in its {folder}/"
        return None

    def files(self) -> set[str]:
        """The library-level files the store may have written (what the library keeps in a sweep)."""
        return {kind.file for kind in KINDS.values() if kind.shape == "tensors"} | {
            f"{key}.json" for key in self.library.extra.get("side_files", {})
        }

    def sweep(self) -> None:
        """Delete the store's leftovers (under the write lock): temporary files a killed process
        left, and the files of replaced or removed named entries. Only names this store writes."""
        sweep_temporaries(self.library.path, self.files())
        per_expert = {KINDS[kind].file for kind in KEY_SETS}
        for e in self.library.experts:
            sweep_temporaries(self.library.path / e.path, per_expert)
        for kind in (k for k in KINDS.values() if k.shape == "named"):
            folder = self.library.path / kind.folder
            if not folder.is_dir() or folder.is_symlink():
                continue
            named = {str(entry.get("file", "")) for entry in (self.library.extra.get(kind.name) or {}).values()}
            for child in folder.iterdir():
                if f"{kind.folder}/{child.name}" not in named and not child.is_dir():
                    child.unlink(missing_ok=True)


def sweep_temporaries(folder: Path, written: set[str]) -> None:
    """Delete the leftover temporary files (`atomic.temporary_name`) of the names in `written`."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for child in folder.iterdir():
        match = _TEMPORARY.fullmatch(child.name)
        if match and match["name"] in written and not child.is_symlink() and child.is_file():
            child.unlink(missing_ok=True)
