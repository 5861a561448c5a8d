"""Routers: how much each library expert contributes, per token and per LoRA'd layer.

One module per router family (`merges`, `ties`, `arrow`, `oracle`, `lorahub`), the shared shape in
`base`, and one registry (`registry`) that every menu, help text and evaluation reads its router
names from.
"""

from lorlib_ui.core.routers.base import DEFAULT_TOP_K, MIXES, Router, RouterSettings, Routing, TaskContext
from lorlib_ui.core.routers.registry import ROUTERS, help_text, make_router, menu, presets

__all__ = [
    "DEFAULT_TOP_K",
    "MIXES",
    "ROUTERS",
    "Router",
    "RouterSettings",
    "Routing",
    "TaskContext",
    "help_text",
    "make_router",
    "menu",
    "presets",
]
