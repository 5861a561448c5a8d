"""One route as a self-contained HTML page, for slides and handouts.

The page holds the prompt, the answer, the settings, the library's fingerprint and every figure
of the Route tab as interactive plotly, with plotly's JavaScript inlined once: it opens from the
file, offline. Built from the routing record alone (plain data, no model), so the app and the
command line (`route --html`) make the same page.
"""

from __future__ import annotations

import html

from lorlib_ui.app import routing_figures
from lorlib_ui.app.figures import short_module
from lorlib_ui.core.record import RoutingRecord

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "pre{white-space:pre-wrap;background:#f6f6f6;padding:.8em;border-radius:4px}"
    "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left}"
)


def route_report(
    record: RoutingRecord,
    prompt: str,
    answer: str,
    settings: dict,
    library: str,
    fingerprint: str,
    shown: list[str] | None = None,
) -> str:
    """The HTML page of one route: `settings` (router, top-k, ...) as a table, then the figures."""
    figures = [routing_figures.layer_heatmap(record, shown)]
    middle = record.modules[len(record.modules) // 2] if record.modules else None
    if middle is not None:
        figures.append(routing_figures.token_heatmap(record, middle, shown))
    parts = [fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figures)]
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in {**settings, "library": library, "base model fingerprint": fingerprint}.items()
    )
    tops = "".join(
        f"<tr><td>{html.escape(token)}</td><td>{html.escape(_listed(top))}</td></tr>"
        for token, top in zip(record.tokens, record.top_experts())
    )
    layer = f" (tokens at {html.escape(short_module(middle))})" if middle else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>lorlib route: {html.escape(record.router)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Routing with {html.escape(record.router)}</h1>"
        f"<h2>Prompt</h2><pre>{html.escape(prompt)}</pre><h2>Answer</h2><pre>{html.escape(answer)}</pre>"
        f"<h2>Settings</h2><table>{rows}</table>"
        f"<h2>Routing per layer, and per token{layer}</h2>{''.join(parts)}"
        f"<h2>Each token's top experts (mean over layers)</h2><table>{tops}</table>"
        "</body></html>"
    )


def _listed(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{e} {w:.2f}" for e, w in top) or "-"
