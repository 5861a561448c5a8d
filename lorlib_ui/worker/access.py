"""What a served app may touch: the libraries it was started with, and nothing else.

The explorer is served to other people (a class on a LAN, a shared lab machine), so every path a
request carries is untrusted. A served worker opens only the library it was started with
(`--library`) and the libraries under its folders of libraries (`--libraries DIR`), never one in
the upload or cache folders, whatever links the path goes through (it is resolved before it is
compared). A library's held-out data must be the embedded data, a file inside the library or
under those folders (or the file the operator's own `--library` names), or a hub dataset id
(which opening never loads). Data files sent with a job must be uploads or files under those
folders. With `read_only`, nothing is written at all. The Hugging Face Hub (a library hf://owner/repo,
adapters by hub id) is reached only where the operator allows it (`hub`: on for an app bound to
this machine alone, else with --allow-hub), since every hub request makes the server download.

The command line, run by a local user on their own files, opens any path: `Access()`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.hub import SCHEME as HUB_SCHEME
from lorlib_ui.core.library import Library

READ_ONLY = "this explorer is read-only: it routes and shows, and changes no library"
NO_HUB = "this explorer does not reach the Hugging Face Hub (its operator can allow it with --allow-hub)"


@dataclass(frozen=True)
class Access:
    served: bool = False  # False: any path (a local user's own command line or tests)
    libraries: tuple[str, ...] = ()  # library folders that may be opened, resolved
    roots: tuple[str, ...] = ()  # folders under which any library may be opened, resolved
    uploads: tuple[str, ...] = ()  # where uploaded files land: data may come from there, libraries never
    read_only: bool = False
    data_files: tuple[str, ...] = ()  # held-out data the operator's own --library names, wherever it is
    hub: bool = True  # may a request reach the Hugging Face Hub (hf:// libraries, hub ids to import)

    @classmethod
    def serving(
        cls,
        libraries: list[str] = (),
        roots: list[str] = (),
        uploads: list[str] = (),
        read_only: bool = False,
        hub: bool = False,
    ) -> Access:
        """What an app started with these folders serves. The held-out data that the operator's
        own libraries (`libraries`) name as they are now is trusted too, wherever it lies: the
        operator chose them (a build in the app keeps its data inside the library)."""

        def resolved(paths) -> tuple[str, ...]:
            return tuple(str(Path(p).expanduser().resolve()) for p in paths if p)

        data = []
        for path in libraries:
            try:
                library = Library.open(path)
            except LorlibError:
                continue  # refused later, with its error, when it is opened
            if library.held_out.kind == "path":
                data.append(library.held_out.data)
        return cls(True, resolved(libraries), resolved(roots), resolved(uploads), read_only, resolved(data), hub)

    def library_path(self, path: str) -> str:
        """The path to open for a library a request names, or a one-line refusal."""
        if not self.served:
            return str(path)
        if not isinstance(path, str) or not path.strip() or "\0" in path:
            raise LorlibError("no library folder given")
        if path.startswith(HUB_SCHEME):  # a snapshot in lorlib's cache, read-only
            self.check_hub()
            return path
        resolved = Path(path).expanduser().resolve()
        allowed = str(resolved) in self.libraries or any(_within(resolved, root) for root in self.roots)
        if not allowed or any(_within(resolved, folder) for folder in self.uploads):
            raise LorlibError(
                f"{path} is not a library this explorer serves: it opens only its --library and the "
                "libraries under its --libraries folders"
            )
        return str(resolved)

    def check_data(self, library: Library) -> None:
        """Refuse a library whose held-out data is a local file outside what this app may read."""
        held = library.held_out
        if not self.served or held.kind in ("default", "hub"):
            return
        path = Path(held.source(library.path))
        resolved = path.resolve()
        inside = _within(resolved, str(library.path.resolve()))
        trusted = str(resolved) in self.data_files or any(_within(resolved, root) for root in self.roots)
        if not (inside or trusted) or not _regular(path):
            raise LorlibError(
                f"library {library.path}: its held-out data {held.data[:100]!r} is not a file in the library "
                "or under the explorer's --libraries folders, so the explorer does not read it"
            )

    def data_file(self, data: str) -> str:
        """A data file sent with a job: an upload, or a file under the library folders."""
        if not self.served or data == "default":
            return data
        path = Path(data).resolve()
        if not any(_within(path, folder) for folder in self.roots + self.uploads) or not _regular(path):
            raise LorlibError("a job's data must be the embedded data or an uploaded file")
        return str(path)

    def check_hub(self) -> None:
        if not self.hub:
            raise LorlibError(NO_HUB)

    def check_writable(self) -> None:
        if self.read_only:
            raise LorlibError(READ_ONLY)


def _within(path: Path, folder: str) -> bool:
    return path == Path(folder) or Path(folder) in path.parents


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
