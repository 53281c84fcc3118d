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
# # 03 · Training MetabolicGPT-2: Lagrangian budgets, dual ascent, online calibration
#
# Two variants on one protocol (same backbone, CSC labels, hyper-parameters, epochs):
#
# * **faithful**, the paper as written (IV.D-IV.F): the cost head reads hidden states that carry the
#   budget bias, and the realised proxy cost of the batch is held to one constant budget vector
#   (the K = 3 targets low/medium/high, one per cost dimension), loosened by a curriculum early on;
# * **expected-cost**, ours: the cost head reads the states *before* the budget bias (the budget
#   cannot change what a token costs), and the constraint acts on the expected cost of the next-token
#   distribution, `sum_t <p(.|x<t, B), C_vocab>`, with a budget per sequence (the text's own total CSC).
#
# Loss (eq. 22): LM + CSC-MSE + lambda^T (C - B) + beta ||C - B||^2 + entropy + repetition + vocab-aux;
# lambda follows projected dual ascent (eq. 23); the affine map proxy -> CSC (eq. 19-21) is refitted
# online. Every quantity of paper V.C is logged per epoch in `data/<profile>/train/<variant>/metrics.jsonl`.
# The "best balanced" epoch minimises `ln(val_ppl / backbone_ppl) + mean relative budget error`
# (see `metabolic.train.loop`).

# %% tags=["parameters"]
profile = "smoke"
overrides = {}

# %%
from metabolic.report.notebook import profile_label, setup

cfg = setup(profile, overrides)
print("profile:", profile_label(cfg))

# %%
import time

from metabolic.model.metabolic_gpt2 import VARIANTS
from metabolic.pipeline import stages
from metabolic.report import training_figures as tf
from metabolic.report.figures import save_figure

t0 = time.perf_counter()
results = stages.train_variants(cfg)
print(f"wall time (not checked): {time.perf_counter() - t0:.1f} s")

# %%
# NBVAL_CHECK_OUTPUT
first = results[VARIANTS[0]]
print(f"targets (CSC, {cfg.csc.scale} scale): {[round(x, 4) for x in first.targets]}; "
      f"backbone validation perplexity {first.reference_ppl:.1f}")
for variant, result in results.items():
    best = result.metrics[result.best_epoch - 1]
    print(f"{variant}: {len(result.metrics)} epochs, best balanced epoch {result.best_epoch} "
          f"(val ppl {best['val_ppl']:.1f}, level error {best['val_level_rel_err']:.3f}, lambda {best['lambda']:.4f})")

# %%
# NBVAL_CHECK_OUTPUT
# perplexities (~1e3) to 2 decimals: a 4th decimal would be the 8th significant digit, below float32 precision
print(tf.metrics_table(results).round(4).round({"val_ppl": 2}).to_string())

# %% [markdown]
# ## Every monitored quantity over epochs

# %%
fig = tf.training_curves(results, cfg.profile)
save_figure(fig, cfg, "03_training_curves", "03_train_metabolic")
fig.show()

# %%
fig = tf.loss_terms_figure(results)
save_figure(fig, cfg, "03_loss_terms", "03_train_metabolic")
fig.show()

# %%
fig = tf.lambda_figure(results)
save_figure(fig, cfg, "03_lambda", "03_train_metabolic")
fig.show()

# %% [markdown]
# ## Calibration: proxy cost against CSC
#
# Each point is a validation text after the last epoch: x = the total the variant constrains (faithful:
# realised proxy cost; expected-cost: expected cost), y = its total CSC. The line is the calibration
# (a, b) fitted online on the *training* texts, so the scatter is a held-out check of it.

# %%
fig = tf.calibration_scatter(results)
save_figure(fig, cfg, "03_calibration_scatter", "03_train_metabolic")
fig.show()

# %%
fig = tf.calibration_params_figure(results)
save_figure(fig, cfg, "03_calibration_params", "03_train_metabolic")
fig.show()

# %%
# NBVAL_CHECK_OUTPUT
print(tf.calibration_text(results))

# %% [markdown]
# ## On a GPU (committed results)
# Both variants trained on the gpu profile by `scripts/gpu_results.sh` (part a), committed under
# `results/budgets/<gpu>/`: the selected epoch's validation perplexity and level error, lambda, the
# calibration slope.

# %%
# NBVAL_CHECK_OUTPUT
import pandas as pd
from metabolic.report import gpu_results

print(gpu_results.overview("budgets", profile="gpu"))
if gpu_rows := gpu_results.rows("budgets", "training", profile="gpu"):
    print(pd.DataFrame(gpu_rows).to_string(index=False))

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
print(tf.training_summary(profile_label(cfg), results))
