"""The Hugging Face Hub, reached only when a command names it.

A hub source is `owner/repo`, optionally `:subfolder` (an adapter inside a bigger repo) and
`@revision` (a branch, tag or commit). Fetching goes through huggingface_hub's own cache
(`snapshot_download`, so `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and the token in its usual places all
apply; lorlib never reads, stores or prints the token) and asks only for the files a LoRA needs:
`adapter_config.json` and `adapter_model.safetensors`. Never a `.bin` or any other pickle: a repo
that has only those is refused.

The cache keeps a snapshot as links into its blob store, and lorlib reads nothing through a link
(`adapters.read_regular`), so each fetched adapter is copied, link resolved, into a private
folder after checking that the link lands inside that repo's own cache. Every hub failure
(offline, no such repo or revision, gated, refused) is one line that names the source.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lorlib_ui.core.adapters import CONFIG_FILE, WEIGHTS_FILE
from lorlib_ui.core.errors import LorlibError

_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
HUB_ID = re.compile(
    rf"(?P<repo>{_PART}/{_PART})(?::(?P<subfolder>[A-Za-z0-9_.+/-]{{1,300}}))?(?:@(?P<revision>[A-Za-z0-9_./-]{{1,200}}))?"
)
FETCH_WORKERS = 8  # downloads in flight at once: small files, so latency bound


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
