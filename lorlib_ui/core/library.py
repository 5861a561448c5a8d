"""A library of LoRA experts over one base model, stored as a folder.

    LIBRARY/
      manifest.json               base model, its linear shapes, experts, clusters
      experts/<name>/             one standard PEFT adapter folder per expert
      ...                         data computed from the experts (prototypes, the MBC Gram matrix,
                                  gates, transfer, learned routers), each keyed by the weights
                                  hashes it was computed from: see `lorlib_ui.core.derived`

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
import tempfile
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError

from lorlib_ui.core.adapters import (
    LoraAdapter,
    read_adapter,
    read_regular,
    weights_hash,
    write_adapter,
)
from lorlib_ui.core.atomic import atomic_write_text, fsync_tree
from lorlib_ui.core.base_model import BaseModelInfo, shapes_fingerprint
from lorlib_ui.core.derived import Derived, sweep_temporaries
from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.hub import SNAPSHOT_MARK, HubLibrary, HubSource, fetch_adapters, hub_source, library_snapshot
from lorlib_ui.core.limits import MAX_ALPHA, max_rank
from lorlib_ui.core.prototypes import cache_prototypes

MANIFEST = "manifest.json"
FORMAT = "lorlib-library"
VERSION = 1
# lorahub: a few-shot merge of experts; adapted: trained on a few examples of a new task (`adapt`)
KINDS = ("private", "cluster", "shared", "imported", "general", "lorahub", "adapted")
TASK_KINDS = ("private", "imported")  # experts of one task each: what MBC clusters
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,159}")  # a folder or file name the library writes


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
    source: dict = field(default_factory=dict)  # imported from the hub: repo, subfolder, revision, commit

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
        self.snapshot_of: str | None = None  # hf://owner/repo@commit for a hub library's read-only snapshot

    # ---- opening and creating -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Library:
        """Open the library at `path`, checking its manifest whole (it is untrusted input: a library
        may come from anywhere) and its tree: a one-line error on anything that could make lorlib
        read, write or delete outside the library."""
        if (ref := HubLibrary.parse(str(path))) is not None:
            path = library_snapshot(ref)  # read-only, in lorlib's cache
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
        if (path / SNAPSHOT_MARK).is_file():
            library.snapshot_of = read_regular(path / SNAPSHOT_MARK, 1024).decode("utf-8", "replace").strip()
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
        """The files the manifest names beside the experts are those its derived data writes."""
        if (problem := self.derived.problem()) is not None:
            raise LorlibError(f"library {self.path}: {problem}")

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
        if HubLibrary.parse(str(path)) is not None:
            raise LorlibError(f"{path} is on the hub: make the library in a folder, then `lorlib push` it")
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
        if self.snapshot_of is not None:
            raise LorlibError(
                f"library {self.snapshot_of} is a read-only snapshot from the hub; "
                f"`lorlib pull {self.snapshot_of} DIR` makes a copy you can change"
            )
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
        cache_prototypes(self)  # the new experts' prototypes, so that the first route computes nothing
        return stored

    @contextmanager
    def locked(self):
        """The library as it is on disk now, under the write lock, for a write beside the
        manifest (derived data) that must not race a change of the experts."""
        with self._write_lock():
            yield Library.open(self.path)

    @property
    def derived(self) -> Derived:
        """What is kept computed from the experts (prototypes, gates, analyses, learned routers)."""
        return Derived(self)

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
        sweep_temporaries(self.path, {MANIFEST})
        self.derived.sweep()
        referenced = {PurePosixPath(e.path).name for e in self.experts}
        experts_dir = self.path / "experts"
        if experts_dir.is_dir() and not experts_dir.is_symlink():
            for child in experts_dir.iterdir():
                if child.name not in referenced:
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)


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

    hub = HubLibrary.parse(str(path)) is not None  # opened to say that it cannot be written
    library = Library.open(path) if hub or (Path(path) / MANIFEST).is_file() else None
    base = base_model_info(base_model) if library is None or base_model else None
    if library is not None and base is not None:
        library.check_base(base)
    return library, base


def import_adapters(
    path: str | Path,
    sources: list[str | Path | HubSource],
    names: list[str] | None = None,
    base_model: str | None = None,
    kind: str = "imported",
    tasks: list[str] | None = None,
    family: str | None = None,
    force: bool = False,
    fetched: Callable[[int, int], None] | None = None,
) -> list[Expert]:
    """Import PEFT LoRA adapters into the library at `path`, creating it on `base_model` (default:
    the embedded model) if there is none. A source is a local adapter folder or a hub id
    (`owner/repo[:subfolder][@revision]`, or a `HubSource`: never a local folder), fetched first, in parallel, with
    `fetched(done, total)` after each. Every adapter is read and checked before anything is
    written, so a refused import leaves the library byte-for-byte as it was."""
    if not sources:
        raise LorlibError("no adapter folders to import")
    hub = {
        i: source
        for i, given in enumerate(sources)
        if (source := given if isinstance(given, HubSource) else hub_source(str(given))) is not None
    }
    names = [check_name(n) for n in (names or [default_name(s, hub.get(i)) for i, s in enumerate(sources)])]
    if len(names) != len(sources):
        raise LorlibError("give one name per adapter folder")
    library, base = existing_or_new(path, base_model)
    shapes = library.base_shapes if library else base.linear_shapes
    base_name = library.base_model if library else base.name
    with tempfile.TemporaryDirectory(prefix="lorlib-hub-") as tmp:
        folders, provenance = list(sources), [{} for _ in sources]
        for i, got in zip(hub, fetch_adapters(list(hub.values()), Path(tmp), fetched)):
            folders[i], provenance[i] = got.folder, got.provenance()
        adapters = []
        for i, folder in enumerate(folders):  # module names checked before any pattern
            try:
                adapters.append(read_adapter(folder, shapes))
            except LorlibError as exc:
                raise (LorlibError(f"hub adapter {hub[i]}: {exc}") if i in hub else exc) from None
    entries = [
        (expert_from_adapter(n, a, base_name, kind=kind, tasks=list(tasks or [n]), family=family, source=p), a)
        for n, a, p in zip(names, adapters, provenance)
    ]
    library = library or Library.create(path, base)
    return library.add_experts(entries, force=force)


def default_name(source: str | Path, hub: HubSource | None) -> str:
    """An expert's name when none is given: its folder's name, or the hub repo's (or subfolder's)."""
    if hub is not None:
        return (hub.subfolder or hub.repo).rsplit("/", 1)[-1]
    return Path(source).resolve().name


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
