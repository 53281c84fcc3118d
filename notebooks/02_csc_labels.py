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
import numpy as np
from IPython.display import HTML, display
from metabolic.csc import analysis as csc_analysis
from metabolic.csc import approx as csc_approx
from metabolic.csc.labeller import CSCLabeller
from metabolic.pipeline import stages
from metabolic.report import csc_figures
from metabolic.report.figures import save_figure

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
examples = ["The future of artificial intelligence depends on energy.", "naïve café – 東京 is a short multi-byte text."]
example_labels = [labeller.label_text(t) for t in examples]
blocks = [csc_figures.csc_tokens_html(tok, ids, c) for ids, c in example_labels]
blocks += [csc_figures.csc_tokens_html(tok, ids, c) for ids, c in list(zip(data.train_ids, data.train_csc))[:2]]
display(HTML("".join(blocks)))

# %%
# NBVAL_CHECK_OUTPUT
for text, (ids, c) in zip(examples, example_labels):
    order = np.argsort(-c)[:3]
    print(f"{text!r}: total {c.sum():.3f}; top tokens", ", ".join(f"{tok.decode([ids[i]])!r} {c[i]:.3f}" for i in order))

# %% [markdown]
# ## Distributions of per-token and total CSC

# %%
fig = csc_figures.csc_distributions(data.train_csc, s, cfg.profile)
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
print(csc_figures.length_effect_text(table, trunc, lengths, len(chosen)))

# %%
fig = csc_figures.length_effect_figure(table, trunc, lengths, len(chosen))
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
fig = csc_figures.approximations_figure(exact, masked, grad, speed)
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
    fig = csc_figures.encoder_agreement_figure(a_minilm, a_other, [tok.decode([t]) for x in abl for t in x], ablation_encoder)
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
for run in gpu_results.committed("budgets", profile="gpu"):
    if (stage := run.get("csc_stage")) and stage.get("seconds"):
        print(f"{run['gpu']}: the gpu profile's csc stage labelled {stage['n_train']:,} + {stage['n_valid']:,} texts "
              f"({stage['n_labels']:,} training tokens) in {stage['seconds']:.0f} s, encoder loading included")

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
print(csc_figures.csc_summary(profile_label(cfg), len(data.train_ids), cfg.corpus.seq_len, s, table, trunc, lengths,
                              len(chosen), len(seqs), fid))
