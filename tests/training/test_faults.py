"""Faults: a process killed (SIGKILL) while training or while writing the manifest, a full disk.

After each, the library opens with every expert that had finished, each one whole, and the next
write carries on from there.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_library, library_snapshot, run

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.core.library import Library, import_adapters

ROOT = Path(__file__).resolve().parents[2]


def _whole(path) -> list[str]:
    """The library's experts, after checking that it opens and that every expert loads."""
    library = Library.open(path)
    for name in library.names:
        assert library.load_adapter(name).factors
    return sorted(library.names)


def test_killed_while_training_keeps_every_finished_expert(tmp_path, tiny_base, tasks_file, capsys):
    path = tmp_path / "lib"
    argv = ["build", path, "--data", tasks_file, "--base-model", tiny_base, "--no-shared"]
    argv += ["--steps", "300", "--batch-size", "2", "--rank", "2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "lorlib_ui", *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 240
        while not ((path / "manifest.json").exists() and Library.open(path).names):  # one expert stored
            assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        time.sleep(0.3)  # into the next expert's training
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = _whole(path)
    assert 1 <= len(finished) < 6
    code, out, err = run(capsys, *argv[:-6], "--steps", "2", "--batch-size", "2", "--rank", "2")
    assert code == 0, err
    assert f"skipped {len(finished)} already there" in out  # the same build resumes
    assert len(_whole(path)) == 6


WRITER = """
import os, sys, time
import lorlib_ui.core.atomic as atomic_module
from lorlib_ui.core.library import import_adapters

real_open = open

class Stalling:  # writes half of the new manifest, says so, then waits to be killed
    def __init__(self, handle):
        self.handle = handle
    def write(self, text):
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        print("half written", flush=True)
        time.sleep(600)
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

def stalling_open(file, *args, **kwargs):
    handle = real_open(file, *args, **kwargs)
    return Stalling(handle) if os.path.basename(str(file)).startswith(".manifest.json.") else handle

atomic_module.open = stalling_open  # only the atomic writes (of the manifest, here) see it
import_adapters(sys.argv[1], [sys.argv[2]])
"""


def test_killed_while_writing_the_manifest_keeps_the_old_one(tmp_path, tiny_base, tiny_adapters):
    path = tmp_path / "lib"
    build_library(path, tiny_base, tiny_adapters[:2])
    before = Library.open(path).manifest()
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(tiny_adapters[2])], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "half written"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert list(path.glob(".manifest.json.*"))  # the half-written new manifest is there, unused
    assert Library.open(path).manifest() == before and _whole(path) == ["task0", "task1"]
    import_adapters(path, [tiny_adapters[3]])  # the next write goes on and clears the leftovers
    assert _whole(path) == ["task0", "task1", "task3"]
    assert not list(path.glob(".manifest.json.*")) and not (path / ".staging").exists()
    assert sorted(p.name for p in (path / "experts").iterdir()) == ["task0", "task1", "task3"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), to fill up; needs the right to mount (root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of `folder` until about `leave` bytes are free."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        while (free := os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize) > leave:
            handle.write(bytes(min(free - leave, 1 << 16)))
            handle.flush()
    return filler


@pytest.mark.parametrize("leave", [0, 8192], ids=["no room at all", "room for part of the weights"])
def test_a_full_disk_during_a_save_changes_nothing(small_disk, tiny_base, tiny_adapters, leave, capsys):
    path = small_disk / "lib"
    build_library(path, tiny_base, tiny_adapters[:2])
    Library.open(path).record_history("setup", 0.0)  # the library has been written to before
    filler = _fill(small_disk, leave)
    before = library_snapshot(path)
    code, _, err = run(capsys, "import-peft", path, tiny_adapters[2])
    assert code == 1 and err.count("\n") == 1
    assert re.search(r"could not write \(.*No space left on device.*\); the library is unchanged", err), err
    if leave == 0:
        with pytest.raises(LorlibError, match="No space left on device"):
            Library.open(path).record_history("one more", 1.0)  # a manifest-only write
    assert library_snapshot(path) == before and _whole(path) == ["task0", "task1"]
    filler.unlink()  # room again: the same import now succeeds
    import_adapters(path, [tiny_adapters[2]])
    assert _whole(path) == ["task0", "task1", "task2"]
    assert json.loads((path / "manifest.json").read_text())["experts"][-1]["name"] == "task2"
