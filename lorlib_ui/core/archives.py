"""Zip archives in and out of a library: uploaded adapters, downloaded experts and libraries.

Uploads come from anywhere, so extraction trusts nothing in the archive: every member must be a
plain file or folder whose path stays inside the destination (no absolute paths, no '..', no
symlinks or other special files), and the archive may not unpack to more than `max_bytes`.
Nothing is unpickled: the adapters found are read later by `adapters.read_adapter`, which
accepts safetensors only.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

from lorlib_ui.core.errors import LorlibError

MAX_UNPACKED = 512 * 2**20  # 512 MiB: far above any LoRA library of this tool's scale
MAX_MEMBERS = 10_000


def safe_extract(archive: str | Path, dest: str | Path, max_bytes: int = MAX_UNPACKED) -> Path:
    """Unpack a zip into `dest` (which must be empty or absent) after checking every member."""
    archive, dest = Path(archive), Path(dest)
    name = archive.name
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > MAX_MEMBERS:
                raise LorlibError(f"{name}: more than {MAX_MEMBERS} entries")
            total = 0
            for m in members:
                path = PurePosixPath(m.filename.replace("\\", "/"))
                if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
                    raise LorlibError(f"{name}: entry {m.filename!r} would unpack outside its folder")
                kind = stat.S_IFMT(m.external_attr >> 16)  # 0 when the archiver recorded no file type
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise LorlibError(f"{name}: entry {m.filename!r} is a link or special file")
                total += m.file_size
                if total > max_bytes:
                    raise LorlibError(f"{name}: unpacks to more than {max_bytes // 2**20} MiB")
            dest.mkdir(parents=True, exist_ok=True)
            written = 0
            for m in members:
                target = dest / PurePosixPath(m.filename.replace("\\", "/"))
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):  # count what really comes out: headers can lie
                        written += len(chunk)
                        if written > max_bytes:
                            raise LorlibError(f"{name}: unpacks to more than {max_bytes // 2**20} MiB")
                        out.write(chunk)
    except zipfile.BadZipFile:
        raise LorlibError(f"{name}: not a zip archive") from None
    except (OSError, RuntimeError, NotImplementedError) as exc:  # encrypted, unsupported compression, disk
        raise LorlibError(f"{name}: cannot unpack ({exc})") from None
    return dest


def adapter_folders(root: str | Path) -> list[Path]:
    """Folders under `root` holding an adapter_config.json (the root itself included), sorted."""
    root = Path(root)
    found = sorted({p.parent for p in root.rglob("adapter_config.json") if p.is_file()})
    if not found:
        raise LorlibError("no PEFT adapter (adapter_config.json) in the archive")
    return found


def zip_folder(folder: str | Path, archive: str | Path) -> Path:
    """Zip a folder (an expert or a whole library); hidden files (locks, staging) stay out."""
    folder, archive = Path(folder), Path(archive)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file() or path.is_symlink():
                continue
            zf.write(path, str(PurePosixPath(folder.name, *rel.parts)))
    return archive
