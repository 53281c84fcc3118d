"""Figures of paper VI.A and VI.D for notebook 04: token-cost histogram, cheapest vs dearest tokens,
reliability curve (achieved vs target), lambda over training, and coloured generation examples.

Each function returns a plotly figure (or an HTML string) and computes nothing the tables do not
already hold; `metabolic.report.figures.save_figure` writes them to `figures/<profile>/`.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np

from metabolic.report import figures
from metabolic.report.explorer import tokens_html

C_VOCAB = "learned token cost C_vocab (proxy units)"  # the x-axis of the learned-cost histogram


def cost_histogram(costs: np.ndarray, title: str):
    """Histogram of C_vocab over the full vocabulary (80 bins) with the mean and median marked (paper Fig. 1)."""
    return figures.vocabulary_histogram(costs, title, C_VOCAB, decimals=4)


def extremes_box(costs: np.ndarray, tokens: Sequence[str], title: str, n: int = 100):
    """Box plots of the n cheapest and n most expensive tokens (paper Fig. 2); token text on hover."""
    return figures.extremes_box(costs, tokens, title, "C_vocab (proxy units)", n)


# Axis titles of the reliability curve per compared quantity: (target, achieved), with units.
RELIABILITY_AXES = {
    "csc": ("target budget (CSC units)", "achieved true CSC (CSC units)"),
    "proxy": ("calibrated budget (proxy units)", "achieved C_vocab spend (proxy units)"),
}


def reliability_curve(records: list[dict[str, Any]], title: str, key: str = "csc"):
    """Achieved vs target per generation (points) and per level (mean, error bar = 1 SD over the level's
    n generations), with y = x. The legend gives n per level, the subtitle the prompts behind them."""
    import plotly.graph_objects as go

    fig = go.Figure()
    x_title, y_title = RELIABILITY_AXES[key]
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    rows = [r for r in records if r["decoding"] != "unbudgeted" and np.isfinite(r.get(key, np.nan))]
    if not rows:
        return fig
    top = max(max(r["budget_csc"] for r in rows), max(r[key] for r in rows)) * 1.1
    fig.add_scatter(x=[0, top], y=[0, top], mode="lines", line={"dash": "dash", "color": "#888"}, name="achieved = target")
    groups = sorted({(r["variant"], r["decoding"]) for r in rows})
    for variant, decoding in groups:
        sel = [r for r in rows if r["variant"] == variant and r["decoding"] == decoding]
        targets = sorted({r["budget_csc"] for r in sel})
        means = [np.mean([r[key] for r in sel if r["budget_csc"] == t]) for t in targets]
        stds = [np.std([r[key] for r in sel if r["budget_csc"] == t]) for t in targets]
        counts = sorted({sum(r["budget_csc"] == t for r in sel) for t in targets})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        name = f"{variant} / {decoding}"
        fig.add_scatter(x=[r["budget_csc"] for r in sel], y=[r[key] for r in sel], mode="markers",
                        marker={"size": 4, "opacity": 0.35}, name=f"{name} (each)", legendgroup=name, showlegend=False)
        fig.add_scatter(x=targets, y=means, error_y={"array": stds}, mode="lines+markers", name=f"{name} (n = {n} per level)",
                        legendgroup=name)
    prompts = len({r["prompt"] for r in rows})
    fig.update_layout(title=f"{title}<br><sup>{len(rows)} generations from {prompts} prompts; line: mean per level, "
                            f"error bars: ±1 SD over the level's n generations; points: each generation</sup>")
    return fig


def lambda_curve(metrics_by_variant: dict[str, list[dict[str, Any]]], title: str):
    """The dual variable lambda (mean over K) per epoch, one line per training variant."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for variant, metrics in metrics_by_variant.items():
        epochs = [m.get("epoch", i + 1) for i, m in enumerate(metrics)]
        fig.add_scatter(x=epochs, y=[m.get("lambda") for m in metrics], mode="lines+markers", name=variant)
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="lambda, mean over the K budgets (dual variable)")
    return fig


def examples_html(records: list[dict[str, Any]], tokenizer, colour_low: float, colour_high: float,
                  per_level: int = 1, cost_key: str = "token_costs") -> str:
    """Generations at each budget level, tokens coloured by cost (`token_costs` = C_vocab, `token_csc` = true CSC)."""
    parts = []
    levels: list[tuple[str, str, str]] = []
    for r in records:
        key = (r["variant"], r["decoding"], r["level"])
        if r["decoding"] != "unbudgeted" and key not in levels:
            levels.append(key)
    for variant, decoding, level in levels:
        sel = [r for r in records if (r["variant"], r["decoding"], r["level"]) == (variant, decoding, level)][:per_level]
        for r in sel:
            pieces = [tokenizer.decode([t]) for t in r["generated_ids"]]
            costs = r.get(cost_key) or [float("nan")] * len(pieces)
            parts.append(
                f"<h4>{html.escape(variant)} · {html.escape(decoding)} · {level}: target {r['budget_csc']:.3f} CSC, "
                f"achieved {r.get('csc', float('nan')):.3f} CSC (proxy {r['spent_proxy']:.3f} of {r['budget_proxy']:.3f}), "
                f"stopped by {html.escape(r['stopped_by'])}</h4>"
                + tokens_html(r["prompt"], pieces, costs, colour_low, colour_high)
            )
    return "\n".join(parts)
