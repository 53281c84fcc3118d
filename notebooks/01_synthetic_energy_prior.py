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
from metabolic.pipeline import stages
from metabolic.report import prior_figures as pf
from metabolic.report.figures import save_figure

NB = "01_synthetic_energy_prior"
prior = stages.energy_prior(cfg).prior

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(pf.summary(prior, cfg.prior)))

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(pf.token_examples(prior)))

# %%
fig = pf.cost_histogram(prior)
save_figure(fig, cfg, "01_prior_histogram", NB)
fig.show()

# %%
# Tokens per (log10 count, cost) cell rather than one point per token; the heading-like tokens (a few
# dozen) stay single points, named on hover.
fig = pf.cost_against_frequency(prior)
save_figure(fig, cfg, "01_prior_vs_frequency", NB)
fig.show()

# %%
fig = pf.extremes_box(prior)
save_figure(fig, cfg, "01_prior_extremes", NB)
fig.show()

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
print(pf.conclusion(prior, cfg.prior, profile_label(cfg)))
