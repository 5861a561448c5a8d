"""The Hugging Face Hub, reached only when a command names it.

A hub source is `owner/repo`, optionally `:subfolder` (an adapter inside a bigger repo) and
`@revision` (a branch, tag or commit). Fetching goes through huggingface_hub's own cache
(`snapshot_download`, so `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and the token in its usual places all
apply; lorlib never reads, stores or prints the token) and asks only for the files a LoRA needs:
`adapter_config.json` and `adapter_model.safetensors`. Never a `.bin` or any other pickle: a repo
that has only those is refused.

A whole library published by lorlib (`lorlib push`) is `hf://owner/repo[@revision]`. Opening one
fetches only the files a library holds (JSON, safetensors, cards, tabular data: never a pickle)
and keeps a read-only snapshot of it, one folder per commit, in lorlib's cache; `lorlib pull`
copies one into a library folder of your own.

The hub cache keeps a snapshot as links into its blob store, and lorlib reads nothing through a
link (`adapters.read_regular`), so what is fetched is copied, links resolved, into plain files,
after checking that each link lands inside that repo's own cache. Every hub failure (offline, no
such repo or revision, gated, refused) is one line that names the source.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lorlib_ui.core.adapters import CONFIG_FILE, WEIGHTS_FILE
from lorlib_ui.core.cache import cache_dir
from lorlib_ui.core.errors import LorlibError

_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
HUB_ID = re.compile(
    rf"(?P<repo>{_PART}/{_PART})(?::(?P<subfolder>[A-Za-z0-9_.+/-]{{1,300}}))?(?:@(?P<revision>[A-Za-z0-9_./-]{{1,200}}))?"
)
FETCH_WORKERS = 8  # downloads in flight at once: small files, so latency bound
SCHEME = "hf://"
RESOLVED_S = 60.0  # how long a hub library's revision, once resolved, is taken as it was
_resolved: dict = {}  # HubLibrary -> (when, snapshot folder)
_resolved_lock = threading.Lock()
SNAPSHOT_MARK = ".hub-snapshot"  # in a snapshot's folder: the hf:// reference it holds
# What a library's repo may give: its manifest and side files, weights, cards and held-out data.
LIBRARY_FILES = ["*.json", "*.safetensors", "*.md", "*.jsonl", "*.jsonl.gz", "*.csv", "*.csv.gz", "*.parquet"]


@dataclass(frozen=True)
class HubSource:
    """An adapter on the hub: a repo, the folder inside it, and the revision asked for."""

    repo: str
    subfolder: str = ""
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubSource | None:
        """The hub source `text` names, or None when it is not one (a local folder, say)."""
        match = HUB_ID.fullmatch(text)
        if match is None or ".." in text.split("@")[0].split("/") or "//" in text:
            return None
        subfolder = (match["subfolder"] or "").strip("/")
        if any(part in ("", ".", "..") for part in subfolder.split("/")) and subfolder:
            return None
        return cls(match["repo"], subfolder, match["revision"])

    def __str__(self) -> str:
        return (
            self.repo
            + (f":{self.subfolder}" if self.subfolder else "")
            + (f"@{self.revision}" if self.revision else "")
        )

    def files(self) -> list[str]:
        return [f"{self.subfolder}/{name}" if self.subfolder else name for name in (CONFIG_FILE, WEIGHTS_FILE)]


@dataclass(frozen=True)
class Fetched:
    """An adapter fetched from the hub into a private folder of plain files."""

    folder: Path
    source: HubSource
    commit: str  # the commit the revision resolved to

    def provenance(self) -> dict:
        """What the manifest records of where the expert came from."""
        return {
            "hub": self.source.repo,
            "subfolder": self.source.subfolder,
            "revision": self.source.revision or "main",
            "commit": self.commit,
        }


def hub_source(text: str) -> HubSource | None:
    """The hub source an import names, or None for a local folder: a path that exists is always
    the local folder, even where it also reads as owner/repo."""
    return None if os.path.exists(text) else HubSource.parse(text)


def fetch_adapter(source: HubSource, into: Path) -> Fetched:
    """Download (or find in the hub cache) one adapter's two files, and copy them into `into`."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source.repo, revision=source.revision, allow_patterns=source.files()))
    except Exception as exc:  # huggingface_hub's errors, and those of the HTTP client under it
        raise hub_error(exc, f"hub adapter {source}") from None
    repo_cache = snapshot.parent.parent.resolve()
    into.mkdir(parents=True, exist_ok=True)
    for relative, name in zip(source.files(), (CONFIG_FILE, WEIGHTS_FILE)):
        found = snapshot / relative
        real = found.resolve() if found.exists() else None
        if real is None or not real.is_file():
            extra = "" if name == CONFIG_FILE else " (lorlib loads weights only from safetensors, never .bin pickles)"
            raise LorlibError(f"hub adapter {source}: the repo has no {name} there{extra}")
        if not real.is_relative_to(repo_cache):
            raise LorlibError(f"hub adapter {source}: its cached {name} leads outside the hub cache")
        shutil.copyfile(real, into / name)
    return Fetched(into, source, snapshot.name)


def fetch_adapters(
    sources: list[HubSource], into: Path, done: Callable[[int, int], None] | None = None
) -> list[Fetched]:
    """Fetch many adapters in parallel, each into its own folder under `into`, in order;
    `done(count, total)` after each. The first failure is raised once the others have stopped."""
    if not sources:
        return []
    folders = [into / f"{i:05d}" for i in range(len(sources))]
    finished = itertools.count(1)

    def one(pair):
        fetched = fetch_adapter(*pair)
        if done is not None:
            done(next(finished), len(sources))
        return fetched

    with ThreadPoolExecutor(max_workers=min(FETCH_WORKERS, max(len(sources), 1))) as pool:
        return list(pool.map(one, zip(sources, folders)))


@dataclass(frozen=True)
class HubLibrary:
    """A library on the hub: `hf://owner/repo`, optionally `@revision`."""

    repo: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubLibrary | None:
        """The hub library `text` names, or None when it does not start with hf://; one line
        when it does but names no repo."""
        if not str(text).startswith(SCHEME):
            return None
        source = HubSource.parse(str(text)[len(SCHEME) :])
        if source is None or source.subfolder:
            raise LorlibError(f"{text!r} is not a hub library: write hf://owner/repo, or hf://owner/repo@revision")
        return cls(source.repo, source.revision)

    def __str__(self) -> str:
        return SCHEME + self.repo + (f"@{self.revision}" if self.revision else "")


def library_snapshot(ref: HubLibrary) -> Path:
    """A read-only folder of plain files holding the library `ref` names at the commit its
    revision resolves to (fetched through the hub cache; kept in lorlib's cache by commit, so
    it is fetched and copied once). Its SNAPSHOT_MARK names the reference, with the commit. A
    reference resolved in the last RESOLVED_S seconds is not asked of the hub again: an app
    serving a hub library opens it on every request."""
    with _resolved_lock:
        seen = _resolved.get(ref)
    if seen is not None and time.monotonic() - seen[0] < RESOLVED_S and (seen[1] / SNAPSHOT_MARK).is_file():
        return seen[1]
    folder = _snapshot(ref)
    with _resolved_lock:
        _resolved[ref] = (time.monotonic(), folder)
    return folder


def _snapshot(ref: HubLibrary) -> Path:
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=LIBRARY_FILES))
    except Exception as exc:  # huggingface_hub's errors, and those of the HTTP client under it
        raise hub_error(exc, f"hub library {ref}") from None
    if not (snapshot / "manifest.json").exists():
        raise LorlibError(f"hub library {ref}: the repo has no manifest.json, so it is not a lorlib library")
    folder = cache_dir() / "hub" / ref.repo.replace("/", "--") / snapshot.name
    if (folder / SNAPSHOT_MARK).is_file():
        return folder
    repo_cache = snapshot.parent.parent.resolve()
    staging = folder.with_name(f".{snapshot.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for found in sorted(snapshot.rglob("*")):
        if found.is_dir():
            continue
        real, relative = found.resolve(), found.relative_to(snapshot)
        if not real.is_relative_to(repo_cache) or not real.is_file():
            raise LorlibError(f"hub library {ref}: its cached {relative} leads outside the hub cache")
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, target)
    (staging / SNAPSHOT_MARK).write_text(f"{SCHEME}{ref.repo}@{snapshot.name}")
    try:
        staging.rename(folder)  # whole or not at all; another process may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def hub_error(exc: Exception, what: str) -> LorlibError:
    """One line for a failure of the hub (or of reaching it) while fetching `what`."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return LorlibError(f"{what}: the repo is gated; accept its terms on the hub and log in (`hf auth login`)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return LorlibError(f"{what}: no such repo on the hub (or it is private: log in with `hf auth login`)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return LorlibError(f"{what}: the repo has no such revision")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return LorlibError(f"{what}: not in the local hub cache, and the hub cannot be reached (offline)")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return LorlibError(f"{what}: the hub refused the request (HTTP {status})")
    if isinstance(exc, LorlibError):
        return exc
    return LorlibError(f"{what}: the hub cannot be reached ({type(exc).__name__})")
