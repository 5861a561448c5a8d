"""The Route tab's explanation of an answer, from `Explanation.to_dict()` (plain data): each token's
gain over the base model, and which expert carried how much of the answer (leave-one-out)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from lorlib_ui.app.figures import LAYOUT


def token_table(shown: dict) -> pd.DataFrame:
    """A row per answer token: its log-probability under the router, the base model (and the other
    router), the gain, and the router's top experts there."""
    rows = {
        "token": [repr(t) for t in shown["tokens"]],
        "router": shown["logprob"],
        "base": shown["base_logprob"],
        "gain": shown["gain"],
    }
    if shown.get("compare_logprob") is not None:
        rows[shown["compare"]] = shown["compare_logprob"]
    rows["top experts"] = [", ".join(f"{e['expert']} {e['weight']:.2f}" for e in top) for top in shown["top_experts"]]
    return pd.DataFrame(rows).round(3)


def token_gains(shown: dict) -> go.Figure:
    """Per answer token: the gain over the base model (and over the other router, when asked)."""
    labels = [f"{i}: {t!r}" for i, t in enumerate(shown["tokens"])]
    fig = go.Figure(go.Bar(x=labels, y=shown["gain"], name="over the base model"))
    if shown.get("compare_logprob") is not None:
        over = [a - b for a, b in zip(shown["logprob"], shown["compare_logprob"])]
        fig.add_trace(go.Bar(x=labels, y=over, name=f"over {shown['compare']}"))
    total = shown["total_gain"]
    fig.update_layout(title=f"Gain per token (log-prob, nats; {total:+.2f} in all)", barmode="group", **LAYOUT)
    return fig


def credit_bars(shown: dict) -> go.Figure:
    """Which expert earned this answer: what the answer loses without each chosen expert."""
    credit = shown["credit"]
    fig = go.Figure(
        go.Bar(
            x=[c["logprob"] for c in credit],
            y=[c["expert"] for c in credit],
            orientation="h",
            hovertemplate="without %{y}: the answer loses %{x:.3f} nats<extra></extra>",
        )
    )
    fig.update_layout(
        title="What the answer loses without each expert (nats)", height=max(260, 28 * len(credit)), **LAYOUT
    )
    fig.update_yaxes(autorange="reversed")
    return fig
