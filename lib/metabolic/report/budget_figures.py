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


def cost_summary(costs_by_variant: dict[str, np.ndarray], tokens: Sequence[str], n: int = 8) -> list[str]:
    """Per variant: C_vocab's mean, median and extremes over the vocabulary, and its `n` cheapest and dearest tokens."""
    lines = []
    for variant, c in costs_by_variant.items():
        order = np.argsort(c, kind="stable")
        lines += [f"{variant}: C_vocab over {c.size:,} tokens: mean {c.mean():.5f} median {np.median(c):.5f} "
                  f"min {c.min():.5f} max {c.max():.5f}",
                  "  cheapest: " + ", ".join(repr(tokens[i]) for i in order[:n]),
                  "  dearest:  " + ", ".join(repr(tokens[i]) for i in order[::-1][:n])]
    return lines


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


def is_proxy_decoding(record: dict[str, Any]) -> bool:
    """Whether a generation record is a trained variant's proxy decoding (not the verified controller or a baseline)."""
    return record["variant"] not in ("verified", "baseline")


def reliability_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The reliability curves of notebook 04 by figure name: true CSC against the raw-scale budget (proxy
    decodings and the verified controller on the raw scale), the verified controller on the length-aware
    scale, and the proxy decodings in proxy space (C_vocab spend against the calibrated budget)."""
    raw = [r for r in records if r["variant"] != "verified" or r["decoding"].endswith("_raw")]
    length = [r for r in records if r["variant"] == "verified" and r["decoding"].endswith("_length")]
    proxy = [{**r, "budget_csc": r["budget_proxy"], "proxy": r["spent_proxy"]} for r in records if is_proxy_decoding(r)]
    return {"04_reliability_csc": reliability_curve(raw, "Reliability: achieved true CSC vs target budget (raw scale)"),
            "04_reliability_csc_length": reliability_curve(
                length, "Reliability of the verified controller, length-aware CSC scale"),
            "04_reliability_proxy": reliability_curve(
                proxy, "Reliability in proxy space: C_vocab spend vs calibrated budget", key="proxy")}


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


def cost_examples_html(records: list[dict[str, Any]], tokenizer, costs_by_variant: dict[str, np.ndarray],
                       prompts: Sequence[str]) -> str:
    """One generation per level of the steered proxy decodings of `prompts` (else of every proxy decoding),
    tokens coloured by C_vocab between the 5% and 95% quantiles of every variant's costs."""
    every = np.concatenate(list(costs_by_variant.values()))
    low, high = float(np.quantile(every, 0.05)), float(np.quantile(every, 0.95))
    steered = [r for r in records if r["decoding"] == "steered" and r["prompt"] in prompts]
    return examples_html(steered or [r for r in records if is_proxy_decoding(r)], tokenizer, low, high, per_level=1)
