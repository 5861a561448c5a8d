"""A hub repo laid out as huggingface_hub's own cache holds it, for tests with no network.

    HF_HUB_CACHE/models--owner--repo/
      refs/<revision>                  the commit the revision points at
      blobs/<sha256>                   each file's bytes once
      snapshots/<commit>/<path>        a relative link into blobs/, per file

With `HF_HUB_OFFLINE=1`, huggingface_hub's real download functions find these files and return
them exactly as they would after a download; nothing of huggingface_hub is replaced.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def publish(cache: Path, repo: str, files: dict[str, bytes] | Path, revision: str = "main") -> str:
    """Lay out `files` (relative path -> bytes, or every file under a folder) as one commit of
    `repo` in the cache, pointed at by `revision`; returns the commit hash."""
    if isinstance(files, Path):
        files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
    root = cache / f"models--{repo.replace('/', '--')}"
    digest = hashlib.sha1(repo.encode())
    for path in sorted(files):
        digest.update(path.encode() + hashlib.sha256(files[path]).digest())
    commit = digest.hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for path, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs" / revision).write_text(commit)
    return commit
