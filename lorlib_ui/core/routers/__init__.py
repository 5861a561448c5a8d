"""Routers: how much each library expert contributes, per token and per LoRA'd layer.

One module per router family (`merges`, `ties`, `expert`, `arrow`, `gks`, `spectral`,
`phatgoose`, `avg_act`, `poly`, `oracle`, `lorahub`), the shared shape in `base` (the three
kinds: merges, per-token routers and per-task routers, and `register`) and in `per_token` for
the top-k routers, and one registry (`registry`) that every menu, help text and evaluation reads
its router names from.
"""

from lorlib_ui.core.routers.base import (
    DEFAULT_TOP_K,
    MIXES,
    MergeRouter,
    Router,
    Routing,
    TaskContext,
    TaskRouter,
    TokenRouter,
    register,
)
from lorlib_ui.core.routers.registry import (
    KEY_COMMANDS,
    ROUTERS,
    RouterPlan,
    evaluable,
    explain,
    help_text,
    make_router,
    menu,
    plan_router,
    presets,
)

__all__ = [
    "DEFAULT_TOP_K",
    "KEY_COMMANDS",
    "MIXES",
    "ROUTERS",
    "MergeRouter",
    "Router",
    "RouterPlan",
    "Routing",
    "TaskContext",
    "TaskRouter",
    "TokenRouter",
    "evaluable",
    "explain",
    "help_text",
    "make_router",
    "menu",
    "plan_router",
    "presets",
    "register",
]
