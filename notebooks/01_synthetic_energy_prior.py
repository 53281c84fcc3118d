# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The synthetic energy prior (paper IV.B, eq. 8)
#
# `cost(v) = max(c_min, s * (alpha / (f(v) + eps) + beta * len(v)) + penalty(v))`, with `f` the token's
# relative frequency in the WikiText-2 training split, `len` its decoded length in characters, `s`
# solved so that the vocabulary mean is exactly 1, and a penalty for heading/metadata-like tokens.
# Unseen tokens count as if seen once (see `metabolic.data.prior`), so they cost what the rarest observed
# tokens cost and cannot dominate the normalisation.

# %% tags=["parameters"]
profile = "smoke"
overrides = {}

# %%
from metabolic.report.notebook import profile_label, setup

cfg = setup(profile, overrides)
print("profile:", profile_label(cfg))

# %%
import numpy as np
from metabolic.pipeline import stages

prior = stages.energy_prior(cfg).prior
cost, counts = prior.cost, prior.counts
order = np.argsort(cost, kind="stable")

# %%
# NBVAL_CHECK_OUTPUT
print(f"vocabulary: {cost.size:,} tokens; unseen in the training split: {(counts == 0).sum():,}")
print(f"mean cost {cost.mean():.6f}  median {np.median(cost):.4f}  min {cost.min():.4f} (c_min {cfg.prior.c_min})  max {cost.max():.4f}")
print(f"tokens on the floor: {(cost <= cfg.prior.c_min + 1e-12).mean():.1%}; heading-like tokens: {prior.heading.sum()}")

# %%
# NBVAL_CHECK_OUTPUT
def show(ids):
    return ", ".join(f"{prior.tokens[i]!r} {cost[i]:.2f}" for i in ids)

frequent = np.argsort(-counts, kind="stable")[:10]
print("10 most frequent tokens:", show(frequent))
print("10 most expensive tokens:", show(order[::-1][:10]))
print("heading-like tokens:", show(np.flatnonzero(prior.heading)[:12]))

# %%
import plotly.graph_objects as go
from metabolic.report.figures import binned_histogram, save_figure

COST = "synthetic cost (vocabulary mean = 1)"
fig = go.Figure(binned_histogram(cost, 80, name="tokens", unit="tokens"))
fig.add_vline(x=float(cost.mean()), line_dash="dash", annotation_text=f"mean {cost.mean():.2f}")
fig.add_vline(x=float(np.median(cost)), line_dash="dot", annotation_text=f"median {np.median(cost):.2f}",
              annotation_position="bottom right")
fig.update_layout(title=f"Synthetic token-cost prior over the full vocabulary<br><sup>n = {cost.size:,} tokens in 80 equal bins</sup>",
                  xaxis_title=COST, yaxis_title="tokens per bin (log scale)", yaxis_type="log", bargap=0)
save_figure(fig, cfg, "01_prior_histogram", "01_synthetic_energy_prior")
fig.show()

# %%
# Tokens per (log10 count, cost) cell rather than one point per token: 28,654 points made the stored
# notebook 0.8 MB. The heading-like tokens (a few dozen) stay single points, named on hover.
seen = counts > 0
log_count = np.log10(counts[seen])
density, x_edges, y_edges = np.histogram2d(log_count, cost[seen], bins=(60, 60))
heading = prior.heading & seen
fig = go.Figure(go.Heatmap(x=10 ** ((x_edges[:-1] + x_edges[1:]) / 2), y=(y_edges[:-1] + y_edges[1:]) / 2,
                           z=np.where(density.T > 0, np.log10(np.maximum(density.T, 1)).round(3), np.nan),
                           colorscale=[[0, "#c6dbef"], [1, "#08306b"]],
                           colorbar={"title": "tokens per cell", "tickvals": [0, 1, 2, 3], "ticktext": ["1", "10", "100", "1000"]},
                           customdata=density.T.astype(int), hovertemplate="count ~%{x:.3g}, cost ~%{y:.2f}: %{customdata:.0f} tokens<extra></extra>",
                           name="seen tokens"))
fig.add_scatter(x=counts[heading], y=cost[heading], mode="markers", marker={"size": 7, "color": "red"},
                name=f"heading-like tokens (n = {heading.sum()})", text=[prior.tokens[i] for i in np.flatnonzero(heading)])
fig.update_layout(title=f"Cost against corpus frequency<br><sup>n = {seen.sum():,} tokens seen in the training split, "
                        f"counted in a 60 x 60 grid; {int((~seen).sum()):,} unseen tokens not shown</sup>",
                  xaxis={"type": "log", "title": "count in WikiText-2 train (tokens, log scale)"}, yaxis_title=COST,
                  showlegend=True, legend={"x": 0.55, "y": 0.98})
save_figure(fig, cfg, "01_prior_vs_frequency", "01_synthetic_energy_prior")
fig.show()

# %%
cheap, dear = order[:100], order[::-1][:100]
fig = go.Figure([go.Box(y=cost[cheap], name="100 cheapest tokens", boxpoints="all", text=[prior.tokens[i] for i in cheap]),
                 go.Box(y=cost[dear], name="100 most expensive tokens", boxpoints="all", text=[prior.tokens[i] for i in dear])])
fig.update_layout(title="Prior cost of the 100 cheapest and 100 most expensive tokens<br><sup>n = 100 tokens per box "
                        "(points: each token, text on hover); box: median and quartiles</sup>",
                  xaxis_title=f"token group (of {cost.size:,})", yaxis_title=COST, showlegend=False)
save_figure(fig, cfg, "01_prior_extremes", "01_synthetic_energy_prior")
fig.show()

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
short_frequent = seen & (prior.lengths <= 3) & (counts >= np.quantile(counts[seen], 0.99))
long_rare = (counts <= 2) & (prior.lengths >= 8)
print(
    f"Measured on the {profile_label(cfg)} (the prior uses the whole training split on every profile): "
    f"the {cost.size:,}-token prior has mean {cost.mean():.6f} and minimum {cost.min():.2f}. Frequent short tokens "
    f"cost {cost[short_frequent].mean():.2f} on average, rare long ones {cost[long_rare].mean():.2f}; "
    f"{prior.heading.sum()} heading-like tokens carry the +{cfg.prior.heading_penalty} penalty."
)
