"""A library of LoRA experts over one base model, stored as a folder.

    LIBRARY/
      manifest.json               base model, its linear shapes, experts, clusters
      experts/<name>/             one standard PEFT adapter folder per expert
      experts/<name>/<keys>.safetensors
                                  routing keys computed for one expert after training, next to it:
                                  PhatGoose gates ("gates"), mean hidden states ("activations"),
                                  each stamped with the hash of the weights it was computed for
      prototypes.safetensors      cached Arrow prototypes: one matrix per module, its rows keyed by
                                  a hash of each expert's weights
      mbc-gram.safetensors        cached Gram matrix of the experts' MBC weight vectors, its rows
                                  keyed the same way (`build.clusters.weight_gram`)
      routers/<name>-<hash>.safetensors
                                  routers learned on a task over the experts (`learned_routers`)
      <analysis>.json             side files the manifest names under `side_files` (the transfer
                                  matrix, say), whose entries carry the weights hash they used

Experts have a kind: private (one task), cluster (MBC), shared (all tasks), imported, general
(general knowledge, no task), lorahub or adapted (for a new task, from a few of its examples). Any
expert may also be marked general (`mark_general`): GenKnowSub (`arrow_gks`) subtracts the general
experts' mean from the others. The mark is a flag beside the kind, so a marked shared expert is
still the shared expert (`evaluate`'s baseline, retrained by `build` when its tasks change), and it
stays with the name when the expert is replaced.

The manifest is the single source of truth: a folder under experts/ that it does not name is
ignored (and swept at the next write). Every write goes to a temporary name first and becomes
visible by one atomic rename, the manifest last, so a crash at any point leaves the previous
library intact. Writers take an exclusive lock on LIBRARY/.lock.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from lorlib_ui.core.adapters import (
    LoraAdapter,
    read_adapter,
    read_metadata,
    read_regular,
    read_safetensors,
    weights_hash,
    write_adapter,
)
from lorlib_ui.core.atomic import atomic_write_text, fsync_dir, fsync_tree, save_tensors, temporary_name
from lorlib_ui.core.base_model import BaseModelInfo, shapes_fingerprint
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.limits import MAX_ALPHA, max_rank
from lorlib_ui.core.prototypes import prototypes_for_adapter

MANIFEST = "manifest.json"
PROTOTYPES = "prototypes.safetensors"
MBC_GRAM = "mbc-gram.safetensors"
CACHES = (PROTOTYPES, MBC_GRAM)  # files computed from the experts, rebuilt when missing or stale
MAX_SIDE_FILE = 256 * 2**20  # a side file larger than this is not one lorlib wrote: not read
FORMAT = "lorlib-library"
VERSION = 1
# lorahub: a few-shot merge of experts; adapted: trained on a few examples of a new task (`adapt`)
KINDS = ("private", "cluster", "shared", "imported", "general", "lorahub", "adapted")
TASK_KINDS = ("private", "imported")  # experts of one task each: what MBC clusters
KEY_SETS = ("gates", "activations")  # routing keys stored next to an expert (see `write_keys`)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,159}")  # a folder or file name the library writes
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{32}")  # `atomic.temporary_name`'s names
LEARNED_ROUTERS = "learned_routers"  # the manifest's key for them (`learned_routers`)
ROUTERS_FOLDER = "routers"


def check_name(name: str) -> str:
    """Expert names become folder names: letters, digits and _ . + - only, no '..'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise LorlibError(
            f"invalid expert name {name!r}: use 1-100 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


@dataclass
class Expert:
    """Manifest entry of one expert."""

    name: str
    kind: str
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str
    fingerprint: str  # of the (module, shape) pairs this expert adapts
    weights_hash: str
    path: str  # adapter folder, relative to the library
    tasks: list[str] = field(default_factory=list)
    family: str | None = None
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = ""
    general: bool = False  # subtracted by GenKnowSub (`arrow_gks`); always so for kind general

    def __post_init__(self):
        self.general = bool(self.general) or self.kind == "general"

    @classmethod
    def from_dict(cls, data: dict) -> Expert:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class HeldOut:
    """The manifest's held-out record: the tasks kept out of every expert, and their data, which
    is "default" (the embedded data), a file inside the library (a relative path), a local file
    (an absolute path, as `build` records the file it was given) or a hub dataset id. Opening a
    library only reads the record; the data loads when a command needs it."""

    data: str = "default"
    tasks: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, record, path: Path) -> HeldOut:
        if record is None:
            return cls()
        if not isinstance(record, dict):
            raise LorlibError(f"library {path}: its held_out record must name its data and a list of tasks")
        data, tasks = record.get("data") or "default", record.get("tasks") or []
        if not isinstance(data, str) or not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise LorlibError(f"library {path}: its held_out record must name its data and a list of tasks")
        parts = PurePosixPath(data).parts
        inside = not PurePosixPath(data).is_absolute() and ".." not in parts and "\\" not in data
        if not (data == "default" or PurePosixPath(data).is_absolute() or inside):
            raise LorlibError(f"library {path}: its held-out data {data[:80]!r} is neither a file in it nor a path")
        if "\0" in data or len(data) > 4096:
            raise LorlibError(f"library {path}: its held-out data is not a usable name")
        return cls(data, tuple(tasks))

    def to_manifest(self) -> dict:
        return {"data": self.data, "tasks": list(self.tasks)}

    @property
    def kind(self) -> str:
        """default, inside (a file in the library), path (a local file anywhere) or hub (a dataset id)."""
        if self.data == "default":
            return "default"
        if PurePosixPath(self.data).is_absolute():
            return "path"
        return "hub" if _HUB_ID.fullmatch(self.data) and len(PurePosixPath(self.data).parts) == 2 else "inside"

    def source(self, library_path: Path) -> str:
        """What `load_tasks` reads: a file in the library by its full path (a relative path that
        names no file there but looks like owner/name is a hub id)."""
        if self.kind == "inside" or (self.kind == "hub" and (library_path / self.data).exists()):
            return str(library_path / self.data)
        return self.data


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


class Library:
    """A library folder. Opening reads only the manifest; weights load on demand."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.base_model: str = manifest["base_model"]
        self.base_shapes: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in manifest["base_shapes"].items()}
        self.experts: list[Expert] = [Expert.from_dict(e) for e in manifest["experts"]]
        self.clusters: dict = manifest.get("clusters", {})
        self.extra: dict = {k: v for k, v in manifest.items() if k not in _MANIFEST_KEYS}

    # ---- opening and creating -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Library:
        """Open the library at `path`, checking its manifest whole (it is untrusted input: a library
        may come from anywhere) and its tree: a one-line error on anything that could make lorlib
        read, write or delete outside the library."""
        path = Path(path)
        manifest_path = path / MANIFEST
        try:
            text = read_regular(manifest_path).decode("utf-8")
        except FileNotFoundError:
            raise LorlibError(f"no library at {path} ({MANIFEST} not found)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LorlibError(f"library {path}: {MANIFEST} is unreadable ({_reason(exc)})") from None
        try:
            manifest = json.loads(text)
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
            if manifest.get("version", 0) > VERSION:
                raise ValueError(f"version {manifest['version']} is newer than this lorlib ({VERSION})")
            library = cls(path, manifest)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LorlibError(f"library {path}: {MANIFEST} is unreadable ({exc})") from None
        library._check_folders()
        library._check_named_files()
        library._check_tree()
        library.held_out  # noqa: B018 (checks the record)
        return library

    def _check_folders(self) -> None:
        """Every expert's folder is experts/<one name> inside this library: a manifest from
        elsewhere must not make lorlib read (or zip up for download) any other folder."""
        for e in self.experts:
            check_name(e.name)
            parts = PurePosixPath(str(e.path)).parts
            inside = len(parts) == 2 and parts[0] == "experts" and _FILE.fullmatch(parts[1]) and ".." not in parts[1]
            if not inside:
                raise LorlibError(
                    f"library {self.path}: expert {e.name!r} names folder {e.path!r}, which is not in its experts/"
                )

    def _check_named_files(self) -> None:
        """The files the manifest names beside the experts are the names the library itself
        writes: side files `<key>.json`, learned routers `routers/<name>-<hash>.safetensors`."""
        side = self.extra.get("side_files", {})
        routers = self.extra.get(LEARNED_ROUTERS) or {}
        if not isinstance(side, dict) or not isinstance(routers, dict):
            raise LorlibError(f"library {self.path}: side_files and {LEARNED_ROUTERS} must be JSON objects")
        for key, entry in side.items():
            file = entry.get("file") if isinstance(entry, dict) else None
            if not (isinstance(key, str) and _NAME.fullmatch(key) and ".." not in key and file == f"{key}.json"):
                raise LorlibError(
                    f"library {self.path}: side file {str(key)[:60]!r} names {str(file)[:60]!r}; "
                    "a side file is <name>.json in the library itself"
                )
        for name, entry in routers.items():
            file = str(entry.get("file", "")) if isinstance(entry, dict) else ""
            folder, _, base = file.partition("/")
            plain = _FILE.fullmatch(base) and ".." not in base and base.endswith(".safetensors")
            if folder != ROUTERS_FOLDER or not plain:
                raise LorlibError(
                    f"library {self.path}: learned router {str(name)[:60]!r} names file {file[:60]!r}, "
                    f"which is not in its {ROUTERS_FOLDER}/"
                )

    def _check_tree(self) -> None:
        """Nothing in the library's own tree is a link or a special file (a FIFO, a device): each
        could make a read hang or lead a read, a write or a sweep outside the library."""
        pending = [self.path]
        while pending:
            folder = pending.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue  # a concurrent writer renamed it away
            except OSError as exc:
                raise LorlibError(f"library {self.path}: {folder} is unreadable ({_reason(exc)})") from None
            for entry in entries:
                try:
                    mode = entry.stat(follow_symlinks=False).st_mode
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(mode):
                    pending.append(Path(entry.path))
                elif not stat.S_ISREG(mode):
                    what = "a link" if stat.S_ISLNK(mode) else "a special file"
                    rel = Path(entry.path).relative_to(self.path)
                    raise LorlibError(f"library {self.path}: {rel} is {what}; a library holds only plain files")

    @property
    def held_out(self) -> HeldOut:
        """The held-out record: which tasks no expert saw, and where their data is."""
        return HeldOut.from_manifest(self.extra.get("held_out"), self.path)

    def data_source(self, data: str | None = None) -> str:
        """Where a command's rows come from: `data` when given, else the library's held-out data
        (a file kept inside the library is given by its full path), else the embedded data."""
        return data or self.held_out.source(self.path)

    @property
    def problems(self) -> dict[str, str]:
        """Experts whose recorded values cannot be used (a NaN or huge alpha, a rank past the cap,
        from a library written elsewhere or by an older lorlib): name -> why. Such a library still
        opens, so that the expert can be removed (`lorlib remove`, the Library tab)."""
        out = {}
        for e in self.experts:
            alpha, rank = e.alpha, e.rank
            if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
                out[e.name] = f"its lora_alpha is {alpha!r}, not a finite number"
            elif abs(alpha) > MAX_ALPHA:
                out[e.name] = f"its lora_alpha {alpha:g} is beyond {MAX_ALPHA:g}"
            elif not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank():
                out[e.name] = f"its rank {rank!r} is not between 1 and {max_rank()}"
        return out

    @classmethod
    def create(cls, path: str | Path, base: BaseModelInfo) -> Library:
        path = Path(path)
        if (path / MANIFEST).exists():
            raise LorlibError(f"a library already exists at {path}")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise LorlibError(f"cannot create a library at {path}: it exists and is not an empty folder")
        path.mkdir(parents=True, exist_ok=True)
        library = cls(path, {"base_model": base.name, "base_shapes": base.linear_shapes, "experts": []})
        (path / ".lock").touch()  # so that a later refused write changes no file
        library.save_manifest()
        return library

    # ---- reading ---------------------------------------------------------------------------
    @property
    def base_fingerprint(self) -> str:
        return shapes_fingerprint(self.base_shapes)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def groups(self) -> dict[str, list[str]]:
        """Expert names by kind (private, cluster, shared, imported), and under "general" every
        expert of kind general or marked general: what a router can be limited to."""
        groups = {kind: [e.name for e in self.experts if e.kind == kind] for kind in KINDS}
        groups["general"] = [e.name for e in self.experts if e.general]
        return groups

    def expert(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        known = ", ".join(self.names) or "none"
        raise LorlibError(f"unknown expert {name!r} in library {self.path} (experts: {known})")

    def load_adapter(self, name: str) -> LoraAdapter:
        return read_adapter(self.path / self.expert(name).path, self.base_shapes)

    def check_base(self, base: BaseModelInfo) -> None:
        if base.fingerprint != self.base_fingerprint:
            raise LorlibError(
                f"base model {base.name!r} does not fit library {self.path}, which was built on "
                f"{self.base_model!r} (linear layer shapes differ)"
            )

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "base_shapes": {k: list(v) for k, v in self.base_shapes.items()},
            "experts": [asdict(e) for e in self.experts],
            "clusters": self.clusters,
            **self.extra,
        }

    # ---- writing ---------------------------------------------------------------------------
    @contextmanager
    def _write_lock(self):
        with open(self.path / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def save_manifest(self) -> None:
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest(), indent=1))

    def add_experts(self, entries: list[tuple[Expert, LoraAdapter]], force: bool = False) -> list[Expert]:
        """Add experts (or replace them, with force) in one atomic step: all or none.

        Each entry's adapter must already be checked. Returns the stored manifest entries.
        """
        names = [e.name for e, _ in entries]
        if len(set(names)) != len(names):
            raise LorlibError(f"duplicate expert names in one import: {', '.join(names)}")
        for expert, adapter in entries:
            check_name(expert.name)
            adapter.check_fits(self.base_shapes, f"expert {expert.name}")
            if expert.kind not in KINDS:
                raise LorlibError(f"expert kind must be one of {', '.join(KINDS)}, not {expert.kind!r}")
        with self._write_lock():
            current = Library.open(self.path)  # another writer may have changed the library
            existing = set(current.names)
            marked = {e.name for e in current.experts if e.general}
            clash = [n for n in names if n in existing]
            if clash and not force:
                raise LorlibError(
                    f"library {self.path} already has an expert named {clash[0]!r} (use --force to replace it)"
                )
            staging = self.path / ".staging"
            stored, placed = [], []
            try:
                staging.mkdir(exist_ok=True)
                for expert, adapter in entries:
                    folder = staging / uuid.uuid4().hex
                    write_adapter(folder, adapter, adapter.stored_config(current.base_model))
                    fsync_tree(folder)
                    final = _free_folder(self.path / "experts", expert.name, current)
                    final.parent.mkdir(exist_ok=True)
                    folder.rename(final)
                    placed.append(final)
                    expert.path = str(final.relative_to(self.path))
                    expert.general = expert.general or expert.name in marked  # a mark stays with the name
                    expert.weights_hash = weights_hash(final)
                    expert.created = expert.created or datetime.now(UTC).isoformat(timespec="seconds")
                    stored.append(expert)
                kept = [e for e in current.experts if e.name not in names]
                current.experts = kept + stored
                current.save_manifest()
            except (OSError, SafetensorError) as exc:  # a full disk, say: undo what this call wrote
                for folder in [staging, *placed]:
                    shutil.rmtree(folder, ignore_errors=True)
                raise _write_error(self.path, exc) from None
            current._sweep()
            self.__dict__.update(current.__dict__)
        self.prototypes()  # computes and caches the new experts' prototypes
        return stored

    @contextmanager
    def edit(self):
        """Change the manifest in one atomic step: yields the library as it is on disk now (under
        the write lock), saves it when the block ends without an error, and updates `self`."""
        with self._write_lock():
            current = Library.open(self.path)
            yield current
            try:
                current.save_manifest()
            except OSError as exc:
                raise _write_error(self.path, exc) from None
            current._sweep()
            self.__dict__.update(current.__dict__)

    def record_history(self, command: str, seconds: float) -> None:
        """Append a finished command (build, cluster, evaluate) to the manifest's `history`."""
        with self.edit() as current:
            current.extra.setdefault("history", []).append(
                {
                    "command": command,
                    "seconds": round(seconds, 1),
                    "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )

    def mark_general(self, names: list[str], general: bool = True) -> None:
        """Mark experts general (or, with general=False, unmark them) in one atomic step; an
        unknown name, or unmarking an expert of kind general, changes nothing."""
        with self.edit() as current:
            for name in names:
                expert = current.expert(name)
                if not general and expert.kind == "general":
                    raise LorlibError(f"expert {name} is of kind general: it stays general (import it as another kind)")
                expert.general = general

    def remove_expert(self, name: str) -> None:
        self.expert(name)
        with self.edit() as current:
            current.experts = [e for e in current.experts if e.name != name]

    def _sweep(self) -> None:
        """Delete what the manifest no longer names: staging leftovers, replaced experts, and the
        temporary files of writes that a killed process left (all under the write lock). Only
        names this library writes itself are deleted: never a pattern taken from the manifest."""
        shutil.rmtree(self.path / ".staging", ignore_errors=True)
        written = {MANIFEST, *CACHES, *(f"{key}.json" for key in self.extra.get("side_files", {}))}
        _sweep_temporaries(self.path, written)
        for e in self.experts:  # key-set writes a killed process left inside an expert's folder
            _sweep_temporaries(self.path / e.path, {f"{kind}.safetensors" for kind in KEY_SETS})
        if (routers := self.path / ROUTERS_FOLDER).is_dir():  # replaced learned routers, and temporaries
            named = {str(entry.get("file", "")) for entry in (self.extra.get(LEARNED_ROUTERS) or {}).values()}
            for child in routers.iterdir():
                if f"{ROUTERS_FOLDER}/{child.name}" not in named and not child.is_dir():
                    child.unlink(missing_ok=True)
        referenced = {PurePosixPath(e.path).name for e in self.experts}
        experts_dir = self.path / "experts"
        if experts_dir.is_dir() and not experts_dir.is_symlink():
            for child in experts_dir.iterdir():
                if child.name not in referenced:
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)

    # ---- side files ------------------------------------------------------------------------
    def read_side_file(self, key: str) -> dict | None:
        """The JSON side file the manifest names under `key`, or None when there is none or it is
        unreadable (side files hold analyses that can be computed again)."""
        entry = self.extra.get("side_files", {}).get(key)
        if entry is None:
            return None
        try:
            return json.loads(read_regular(self.path / entry["file"], MAX_SIDE_FILE).decode("utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def update_side_file(self, key: str, update: Callable[[dict | None, Library], tuple[dict, dict]]) -> None:
        """Rewrite LIBRARY/<key>.json atomically under the write lock: `update(stored, library)`
        gets what is stored now (None if nothing) and the library as it is on disk, and returns
        the new contents and a summary of them (a few fields) for the manifest, which names the file."""
        check_name(key)
        name = f"{key}.json"
        with self.edit() as current:
            data, summary = update(current.read_side_file(key), current)
            try:
                atomic_write_text(current.path / name, json.dumps(data, separators=(",", ":")))
            except OSError as exc:
                raise _write_error(self.path, exc) from None
            updated = datetime.now(UTC).isoformat(timespec="seconds")
            current.extra.setdefault("side_files", {})[key] = {"file": name, "updated": updated, **summary}

    # ---- routing keys stored next to the experts ----------------------------------------------
    def _key_file(self, expert: Expert, kind: str) -> Path:
        if kind not in KEY_SETS:
            raise ValueError(f"unknown key set {kind!r}")
        return self.path / expert.path / f"{kind}.safetensors"

    def keys_info(self, kind: str) -> dict[str, dict]:
        """Expert name -> how its `kind` keys were computed, for the experts that have them for
        their current weights (only the files' headers are read)."""
        out = {}
        for e in self.experts:
            path = self._key_file(e, kind)
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

    def lacking_keys(self, kind: str, names: list[str] | None = None) -> list[str]:
        """The experts among `names` (default: all) without `kind` keys for their current weights."""
        have = self.keys_info(kind)
        return [n for n in (self.names if names is None else names) if n not in have]

    def lacks_for(self, router) -> str | None:
        """Why `router` cannot run on this library (the key set it needs is missing for some of
        the experts it would use), in one line; None when it can."""
        if (problem := router.missing(self)) is not None:  # what it stores in the library (a learned router)
            return problem
        kind = router.needs
        if kind not in KEY_SETS:
            return None
        used = self.names if router.subset is None else [self.names[i] for i in router.subset]
        lacking = self.lacking_keys(kind, used)
        if not lacking:
            return None
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        return (
            f"router {router.describe()} needs {kind} for every expert it uses, and {shown} "
            f"{'has' if len(lacking) == 1 else 'have'} none; compute them with `lorlib {kind} {self.path}`"
        )

    def read_keys(self, kind: str) -> dict[str, dict[str, torch.Tensor]]:
        """Expert name -> module -> key vector (d_in,), for the experts that have `kind` keys."""
        out = {}
        for name in self.keys_info(kind):
            try:
                out[name] = load(read_regular(self._key_file(self.expert(name), kind)))
            except (SafetensorError, OSError):
                continue
        return out

    def write_keys(self, name: str, kind: str, keys: dict[str, torch.Tensor], info: dict, weights_hash: str) -> None:
        """Store one expert's `kind` keys (module -> (d_in,)) computed for the weights with hash
        `weights_hash`, atomically, next to its adapter. Refused if the expert has changed since."""
        with self._write_lock():
            current = Library.open(self.path)
            expert = current.expert(name)
            if expert.weights_hash != weights_hash:
                raise LorlibError(f"expert {name} changed while its {kind} were computed; run again")
            path = current._key_file(expert, kind)
            tmp = temporary_name(path)
            tensors = {m: v.detach().float().contiguous().cpu() for m, v in keys.items()}
            try:
                save_tensors(tensors, tmp, metadata={"weights_hash": weights_hash, "info": json.dumps(info)})
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
                fsync_dir(path.parent)
            except (OSError, SafetensorError) as exc:
                tmp.unlink(missing_ok=True)
                raise _write_error(self.path, exc) from None

    # ---- Arrow prototypes cache --------------------------------------------------------------
    def prototypes(self) -> dict[str, dict[str, torch.Tensor]]:
        """expert name -> module -> prototype (d_in,), from the cache where the weights are unchanged."""
        by_hash: dict[str, dict[str, torch.Tensor]] = {}
        for module, (hashes, stack) in self._read_prototype_cache().items():
            for digest, prototype in zip(hashes, stack.unbind()):
                by_hash.setdefault(digest, {})[module] = prototype
        out, missing = {}, False
        for e in self.experts:
            if e.weights_hash in by_hash:
                out[e.name] = by_hash[e.weights_hash]
            else:
                out[e.name] = prototypes_for_adapter(self.load_adapter(e.name).factors)
                missing = True
        if missing:  # a read-only library still routes; its prototypes are just computed again next time
            self._write_prototype_cache(out)
        return out

    def prototype_matrices(self) -> dict[str, torch.Tensor]:
        """module -> (experts, d_in): row e is the prototype of expert e in the manifest's order,
        zeros where it does not adapt the module. Rows are picked from the cache's stacks at once
        (a tensor per expert and module costs a second at 1024 experts); what the cache lacks is
        computed (and cached) first."""
        stacks = self._read_prototype_cache()
        cached = {digest for hashes, _ in stacks.values() for digest in hashes}
        if any(e.weights_hash not in cached for e in self.experts):
            stacks = _stacked_prototypes(self.prototypes(), {e.name: e.weights_hash for e in self.experts})
        out = {}
        for module, (hashes, stack) in stacks.items():
            row = {digest: i for i, digest in enumerate(hashes)}
            padded = torch.cat([stack.float(), stack.new_zeros(1, stack.shape[1], dtype=torch.float32)])
            out[module] = padded[[row.get(e.weights_hash, len(hashes)) for e in self.experts]]
        return out

    def _read_prototype_cache(self) -> dict[str, tuple[list[str], torch.Tensor]]:
        """module -> (weights hash of each row, (rows, d_in) prototypes). One tensor per module
        however many experts there are; the hashes are in the file's metadata."""
        stacks, metadata = self.read_cache(PROTOTYPES) or ({}, {})
        try:
            rows = json.loads(metadata.get("rows", "{}"))
            if any(len(hashes) != len(stacks[module]) for module, hashes in rows.items()):
                raise ValueError("rows and hashes differ")
        except (ValueError, KeyError, TypeError):
            return {}  # a damaged (or older) cache is only a cache: recompute
        return {module: (hashes, stacks[module]) for module, hashes in rows.items()}

    def _write_prototype_cache(self, protos: dict[str, dict[str, torch.Tensor]]) -> None:
        stacks = _stacked_prototypes(protos, {e.name: e.weights_hash for e in self.experts})
        rows = {module: hashes for module, (hashes, _) in stacks.items()}
        self.write_cache(
            PROTOTYPES, {module: stack for module, (_, stack) in stacks.items()}, {"rows": json.dumps(rows)}
        )

    # ---- caches ----------------------------------------------------------------------------
    def read_cache(self, file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The tensors and metadata of one of the library's CACHES, or None where it is missing or
        unreadable: a cache is only ever computed again, never trusted over the experts."""
        path = self.path / file
        if file not in CACHES or not path.is_file():
            return None
        try:
            return read_safetensors(path, f"the cache {file}")
        except LorlibError:
            return None

    def write_cache(self, file: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Replace one of the library's CACHES whole, atomically, under the write lock. Where it
        cannot be written (a read-only library, a full disk) nothing is: it is computed again
        next time."""
        if file not in CACHES:
            raise ValueError(f"{file} is not one of the library's caches")
        tmp = temporary_name(self.path / file)
        try:
            with self._write_lock():
                save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path / file)
                fsync_dir(self.path)
        except (OSError, SafetensorError):
            tmp.unlink(missing_ok=True)


def _stacked_prototypes(
    protos: dict[str, dict[str, torch.Tensor]], hashes: dict[str, str]
) -> dict[str, tuple[list[str], torch.Tensor]]:
    """expert -> module -> prototype as the cache holds them: module -> (weights hash of each
    row, (rows, d_in) float32)."""
    rows: dict[str, list[str]] = {}
    vectors: dict[str, list[torch.Tensor]] = {}
    for name, by_module in protos.items():
        for module, vector in by_module.items():
            rows.setdefault(module, []).append(hashes[name])
            vectors.setdefault(module, []).append(vector.float())
    return {module: (rows[module], torch.stack(parts)) for module, parts in vectors.items()}


_MANIFEST_KEYS = {"format", "version", "base_model", "base_fingerprint", "base_shapes", "experts", "clusters"}


def expert_from_adapter(name: str, adapter: LoraAdapter, base_model: str, kind: str = "imported", **meta) -> Expert:
    """A manifest entry describing `adapter`; path and hash are filled in when it is stored."""
    return Expert(
        name=name,
        kind=kind,
        rank=adapter.rank,
        alpha=float(adapter.config.get("lora_alpha", adapter.config["r"])),
        target_modules=adapter.target_modules,
        base_model=base_model,
        fingerprint=shapes_fingerprint(adapter.shapes),
        weights_hash="",
        path="",
        **meta,
    )


def existing_or_new(path: str | Path, base_model: str | None) -> tuple[Library | None, BaseModelInfo | None]:
    """For a write that creates the library if needed: the library at `path` if there is one,
    and the base model's description when a new library would be made on it or `base_model` is
    named (then checked to fit the existing library). Nothing is written."""
    from lorlib_ui.core.base_model import base_model_info

    path = Path(path)
    library = Library.open(path) if (path / MANIFEST).is_file() else None
    base = base_model_info(base_model) if library is None or base_model else None
    if library is not None and base is not None:
        library.check_base(base)
    return library, base


def import_adapters(
    path: str | Path,
    folders: list[str | Path],
    names: list[str] | None = None,
    base_model: str | None = None,
    kind: str = "imported",
    tasks: list[str] | None = None,
    family: str | None = None,
    force: bool = False,
) -> list[Expert]:
    """Import PEFT LoRA adapter folders into the library at `path`, creating it on `base_model`
    (default: the embedded model) if there is none. Every adapter is read and checked before
    anything is written, so a refused import leaves the library byte-for-byte as it was."""
    if not folders:
        raise LorlibError("no adapter folders to import")
    names = [check_name(n) for n in (names or [Path(d).resolve().name for d in folders])]
    if len(names) != len(folders):
        raise LorlibError("give one name per adapter folder")
    library, base = existing_or_new(path, base_model)
    shapes = library.base_shapes if library else base.linear_shapes
    base_name = library.base_model if library else base.name
    adapters = [read_adapter(d, shapes) for d in folders]  # module names checked before any pattern
    entries = [
        (expert_from_adapter(n, a, base_name, kind=kind, tasks=list(tasks or [n]), family=family), a)
        for n, a in zip(names, adapters)
    ]
    library = library or Library.create(path, base)
    return library.add_experts(entries, force=force)


def _sweep_temporaries(folder: Path, written: set[str]) -> None:
    """Delete the leftover temporary files (`atomic.temporary_name`) of the names in `written`."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for child in folder.iterdir():
        match = _TEMPORARY.fullmatch(child.name)
        if match and match["name"] in written and not child.is_symlink() and child.is_file():
            child.unlink(missing_ok=True)


def _free_folder(experts_dir: Path, name: str, library: Library) -> Path:
    """experts/<name>, or a fresh sibling when that folder is in use (the expert being replaced
    stays in place until the new manifest no longer names it)."""
    used = {(library.path / e.path).resolve() for e in library.experts}
    candidate = experts_dir / name
    if candidate.resolve() not in used and not candidate.exists():
        return candidate
    return experts_dir / f"{name}.{uuid.uuid4().hex[:8]}"


def _write_error(path: Path, exc: Exception) -> LorlibError:
    reason = getattr(exc, "strerror", None) or str(exc)  # safetensors' errors carry only a message
    return LorlibError(f"library {path}: could not write ({reason}); the library is unchanged")
