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
import plotly.express as px
import plotly.graph_objects as go
from metabolic.report.figures import save_figure

fig = px.histogram(x=cost, nbins=80, labels={"x": "synthetic cost (vocabulary mean = 1)"}, log_y=True)
fig.add_vline(x=float(cost.mean()), line_dash="dash", annotation_text=f"mean {cost.mean():.2f}")
fig.add_vline(x=float(np.median(cost)), line_dash="dot", annotation_text=f"median {np.median(cost):.2f}",
              annotation_position="bottom right")
fig.update_layout(title=f"Synthetic token-cost prior over the full vocabulary ({cost.size:,} tokens)", yaxis_title="tokens")
save_figure(fig, cfg, "01_prior_histogram", "01_synthetic_energy_prior")
fig.show()

# %%
seen = counts > 0
fig = go.Figure()
fig.add_scattergl(x=counts[seen], y=cost[seen], mode="markers", marker={"size": 3, "opacity": 0.4}, name="seen tokens",
                  text=[prior.tokens[i] for i in np.flatnonzero(seen)])
fig.add_scattergl(x=counts[prior.heading & seen], y=cost[prior.heading & seen], mode="markers",
                  marker={"size": 7, "color": "red"}, name="heading-like")
fig.update_layout(title="Cost against corpus frequency", xaxis={"type": "log", "title": "count in WikiText-2 train"},
                  yaxis_title="synthetic cost")
save_figure(fig, cfg, "01_prior_vs_frequency", "01_synthetic_energy_prior")
fig.show()

# %%
cheap, dear = order[:100], order[::-1][:100]
fig = go.Figure([go.Box(y=cost[cheap], name="100 cheapest"), go.Box(y=cost[dear], name="100 most expensive")])
fig.update_layout(title="Prior cost of the 100 cheapest and 100 most expensive tokens", yaxis_title="synthetic cost")
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
