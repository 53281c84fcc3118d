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
# # 00 · The GPT-2 backbone
#
# Offline profiles (`smoke`, `gpu`) have no pretrained GPT-2, so this notebook trains the GPT-2
# architecture from scratch on WikiText-2 (LM loss, AdamW, warm-up + cosine schedule) and saves it
# with `save_pretrained`. Every later stage loads it through `from_pretrained(folder)`, the same path
# that loads `gpt2` from the Hub on the `paper` profile. The run resumes from its last checkpoint if
# interrupted; a finished backbone made from the same config and corpus is reused.

# %% tags=["parameters"]
profile = "smoke"
overrides = {}

# %%
from metabolic.report.notebook import profile_label, setup

cfg = setup(profile, overrides)
print("profile:", profile_label(cfg))

# %%
import time

from metabolic.pipeline import stages

t0 = time.perf_counter()
data = stages.corpus(cfg)
backbone = stages.pretrain_backbone(cfg)
print(f"wall time (not checked): {time.perf_counter() - t0:.1f} s")

# %%
# NBVAL_CHECK_OUTPUT
from metabolic.report import backbone_figures
from metabolic.report.figures import save_figure

print("\n".join(backbone_figures.summary(data, backbone)))

# %%
if backbone.metrics:
    fig = backbone_figures.pretrain_curve(backbone.metrics, cfg.profile)
    save_figure(fig, cfg, "00_pretrain_curve", "00_pretrain_backbone")
    fig.show()

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
print(backbone_figures.conclusion(backbone, cfg, profile_label(cfg)))
