"""Where the shipped files are: the embedded BIG-bench tasks and the default library.

They live in the repository's top-level `assets/` folder, beside the package (a source checkout,
or `pip install -e .`). `$LORLIB_ASSETS` points elsewhere, e.g. for a copy of the package
installed without the repository. Everything that reads a shipped file asks `asset()`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorlib_ui.core.errors import LorlibError

ASSETS_ENV = "LORLIB_ASSETS"


def assets_dir() -> Path:
    """The assets folder: $LORLIB_ASSETS, else `assets/` next to the lorlib_ui package."""
    return Path(os.environ.get(ASSETS_ENV) or Path(__file__).resolve().parents[2] / "assets")


def asset(name: str, must_exist: bool = True) -> Path:
    """A file or folder under the assets folder, e.g. "library" or "bigbench_tasks.jsonl.gz"."""
    path = assets_dir() / name
    if must_exist and not path.exists():
        raise LorlibError(f"shipped file {path} is missing; set {ASSETS_ENV} to the repository's assets folder")
    return path
