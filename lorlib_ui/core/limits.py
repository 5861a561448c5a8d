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


def max_rank() -> int:
    """The largest rank an expert may have ($LORLIB_MAX_RANK, default 64)."""
    raw = os.environ.get(MAX_RANK_ENV, str(DEFAULT_MAX_RANK))
    try:
        value = int(raw)
    except ValueError:
        raise LorlibError(f"{MAX_RANK_ENV} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise LorlibError(f"{MAX_RANK_ENV} must be a positive integer, got {raw!r}")
    return value
