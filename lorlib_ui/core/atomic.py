"""Atomic writes: a file becomes visible whole or not at all, and survives a crash once written.

Each write goes to a temporary name in the same folder, is flushed to disk, and replaces the
target by one rename (atomic on POSIX); the folder is then synced so the rename itself persists.
Temporary names start with '.' and the target's name, so a library can sweep what a killed
process left behind.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from safetensors.torch import save_file


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, leaving the file readable as any other file this process
    writes: safetensors creates it 0600 whatever the umask, which would hide a library's keys,
    caches and routers from the other users of a shared folder."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """`save_tensors` as an atomic write: whole or not at all, and durable once it returns."""
    tmp = temporary_name(path)
    try:
        save_tensors(tensors, tmp, metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    for child in folder.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
