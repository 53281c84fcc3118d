# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Counterfactual semantic cost (paper IV.C, V.A)
#
# `c_csc(x_t) = 1 - cos(f(x), f(x without t))`, with `f` = all-MiniLM-L6-v2 (normalised embeddings)
# and the counterfactual made by decoding the GPT-2 ids with position t removed. This notebook shows
# the exact labels of the profile's texts (cached stage `csc`), their per-token and per-text
# distributions, the budget targets derived from them, the length effect and the length-aware
# scale, two cheaper approximations against exact labels, and the agreement of a second encoder.

# %% tags=["parameters"]
profile = "smoke"
overrides = {}
# Sizes of the side analyses (None = the profile's default below): they label extra texts.
trunc_sequences = None  # texts cut to several lengths (length effect with content held fixed)
approx_sequences = None  # texts on which approximations are compared with exact labels
ablation_sequences = None  # texts labelled by the second encoder
ablation_max_tokens = None  # tokens kept of each of them
ablation_encoder = "sentence-transformers/all-mpnet-base-v2"

# %%
from metabolic.report.notebook import profile_label, setup

cfg = setup(profile, overrides)
print("profile:", profile_label(cfg))
SIDE = {"smoke": dict(trunc=2, approx=3, ablation=2, ablation_tokens=12)}.get(
    profile, dict(trunc=32, approx=64, ablation=32, ablation_tokens=128))
trunc_sequences = trunc_sequences or SIDE["trunc"]
approx_sequences = approx_sequences or SIDE["approx"]
ablation_sequences = ablation_sequences or SIDE["ablation"]
ablation_max_tokens = ablation_max_tokens or SIDE["ablation_tokens"]

# %%
import html

import numpy as np
import plotly.graph_objects as go
from IPython.display import HTML, display
from metabolic.csc import analysis as csc_analysis
from metabolic.csc import approx as csc_approx
from metabolic.csc.dataset import sequence_totals
from metabolic.csc.labeller import CSCLabeller
from metabolic.pipeline import stages
from metabolic.report.figures import binned_histogram, save_figure
from plotly.subplots import make_subplots

NB = "02_csc_labels"
data = stages.csc_labels(cfg)
labeller = stages.csc_labeller(cfg)
tok = labeller.tokenizer

# %%
# NBVAL_CHECK_OUTPUT
s = data.stats
n_tok = sum(len(x) for x in data.train_ids)
print(f"labelled: {len(data.train_ids)} training texts ({n_tok} tokens), {len(data.valid_ids)} validation texts; "
      f"positions={cfg.csc.positions}, encoder window {labeller.window} word pieces")
print(f"NaN labels (texts beyond the window): {sum(int(np.isnan(c).sum()) for c in data.train_csc)}")
print(f"per-token CSC: mean {s['token_mean']:.4f}, sd {s['token_std']:.4f}")
print(f"total CSC per text ({s['scale']} scale): mean {s['mean']:.3f}, sd {s['std']:.3f}, median {s['median']:.3f}, "
      f"range {s['min']:.3f}..{s['max']:.3f}")
print("quantiles:", ", ".join(f"q{q:g}={v:.3f}" for q, v in s["quantiles"].items()))
print("budget targets (train.budget_quantiles):", ", ".join(f"{k} {v:.3f}" for k, v in s["budgets"].items()))

# %% [markdown]
# ## Per-token CSC on example texts
# Darker = the sentence embedding moves more when the token is deleted.

# %%
def colour(ids, csc):
    top = np.nanmax(csc) if np.isfinite(csc).any() else 1.0
    spans = []
    for t, c in zip(ids, csc):
        alpha = 0.0 if not np.isfinite(c) else float(c / top)
        text = html.escape(tok.decode([t])).replace(" ", "&nbsp;", 1) if tok.decode([t]).startswith(" ") else html.escape(tok.decode([t]))
        spans.append(f'<span title="{c:.4f}" style="background: rgba(220,60,30,{alpha:.2f}); padding:1px">{text}</span>')
    return "<div style='font-family:monospace; line-height:1.8; margin-bottom:6px'>" + "".join(spans) + "</div>"

examples = ["The future of artificial intelligence depends on energy.", "naïve café – 東京 is a short multi-byte text."]
example_labels = [labeller.label_text(t) for t in examples]
blocks = [colour(ids, c) for ids, c in example_labels]
blocks += [colour(ids, c) for ids, c in list(zip(data.train_ids, data.train_csc))[:2]]
display(HTML("".join(blocks)))

# %%
# NBVAL_CHECK_OUTPUT
for text, (ids, c) in zip(examples, example_labels):
    order = np.argsort(-c)[:3]
    print(f"{text!r}: total {c.sum():.3f}; top tokens", ", ".join(f"{tok.decode([ids[i]])!r} {c[i]:.3f}" for i in order))

# %% [markdown]
# ## Distributions of per-token and total CSC

# %%
flat = np.concatenate(data.train_csc)
flat = flat[np.isfinite(flat)]
totals_raw = sequence_totals(data.train_csc, "raw")
fig = make_subplots(rows=1, cols=2, subplot_titles=(f"per-token CSC (n = {flat.size:,} tokens)",
                                                    f"total CSC per text (n = {totals_raw.size:,} texts)"))
fig.add_trace(binned_histogram(np.log10(np.maximum(flat, 1e-6)), 60, name="tokens", unit="tokens"), row=1, col=1)
fig.add_trace(binned_histogram(totals_raw, 30, name="texts", unit="texts"), row=1, col=2)
if s["scale"] == "raw":
    # The budget levels as named lines in the legend (annotations on the lines overlapped when levels were close)
    for (name, v), dash in zip(s["budgets"].items(), ("dot", "dash", "solid")):
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
fig.update_layout(title=f"CSC labels of {len(data.train_ids)} training texts ({cfg.profile} profile)", bargap=0)
save_figure(fig, cfg, "02_csc_distributions", NB)
fig.show()

# %% [markdown]
# ## The length effect
# Across the labelled corpus (natural lengths) and on the same texts cut to several lengths. A slope
# of log(total) on log(length) near 0 means totals are flat in length; per-token CSC then falls
# like 1/T (slope -1). The length-aware scale `T x CSC_t` (`csc.scale="length"`) gives totals
# that grow with the text.

# %%
table = csc_analysis.length_table(data.train_ids, data.train_csc)
longest = cfg.corpus.seq_len
lengths = [L for L in (8, 16, 32, 64, 128, 256) if L <= longest]
full_length = {i: c for i, (x, c) in enumerate(zip(data.train_ids, data.train_csc)) if len(x) == longest}
chosen = sorted(full_length)[:trunc_sequences]
trunc = csc_analysis.truncation_effect(labeller, [data.train_ids[i] for i in chosen], lengths,
                                       reuse={k: full_length[i] for k, i in enumerate(chosen)})

# %%
# NBVAL_CHECK_OUTPUT
print(f"corpus ({len(table['length'])} texts, {table['length'].min()}..{table['length'].max()} tokens): "
      f"slope of log total on log length {csc_analysis.log_slope(table['length'], table['total']):+.2f}, "
      f"per-token {csc_analysis.log_slope(table['length'], table['per_token']):+.2f}, "
      f"length scale {csc_analysis.log_slope(table['length'], table['total_length_scale']):+.2f}")
print(f"same {len(chosen)} texts cut to {lengths} tokens:")
for L in lengths:
    sel = trunc["length"] == L
    print(f"  T={L:>3}: total {trunc['total'][sel].mean():.3f} (sd {trunc['total'][sel].std():.3f}), "
          f"per-token {trunc['per_token'][sel].mean():.4f}, T x total {L * trunc['total'][sel].mean():.2f}")
print(f"  slopes: total {csc_analysis.log_slope(trunc['length'], trunc['total']):+.2f}, "
      f"per-token {csc_analysis.log_slope(trunc['length'], trunc['per_token']):+.2f}")

# %%
edges = np.unique(np.quantile(table["length"], np.linspace(0, 1, 7)))
edges[-1] += 1
fig = make_subplots(rows=1, cols=3, subplot_titles=("total CSC (raw)", "per-token CSC", "total on the length scale"),
                    horizontal_spacing=0.1)
# One colour per series in every panel (the legend is drawn from panel 1)
palette = {"texts": "#6baed6", "median": "#08519c", "cut": "#e6550d"}
panel_y = {"total": "total CSC (CSC units)", "per_token": "per-token CSC (CSC units)",
           "total_length_scale": "T x total CSC (CSC units x tokens)"}
for col, key in enumerate(("total", "per_token", "total_length_scale"), start=1):
    fig.add_scattergl(x=table["length"], y=table[key], mode="markers", marker={"size": 4, "opacity": 0.5, "color": palette["texts"]},
                      name=f"corpus texts (n = {len(table['length'])})", legendgroup="texts", showlegend=col == 1, row=1, col=col)
    b = csc_analysis.binned(table["length"].astype(float), table[key], edges)
    fig.add_scatter(x=b["x"], y=b["median"], mode="lines+markers", line={"color": palette["median"]}, legendgroup="median",
                    name=f"median per length bin, bars: IQR (n = {b['n'].min()}-{b['n'].max()} texts per bin)", showlegend=col == 1,
                    error_y={"type": "data", "symmetric": False, "array": b["q75"] - b["median"],
                             "arrayminus": b["median"] - b["q25"]}, row=1, col=col)
    fig.update_yaxes(title_text=panel_y[key], row=1, col=col)
for L_seq in np.unique(trunc["sequence"]):
    sel = trunc["sequence"] == L_seq
    fig.add_scatter(x=trunc["length"][sel], y=trunc["total"][sel], mode="lines", line={"dash": "dot", "width": 1, "color": palette["cut"]},
                    name=f"one text cut to {lengths} tokens (n = {len(chosen)} texts)", legendgroup="cut",
                    showlegend=bool(L_seq == trunc["sequence"][0]), row=1, col=1)
fig.update_xaxes(title_text="text length (tokens, log scale)", type="log")
fig.update_yaxes(type="log", row=1, col=2)
fig.update_layout(title=f"Length effect: {len(table['length'])} corpus texts and {len(chosen)} texts cut to {lengths}",
                  legend={"orientation": "h", "y": -0.3})
save_figure(fig, cfg, "02_csc_length_effect", NB)
fig.show()

# %% [markdown]
# ## Approximations against exact labels
# Word-piece masking (one tokenisation, the removed token's pieces masked out of attention and
# pooling) and a gradient sketch (one forward and backward per text, 16 random probes), on the same
# tokens as exact labels. Speeds are wall-clock on this machine, in the same run. Costs scale
# differently: exact needs T + 1 encoder passes of a T-token text, masking T + 1 passes at the full
# length (no re-tokenisation), the sketch a fixed 16 forward + backward passes; on the short smoke
# texts (12-24 tokens) the sketch's fixed cost is larger than exact labelling, its advantage only
# appears for long texts (T = 256 in the gpu profile).

# %%
pool = [i for i, x in enumerate(data.train_ids) if 12 <= len(x) <= 24] or list(range(len(data.train_ids)))
pick = pool[:approx_sequences]
seqs = [data.train_ids[i] for i in pick]
exact, t_exact = csc_approx.timed(labeller.label, seqs, progress=False)
masked, t_masked = csc_approx.timed(csc_approx.masked_csc, labeller, seqs)
grad, t_grad = csc_approx.timed(csc_approx.gradient_csc, labeller, seqs, probes=16, seed=cfg.csc.seed)
n_lab = sum(len(x) for x in seqs)
fid = {"masked": csc_approx.fidelity(exact, masked), "gradient": csc_approx.fidelity(exact, grad)}
speed = {"exact": n_lab / t_exact, "masked": n_lab / t_masked, "gradient": n_lab / t_grad}
print("labels/s on this machine:", ", ".join(f"{k} {v:.1f}" for k, v in speed.items()))

# %%
# NBVAL_CHECK_OUTPUT
print(f"{len(seqs)} texts, {n_lab} tokens; exact cached labels reproduced: "
      f"{max(float(np.nanmax(np.abs(e - data.train_csc[i]))) for e, i in zip(exact, pick)) < 1e-5}")
for name, f in fid.items():
    print(f"{name:>8}: Spearman per text mean {f['spearman_mean']:.2f} (median {f['spearman_median']:.2f}), MAE {f['mae']:.4f}")

# %%
fig = make_subplots(rows=1, cols=2, subplot_titles=("masked vs exact", "gradient sketch vs exact"))
e_flat = np.concatenate(exact)
for col, approx in enumerate((masked, grad), start=1):
    fig.add_scatter(x=e_flat, y=np.concatenate(approx), mode="markers", marker={"size": 5, "opacity": 0.6},
                    showlegend=False, row=1, col=col)
fig.update_xaxes(title_text="exact CSC_t (CSC units)", type="log")
fig.update_yaxes(title_text="masked CSC_t (CSC units)", row=1, col=1)
fig.update_yaxes(title_text="gradient-sketch CSC_t (CSC units)", row=1, col=2)
fig.update_yaxes(type="log")
fig.update_layout(title=f"Approximate vs exact CSC, one point per token (n = {n_lab} tokens of {len(seqs)} texts)<br><sup>"
                        f"speed here: exact {speed['exact']:.0f}, masked {speed['masked']:.0f}, gradient {speed['gradient']:.0f} labels/s</sup>")
save_figure(fig, cfg, "02_csc_approximations", NB)
fig.show()

# %% [markdown]
# ## Encoder ablation
# Token-importance rankings of all-MiniLM-L6-v2 against a second encoder (all-mpnet-base-v2,
# paper V.B) on the same texts: Spearman per text.

# %%
from metabolic.core.errors import AssetError

try:
    second = csc_analysis.load_second_encoder(ablation_encoder, device=str(labeller.device))
except AssetError as exc:
    second = None
    print(f"second encoder unavailable, ablation skipped: {str(exc)[:300]}")
if second is not None:
    other = CSCLabeller(second, tok, device=str(labeller.device), precision=cfg.csc.precision, batch_size=cfg.csc.batch_size)
    abl = [list(x[:ablation_max_tokens]) for x in data.train_ids if len(x) >= ablation_max_tokens][:ablation_sequences]
    a_minilm = labeller.label(abl, progress=False)
    a_other = other.label(abl, progress=False)
    agreement = csc_approx.fidelity(a_minilm, a_other)

# %%
# Not checked by nbval: the second encoder is optional (`python -m metabolic.csc.analysis fetch-mpnet`).
if second is None:
    print("no second encoder: run `python -m metabolic.csc.analysis fetch-mpnet` to add all-mpnet-base-v2")
else:
    print(f"{len(abl)} texts of {ablation_max_tokens} tokens ({profile_label(cfg)}): Spearman per text, MiniLM vs "
          f"{ablation_encoder.split('/')[-1]}, mean {agreement['spearman_mean']:.2f} (median {agreement['spearman_median']:.2f}); "
          f"mean per-token CSC {np.mean(np.concatenate(a_minilm)):.4f} vs {np.mean(np.concatenate(a_other)):.4f}")

# %%
if second is not None:
    fig = go.Figure(go.Scatter(x=np.concatenate(a_minilm), y=np.concatenate(a_other), mode="markers",
                               text=[tok.decode([t]) for x in abl for t in x]))
    fig.update_layout(title=f"Per-token CSC: all-MiniLM-L6-v2 vs {ablation_encoder.split('/')[-1]} "
                            f"(n = {sum(len(x) for x in abl)} tokens of {len(abl)} texts)",
                      xaxis={"title": "MiniLM CSC_t (CSC units)", "type": "log"},
                      yaxis={"title": "second encoder CSC_t (CSC units)", "type": "log"})
    save_figure(fig, cfg, "02_csc_encoder_agreement", NB)
    fig.show()

# %% [markdown]
# ## Labelling speed on a GPU (committed results)
# The labeller against naive `SentenceTransformer.encode` on the same 256-token texts, and the gpu
# profile's csc stage, from runs of `scripts/gpu_results.sh` committed under
# `results/csc_throughput/<gpu>/` and `results/budgets/<gpu>/` (this machine's speeds are above).

# %%
# NBVAL_CHECK_OUTPUT
import pandas as pd
from metabolic.report import gpu_results

print(gpu_results.overview("csc_throughput"))
if gpu_rows := gpu_results.rows("csc_throughput", "methods"):
    columns = ["gpu", "method", "labels_per_s", "ratio_vs_naive", "mean_abs_diff_vs_fp32", "max_abs_diff_vs_fp32"]
    print(pd.DataFrame(gpu_rows).reindex(columns=columns).to_string(index=False))
for run in gpu_results.committed("budgets"):
    if (stage := run.get("csc_stage")) and stage.get("seconds"):
        print(f"{run['gpu']}: the gpu profile's csc stage labelled {stage['n_train']:,} + {stage['n_valid']:,} texts "
              f"({stage['n_labels']:,} training tokens) in {stage['seconds']:.0f} s, encoder loading included")

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
slope_total = csc_analysis.log_slope(table["length"], table["total"])
slope_token = csc_analysis.log_slope(table["length"], table["per_token"])
print(
    f"Measured on the {profile_label(cfg)}, CPU: {len(data.train_ids)} training texts of <= {cfg.corpus.seq_len} tokens "
    f"labelled exactly; per-token CSC averages {s['token_mean']:.4f} and total CSC per text {s['mean']:.3f} "
    f"(budgets low/medium/high {', '.join(f'{v:.3f}' for v in s['budgets'].values())}). Across these texts total CSC "
    f"changes with length with log-log slope {slope_total:+.2f} while per-token CSC has slope {slope_token:+.2f}; "
    f"{len(chosen)} texts cut to {lengths[0]}..{lengths[-1]} tokens have total slope "
    f"{csc_analysis.log_slope(trunc['length'], trunc['total']):+.2f} and per-token slope "
    f"{csc_analysis.log_slope(trunc['length'], trunc['per_token']):+.2f}, so raw totals do not grow with text length "
    f"and the length scale (T x CSC_t) does. "
    f"On {len(seqs)} small texts, masking word pieces ranks tokens like exact CSC with mean Spearman "
    f"{fid['masked']['spearman_mean']:.2f}, the gradient sketch {fid['gradient']['spearman_mean']:.2f} (the encoder "
    f"ablation, when a second encoder is installed, is printed above). Small samples: these numbers show the pipeline runs, not their values at scale."
)
