"""Zip archives: uploads unpack only inside their folder, within a size limit; downloads leave locks out."""

import stat
import zipfile

import pytest

from lorlib_ui.core.archives import adapter_folders, safe_extract, zip_folder
from lorlib_ui.core.errors import LorlibError


def _zip(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_adapter_round_trip(tmp_path, tiny_adapters):
    archive = zip_folder(tiny_adapters[0], tmp_path / "a.zip")
    out = safe_extract(archive, tmp_path / "out")
    assert adapter_folders(out) == [out / tiny_adapters[0].name]
    assert sorted(p.name for p in (out / tiny_adapters[0].name).iterdir()) == sorted(
        p.name for p in tiny_adapters[0].iterdir()
    )


def test_library_zip_leaves_hidden_files_out(tiny_library, tmp_path):
    archive = zip_folder(tiny_library.path, tmp_path / "lib.zip")
    names = zipfile.ZipFile(archive).namelist()
    assert "lib/manifest.json" in names and not [n for n in names if "/." in n]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"../evil.txt": "x"}, "outside its folder"),
        ({"a/../../evil.txt": "x"}, "outside its folder"),
        ({"/etc/evil": "x"}, "outside its folder"),
        ({"C:/evil": "x"}, "outside its folder"),
    ],
)
def test_traversal_is_refused_and_nothing_written(tmp_path, entries, message):
    with pytest.raises(LorlibError, match=message):
        safe_extract(_zip(tmp_path / "bad.zip", entries), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_symlink_entries_are_refused(tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "l.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(LorlibError, match="link or special file"):
        safe_extract(tmp_path / "l.zip", tmp_path / "out")


def test_size_limit_counts_what_is_unpacked(tmp_path):
    archive = _zip(tmp_path / "big.zip", {"a.bin": b"\0" * 4096, "b.bin": b"\0" * 4096})
    with pytest.raises(LorlibError, match="unpacks to more than"):
        safe_extract(archive, tmp_path / "out", max_bytes=6000)
    assert safe_extract(archive, tmp_path / "ok", max_bytes=9000).is_dir()


def test_not_a_zip_and_no_adapter(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(LorlibError, match="not a zip archive"):
        safe_extract(tmp_path / "x.zip", tmp_path / "out")
    out = safe_extract(_zip(tmp_path / "y.zip", {"readme.txt": "hi"}), tmp_path / "out2")
    with pytest.raises(LorlibError, match="no PEFT adapter"):
        adapter_folders(out)
