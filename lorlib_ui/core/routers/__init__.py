"""Routers: how much each library expert contributes, per token and per LoRA'd layer.

One module per router family (`merges`, `ties`, `arrow`, `gks`, `spectral`, `phatgoose`,
`avg_act`, `oracle`, `lorahub`), the shared shape in `base` (and in `per_token` for the top-k
routers), and one registry (`registry`) that every menu, help text and evaluation reads its router
names from.
"""

from lorlib_ui.core.routers.base import DEFAULT_TOP_K, MIXES, Router, RouterSettings, Routing, TaskContext
from lorlib_ui.core.routers.registry import (
    KEY_COMMANDS,
    ROUTERS,
    evaluable,
    explain,
    help_text,
    make_router,
    menu,
    presets,
)

__all__ = [
    "DEFAULT_TOP_K",
    "KEY_COMMANDS",
    "MIXES",
    "ROUTERS",
    "Router",
    "RouterSettings",
    "Routing",
    "TaskContext",
    "evaluable",
    "explain",
    "help_text",
    "make_router",
    "menu",
    "presets",
]
