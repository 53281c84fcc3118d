"""Figures and summaries of notebook 02 (CSC labels): per-token colouring, the label distributions, the
length effect, approximations and a second encoder against exact labels, and the run's summary.

Each function returns a plotly figure, an HTML string or text, computed from what the notebook already
holds (labels, `metabolic.csc.analysis` tables, `metabolic.csc.approx.fidelity` results);
`metabolic.report.figures.save_figure` writes the figures to `figures/<profile>/`.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np

from metabolic.csc import analysis
from metabolic.csc.dataset import sequence_totals
from metabolic.report.figures import binned_histogram


def csc_tokens_html(tokenizer, ids: Sequence[int], csc: np.ndarray) -> str:
    """One text, each token's background as dark as its CSC (relative to the text's largest); value on hover."""
    top = np.nanmax(csc) if np.isfinite(csc).any() else 1.0
    spans = []
    for t, c in zip(ids, csc):
        alpha = 0.0 if not np.isfinite(c) else float(c / top)
        piece = tokenizer.decode([t])
        text = html.escape(piece).replace(" ", "&nbsp;", 1) if piece.startswith(" ") else html.escape(piece)
        spans.append(f'<span title="{c:.4f}" style="background: rgba(220,60,30,{alpha:.2f}); padding:1px">{text}</span>')
    return "<div style='font-family:monospace; line-height:1.8; margin-bottom:6px'>" + "".join(spans) + "</div>"


def csc_distributions(train_csc: Sequence[np.ndarray], stats: dict[str, Any], profile: str):
    """Per-token CSC (log10) and total CSC per text side by side; on the raw scale the budget levels as lines."""
    from plotly.subplots import make_subplots

    flat = np.concatenate(train_csc)
    flat = flat[np.isfinite(flat)]
    totals_raw = sequence_totals(train_csc, "raw")
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"per-token CSC (n = {flat.size:,} tokens)",
                                                        f"total CSC per text (n = {totals_raw.size:,} texts)"))
    fig.add_trace(binned_histogram(np.log10(np.maximum(flat, 1e-6)), 60, name="tokens", unit="tokens"), row=1, col=1)
    fig.add_trace(binned_histogram(totals_raw, 30, name="texts", unit="texts"), row=1, col=2)
    if stats["scale"] == "raw":
        # The budget levels as named lines in the legend (annotations on the lines overlapped when levels were close)
        for (name, v), dash in zip(stats["budgets"].items(), ("dot", "dash", "solid")):
            fig.add_scatter(x=[v, v], y=[0, 1], xaxis="x2", yaxis="y3", mode="lines", line={"dash": dash, "color": "#d62728"},
                            name=f"{name} budget ({v:.3f})", hoverinfo="name")
        fig.update_layout(yaxis3={"overlaying": "y2", "range": [0, 1], "visible": False}, showlegend=True,
                          legend={"title": "budget levels"})
    else:
        fig.update_layout(showlegend=False)
    fig.update_xaxes(title_text="log10 per-token CSC_t (CSC units)", row=1, col=1)
    fig.update_xaxes(title_text="total CSC per text (sum of CSC_t, CSC units)", row=1, col=2)
    fig.update_yaxes(title_text="tokens per bin", row=1, col=1)
    fig.update_yaxes(title_text="texts per bin", row=1, col=2)
    fig.update_traces(showlegend=False, selector={"type": "bar"})
    fig.update_layout(title=f"CSC labels of {len(train_csc)} training texts ({profile} profile)", bargap=0)
    return fig


def length_effect_text(table: dict[str, np.ndarray], trunc: dict[str, np.ndarray], lengths: Sequence[int],
                       n_cut: int) -> str:
    """The length effect in numbers: log-log slopes over the corpus, and the same texts cut to `lengths`."""
    slope = analysis.log_slope
    lines = [f"corpus ({len(table['length'])} texts, {table['length'].min()}..{table['length'].max()} tokens): "
             f"slope of log total on log length {slope(table['length'], table['total']):+.2f}, "
             f"per-token {slope(table['length'], table['per_token']):+.2f}, "
             f"length scale {slope(table['length'], table['total_length_scale']):+.2f}",
             f"same {n_cut} texts cut to {list(lengths)} tokens:"]
    for L in lengths:
        sel = trunc["length"] == L
        lines.append(f"  T={L:>3}: total {trunc['total'][sel].mean():.3f} (sd {trunc['total'][sel].std():.3f}), "
                     f"per-token {trunc['per_token'][sel].mean():.4f}, T x total {L * trunc['total'][sel].mean():.2f}")
    lines.append(f"  slopes: total {slope(trunc['length'], trunc['total']):+.2f}, "
                 f"per-token {slope(trunc['length'], trunc['per_token']):+.2f}")
    return "\n".join(lines)


def length_effect_figure(table: dict[str, np.ndarray], trunc: dict[str, np.ndarray], lengths: Sequence[int], n_cut: int):
    """Total, per-token and length-scale CSC against length: corpus texts, medians per length bin (IQR bars),
    and the texts cut to `lengths` (content held fixed)."""
    from plotly.subplots import make_subplots

    edges = np.unique(np.quantile(table["length"], np.linspace(0, 1, 7)))
    edges[-1] += 1
    fig = make_subplots(rows=1, cols=3, subplot_titles=("total CSC (raw)", "per-token CSC", "total on the length scale"),
                        horizontal_spacing=0.1)
    # One colour per series in every panel (the legend is drawn from panel 1)
    palette = {"texts": "#6baed6", "median": "#08519c", "cut": "#e6550d"}
    panel_y = {"total": "total CSC (CSC units)", "per_token": "per-token CSC (CSC units)",
               "total_length_scale": "T x total CSC (CSC units x tokens)"}
    for col, key in enumerate(("total", "per_token", "total_length_scale"), start=1):
        fig.add_scattergl(x=table["length"], y=table[key], mode="markers",
                          marker={"size": 4, "opacity": 0.5, "color": palette["texts"]},
                          name=f"corpus texts (n = {len(table['length'])})", legendgroup="texts", showlegend=col == 1,
                          row=1, col=col)
        b = analysis.binned(table["length"].astype(float), table[key], edges)
        fig.add_scatter(x=b["x"], y=b["median"], mode="lines+markers", line={"color": palette["median"]}, legendgroup="median",
                        name=f"median per length bin, bars: IQR (n = {b['n'].min()}-{b['n'].max()} texts per bin)",
                        showlegend=col == 1,
                        error_y={"type": "data", "symmetric": False, "array": b["q75"] - b["median"],
                                 "arrayminus": b["median"] - b["q25"]}, row=1, col=col)
        fig.update_yaxes(title_text=panel_y[key], row=1, col=col)
    for seq in np.unique(trunc["sequence"]):
        sel = trunc["sequence"] == seq
        fig.add_scatter(x=trunc["length"][sel], y=trunc["total"][sel], mode="lines",
                        line={"dash": "dot", "width": 1, "color": palette["cut"]},
                        name=f"one text cut to {list(lengths)} tokens (n = {n_cut} texts)", legendgroup="cut",
                        showlegend=bool(seq == trunc["sequence"][0]), row=1, col=1)
    fig.update_xaxes(title_text="text length (tokens, log scale)", type="log")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=f"Length effect: {len(table['length'])} corpus texts and {n_cut} texts cut to {list(lengths)}",
                      legend={"orientation": "h", "y": -0.3})
    return fig


def approximations_figure(exact: Sequence[np.ndarray], masked: Sequence[np.ndarray], gradient: Sequence[np.ndarray],
                          speed: dict[str, float]):
    """Word-piece masking and the gradient sketch against exact CSC, one point per token; speeds in the subtitle."""
    from plotly.subplots import make_subplots

    n_tokens = sum(len(x) for x in exact)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("masked vs exact", "gradient sketch vs exact"))
    e_flat = np.concatenate(exact)
    for col, approx in enumerate((masked, gradient), start=1):
        fig.add_scatter(x=e_flat, y=np.concatenate(approx), mode="markers", marker={"size": 5, "opacity": 0.6},
                        showlegend=False, row=1, col=col)
    fig.update_xaxes(title_text="exact CSC_t (CSC units)", type="log")
    fig.update_yaxes(title_text="masked CSC_t (CSC units)", row=1, col=1)
    fig.update_yaxes(title_text="gradient-sketch CSC_t (CSC units)", row=1, col=2)
    fig.update_yaxes(type="log")
    fig.update_layout(title=f"Approximate vs exact CSC, one point per token (n = {n_tokens} tokens of {len(exact)} texts)<br><sup>"
                            f"speed here: exact {speed['exact']:.0f}, masked {speed['masked']:.0f}, "
                            f"gradient {speed['gradient']:.0f} labels/s</sup>")
    return fig


def encoder_agreement_figure(a_minilm: Sequence[np.ndarray], a_other: Sequence[np.ndarray], token_texts: Sequence[str],
                             encoder: str):
    """Per-token CSC of all-MiniLM-L6-v2 against a second encoder (`encoder`, its Hub id), token text on hover."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=np.concatenate(a_minilm), y=np.concatenate(a_other), mode="markers", text=list(token_texts)))
    fig.update_layout(title=f"Per-token CSC: all-MiniLM-L6-v2 vs {encoder.split('/')[-1]} "
                            f"(n = {len(token_texts)} tokens of {len(a_minilm)} texts)",
                      xaxis={"title": "MiniLM CSC_t (CSC units)", "type": "log"},
                      yaxis={"title": "second encoder CSC_t (CSC units)", "type": "log"})
    return fig


def csc_summary(label: str, n_texts: int, seq_len: int, stats: dict[str, Any], table: dict[str, np.ndarray],
                trunc: dict[str, np.ndarray], lengths: Sequence[int], n_cut: int, n_approx: int,
                fidelity: dict[str, dict[str, float]]) -> str:
    """Notebook 02's "what this run shows", from the stats, the length tables and the approximations' fidelity."""
    slope = analysis.log_slope
    return (
        f"Measured on the {label}, CPU: {n_texts} training texts of <= {seq_len} tokens "
        f"labelled exactly; per-token CSC averages {stats['token_mean']:.4f} and total CSC per text {stats['mean']:.3f} "
        f"(budgets low/medium/high {', '.join(f'{v:.3f}' for v in stats['budgets'].values())}). Across these texts total CSC "
        f"changes with length with log-log slope {slope(table['length'], table['total']):+.2f} while per-token CSC has slope "
        f"{slope(table['length'], table['per_token']):+.2f}; "
        f"{n_cut} texts cut to {lengths[0]}..{lengths[-1]} tokens have total slope "
        f"{slope(trunc['length'], trunc['total']):+.2f} and per-token slope "
        f"{slope(trunc['length'], trunc['per_token']):+.2f}, so raw totals do not grow with text length "
        f"and the length scale (T x CSC_t) does. "
        f"On {n_approx} small texts, masking word pieces ranks tokens like exact CSC with mean Spearman "
        f"{fidelity['masked']['spearman_mean']:.2f}, the gradient sketch {fidelity['gradient']['spearman_mean']:.2f} (the encoder "
        f"ablation, when a second encoder is installed, is printed above). Small samples: these numbers show the pipeline runs, "
        f"not their values at scale."
    )
