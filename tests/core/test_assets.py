"""The shipped files are found through one function, which $LORLIB_ASSETS can point elsewhere."""

from pathlib import Path

import pytest

from lorlib_ui.core.assets import asset, assets_dir
from lorlib_ui.core.errors import LorlibError

ROOT = Path(__file__).resolve().parents[2]


def test_the_assets_beside_the_package():
    assert assets_dir() == ROOT / "assets"
    assert (asset("library") / "manifest.json").is_file() and asset("bigbench_tasks.jsonl.gz").is_file()


def test_lorlib_assets_points_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("LORLIB_ASSETS", str(tmp_path))
    (tmp_path / "library").mkdir()
    assert asset("library") == tmp_path / "library"
    with pytest.raises(LorlibError, match="bigbench_tasks.jsonl.gz is missing; set LORLIB_ASSETS"):
        asset("bigbench_tasks.jsonl.gz")
