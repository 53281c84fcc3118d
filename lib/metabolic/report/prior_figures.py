"""Figures and summaries of notebook 01 (the synthetic energy prior, paper IV.B eq. 8): the cost
distribution over the vocabulary, cost against corpus frequency, the cheapest and dearest tokens, and
the run's conclusion.

Each function reads only the prior (`metabolic.data.prior.Prior`) and its config, and returns text or
a plotly figure.
"""

from __future__ import annotations

import numpy as np

from metabolic.core.config import PriorConfig
from metabolic.data.prior import Prior
from metabolic.report import figures

COST = "synthetic cost (vocabulary mean = 1)"  # the cost axis of every prior figure
GRID_BINS = 60  # cells per axis of the cost-against-frequency grid


def summary(prior: Prior, cfg: PriorConfig) -> list[str]:
    """The prior's size, unseen tokens, mean/median/extremes against the floor, and heading-like tokens."""
    cost, counts = prior.cost, prior.counts
    return [f"vocabulary: {cost.size:,} tokens; unseen in the training split: {(counts == 0).sum():,}",
            f"mean cost {cost.mean():.6f}  median {np.median(cost):.4f}  min {cost.min():.4f} (c_min {cfg.c_min})  "
            f"max {cost.max():.4f}",
            f"tokens on the floor: {(cost <= cfg.c_min + 1e-12).mean():.1%}; heading-like tokens: {prior.heading.sum()}"]


def token_examples(prior: Prior, n: int = 10, n_heading: int = 12) -> list[str]:
    """The `n` most frequent and `n` most expensive tokens and the first `n_heading` heading-like ones, each
    with its cost."""
    def show(ids) -> str:
        return ", ".join(f"{prior.tokens[i]!r} {prior.cost[i]:.2f}" for i in ids)

    frequent = np.argsort(-prior.counts, kind="stable")[:n]
    dearest = np.argsort(prior.cost, kind="stable")[::-1][:n]
    return [f"{n} most frequent tokens: {show(frequent)}", f"{n} most expensive tokens: {show(dearest)}",
            f"heading-like tokens: {show(np.flatnonzero(prior.heading)[:n_heading])}"]


def cost_histogram(prior: Prior):
    """The prior's cost over the full vocabulary in 80 bins, mean and median marked."""
    return figures.vocabulary_histogram(prior.cost, "Synthetic token-cost prior over the full vocabulary", COST,
                                        decimals=2)


def cost_against_frequency(prior: Prior, bins: int = GRID_BINS):
    """Tokens per (log10 corpus count, cost) cell over the tokens seen in the training split, with the
    heading-like tokens as single points named on hover.

    A grid rather than one point per token: 28,654 points made the stored notebook 0.8 MB."""
    import plotly.graph_objects as go

    cost, counts = prior.cost, prior.counts
    seen = counts > 0
    density, x_edges, y_edges = np.histogram2d(np.log10(counts[seen]), cost[seen], bins=(bins, bins))
    heading = prior.heading & seen
    fig = go.Figure(go.Heatmap(
        x=10 ** ((x_edges[:-1] + x_edges[1:]) / 2), y=(y_edges[:-1] + y_edges[1:]) / 2,
        z=np.where(density.T > 0, np.log10(np.maximum(density.T, 1)).round(3), np.nan),
        colorscale=[[0, "#c6dbef"], [1, "#08306b"]],
        colorbar={"title": "tokens per cell", "tickvals": [0, 1, 2, 3], "ticktext": ["1", "10", "100", "1000"]},
        customdata=density.T.astype(int), hovertemplate="count ~%{x:.3g}, cost ~%{y:.2f}: %{customdata:.0f} tokens<extra></extra>",
        name="seen tokens"))
    fig.add_scatter(x=counts[heading], y=cost[heading], mode="markers", marker={"size": 7, "color": "red"},
                    name=f"heading-like tokens (n = {heading.sum()})", text=[prior.tokens[i] for i in np.flatnonzero(heading)])
    fig.update_layout(title=f"Cost against corpus frequency<br><sup>n = {seen.sum():,} tokens seen in the training split, "
                            f"counted in a {bins} x {bins} grid; {int((~seen).sum()):,} unseen tokens not shown</sup>",
                      xaxis={"type": "log", "title": "count in WikiText-2 train (tokens, log scale)"}, yaxis_title=COST,
                      showlegend=True, legend={"x": 0.55, "y": 0.98})
    return fig


def extremes_box(prior: Prior, n: int = 100):
    """The prior cost of the `n` cheapest and `n` most expensive tokens, one box each."""
    return figures.extremes_box(prior.cost, prior.tokens,
                                f"Prior cost of the {n} cheapest and {n} most expensive tokens", COST, n)


def conclusion(prior: Prior, cfg: PriorConfig, run_label: str) -> str:
    """Notebook 01's "What this run shows": normalisation, floor, frequent short vs rare long tokens, the
    heading penalty."""
    cost, counts = prior.cost, prior.counts
    seen = counts > 0
    short_frequent = seen & (prior.lengths <= 3) & (counts >= np.quantile(counts[seen], 0.99))
    long_rare = (counts <= 2) & (prior.lengths >= 8)
    return (f"Measured on the {run_label} (the prior uses the whole training split on every profile): "
            f"the {cost.size:,}-token prior has mean {cost.mean():.6f} and minimum {cost.min():.2f}. Frequent short tokens "
            f"cost {cost[short_frequent].mean():.2f} on average, rare long ones {cost[long_rare].mean():.2f}; "
            f"{prior.heading.sum()} heading-like tokens carry the +{cfg.heading_penalty} penalty.")
