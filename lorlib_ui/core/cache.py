"""The one folder where lorlib keeps what it downloads or converts (models, the BIG-bench sdist).

$LORLIB_CACHE when set, else ~/.cache/lorlib. A module of its own so that code which must not
import torch (the dataset builder) finds it too.
"""

import os
from pathlib import Path

CACHE_ENV = "LORLIB_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorlib")
