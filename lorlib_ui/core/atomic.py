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
