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
from metabolic.train import loop as training

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
import pandas as pd

columns = ["epoch", "train_loss", "val_loss", "val_ppl", "aux", "err", "lambda", "shape", "target_budget",
           "achieved_budget", "calib_a", "calib_b", "val_level_rel_err", "balanced_score"]
table = pd.concat([pd.DataFrame(r.metrics)[columns].assign(variant=v) for v, r in results.items()])
# perplexities (~1e3) to 2 decimals: a 4th decimal would be the 8th significant digit, below float32 precision
print(table.set_index(["variant", "epoch"]).round(4).round({"val_ppl": 2}).to_string())

# %% [markdown]
# ## Every monitored quantity over epochs

# %%
import plotly.graph_objects as go
from metabolic.report.figures import save_figure
from plotly.subplots import make_subplots

# (metric, panel title, y-axis title with its unit)
panels = [("train_loss", "train loss", "nats/token"), ("val_loss", "val loss", "nats/token"),
          ("val_ppl", "val perplexity", "perplexity"), ("aux", "aux (CSC + vocab-aux)", "loss (MSE)"),
          ("err", "budget error C - B", "proxy units"), ("lambda", "lambda (mean over K)", "dual variable"),
          ("shape", "shape (curriculum factor)", "factor"), ("target_budget", "target budget", "proxy units"),
          ("achieved_budget", "achieved budget (proxy)", "proxy units"), ("calib_a", "calib a", "CSC units"),
          ("calib_b", "calib b", "CSC per proxy unit"), ("val_level_rel_err", "val level error (relative)", "fraction")]
fig = make_subplots(rows=3, cols=4, subplot_titles=[t for _, t, _ in panels], horizontal_spacing=0.08, vertical_spacing=0.14)
colours = {"faithful": "#1f77b4", "expected-cost": "#d62728"}
for i, (key, _, unit) in enumerate(panels):
    fig.update_yaxes(title_text=unit, title_font_size=11, title_standoff=2, row=i // 4 + 1, col=i % 4 + 1)
    for variant, result in results.items():
        fig.add_scatter(x=[r["epoch"] for r in result.metrics], y=[r[key] for r in result.metrics], mode="lines+markers",
                        name=variant, legendgroup=variant, showlegend=i == 0, line={"color": colours[variant]},
                        row=i // 4 + 1, col=i % 4 + 1)
fig.update_xaxes(title_text="epoch", title_font_size=11, title_standoff=2, dtick=1)
fig.update_annotations(font_size=13)  # the panel titles
fig.update_layout(title=f"Monitored quantities per epoch (paper V.C), {cfg.profile} profile", height=820)
save_figure(fig, cfg, "03_training_curves", "03_train_metabolic")
fig.show()

# %%
terms = ["lm", "csc_mse", "lagrangian", "constraint_sq", "entropy", "repetition", "vocab_aux"]
fig = make_subplots(rows=1, cols=len(terms), subplot_titles=terms)
for j, term in enumerate(terms):
    for variant, result in results.items():
        fig.add_scatter(x=[r["epoch"] for r in result.metrics], y=[r[f"train_{term}"] for r in result.metrics],
                        name=variant, legendgroup=variant, showlegend=j == 0, line={"color": colours[variant]},
                        row=1, col=j + 1)
fig.update_xaxes(title_text="epoch")
fig.update_yaxes(title_text="loss term (unweighted)", col=1)
fig.update_layout(title="Each term of eq. (22), unweighted, training average per epoch", height=400)
save_figure(fig, cfg, "03_loss_terms", "03_train_metabolic")
fig.show()

# %%
fig = go.Figure()
for variant, result in results.items():
    lam = [r["lambda_k"] for r in result.metrics]
    for k in range(len(lam[0])):
        fig.add_scatter(x=[r["epoch"] for r in result.metrics], y=[row[k] for row in lam], mode="lines+markers",
                        name=f"{variant} lambda[{k}]", line={"color": colours[variant], "dash": ["solid", "dash", "dot"][k % 3]})
fig.update_layout(title="Dual variable per cost dimension over epochs (eq. 23)", xaxis_title="epoch",
                  yaxis_title="lambda_k (dual variable, per budget k)")
save_figure(fig, cfg, "03_lambda", "03_train_metabolic")
fig.show()

# %% [markdown]
# ## Calibration: proxy cost against CSC
#
# Each point is a validation text after the last epoch: x = the total the variant constrains (faithful:
# realised proxy cost; expected-cost: expected cost), y = its total CSC. The line is the calibration
# (a, b) fitted online on the *training* texts, so the scatter is a held-out check of it.

# %%
import json

import numpy as np

fig = make_subplots(rows=1, cols=2, subplot_titles=list(results))
for j, (variant, result) in enumerate(results.items()):
    points = json.loads((result.folder / training.CALIBRATION_POINTS).read_text())
    last = points[str(len(result.metrics))]
    x, y = np.asarray(last["proxy"]), np.asarray(last["csc"])
    row = result.metrics[-1]
    xs = np.linspace(x.min(), x.max(), 20)
    fig.add_scatter(x=x, y=y, mode="markers", name=f"{variant}: validation texts (n = {x.size})", row=1, col=j + 1,
                    marker={"color": colours[variant]})
    fig.add_scatter(x=xs, y=row["calib_a"] + row["calib_b"] * xs, mode="lines", row=1, col=j + 1,
                    name=f"{variant}: calibration a={row['calib_a']:.3f}, b={row['calib_b']:.3f}",
                    line={"color": colours[variant], "dash": "dash"})
fig.update_xaxes(title_text="proxy total (proxy units)")
fig.update_yaxes(title_text="total CSC (CSC units)")
fig.update_layout(title="Proxy vs CSC totals on validation texts, with the online calibration line")
save_figure(fig, cfg, "03_calibration_scatter", "03_train_metabolic")
fig.show()

# %%
fig = make_subplots(rows=1, cols=2, subplot_titles=["calib a (intercept)", "calib b (slope)"])
for variant, result in results.items():
    epochs = [r["epoch"] for r in result.metrics]
    fig.add_scatter(x=epochs, y=[r["calib_a"] for r in result.metrics], name=variant, legendgroup=variant,
                    line={"color": colours[variant]}, row=1, col=1)
    fig.add_scatter(x=epochs, y=[r["calib_b"] for r in result.metrics], name=variant, legendgroup=variant,
                    showlegend=False, line={"color": colours[variant]}, row=1, col=2)
fig.update_xaxes(title_text="epoch")
fig.update_yaxes(title_text="a (CSC units)", row=1, col=1)
fig.update_yaxes(title_text="b (CSC per proxy unit)", row=1, col=2)
fig.update_layout(title="Calibration parameters over training (refitted every train.calib_refit_every steps)")
save_figure(fig, cfg, "03_calibration_params", "03_train_metabolic")
fig.show()

# %%
# NBVAL_CHECK_OUTPUT
for variant, result in results.items():
    points = json.loads((result.folder / training.CALIBRATION_POINTS).read_text())
    last = points[str(len(result.metrics))]
    x, y = np.asarray(last["proxy"]), np.asarray(last["csc"])
    r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    row = result.metrics[-1]
    print(f"{variant}: a={row['calib_a']:.4f} b={row['calib_b']:.4f} on {row['calib_n']} training pairs; "
          f"validation Pearson r(proxy, CSC) = {r:.3f}")

# %% [markdown]
# ## On a GPU (committed results)
# Both variants trained on the gpu profile by `scripts/gpu_results.sh` (part a), committed under
# `results/budgets/<gpu>/`: the selected epoch's validation perplexity and level error, lambda, the
# calibration slope.

# %%
# NBVAL_CHECK_OUTPUT
from metabolic.report import gpu_results

print(gpu_results.overview("budgets"))
if gpu_rows := gpu_results.rows("budgets", "training"):
    print(pd.DataFrame(gpu_rows).to_string(index=False))

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
f, e = results["faithful"], results["expected-cost"]
fb, eb = f.metrics[f.best_epoch - 1], e.metrics[e.best_epoch - 1]
print(
    f"Measured on the {profile_label(cfg)}: both variants trained {len(f.metrics)} epochs from the same backbone "
    f"(validation perplexity {f.reference_ppl:.1f} before training). Faithful: best balanced epoch {f.best_epoch}, "
    f"val perplexity {fb['val_ppl']:.1f}, mean relative level error {fb['val_level_rel_err']:.3f}, lambda {fb['lambda']:.4f}. "
    f"Expected-cost: best epoch {e.best_epoch}, val perplexity {eb['val_ppl']:.1f}, level error "
    f"{eb['val_level_rel_err']:.3f}, lambda {eb['lambda']:.4f}. The calibration slope b after training is "
    f"{f.metrics[-1]['calib_b']:.3f} (faithful) and {e.metrics[-1]['calib_b']:.3f} (expected-cost). "
    f"These are teacher-forced training diagnostics, not generation results (notebook 04)."
)
