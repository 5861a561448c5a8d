"""The bounds on what one adapter may ask of the server: its rank and its scale. Imports no torch,
so that training settings (and through them the UI) can share them.

Every expert at a LoRA'd layer is padded to the layer's largest rank (`routed_model`), so one
expert's rank sets the memory of all of them there: E x r_max x (d_in + d_out) numbers per layer.
"""

from __future__ import annotations

import os

from lorlib_ui.core.errors import LorlibError

MAX_RANK_ENV = "LORLIB_MAX_RANK"
DEFAULT_MAX_RANK = 64  # far above the paper's ranks (4-16)
MAX_ALPHA = 1e5  # a lora_alpha beyond this is not a trained adapter's


def positive_setting(env: str, default: int) -> int:
    """A positive integer setting from the environment variable `env`, else `default`."""
    raw = os.environ.get(env, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise LorlibError(f"{env} must be a positive integer, got {raw!r}")
    return value


def max_rank() -> int:
    """The largest rank an expert may have ($LORLIB_MAX_RANK, default 64)."""
    return positive_setting(MAX_RANK_ENV, DEFAULT_MAX_RANK)
