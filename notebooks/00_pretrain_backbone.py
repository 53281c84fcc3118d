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
print(f"WikiText-2 source: {data.source}; texts: train {len(data.train_ids):,}, validation {len(data.valid_ids):,}")
print(f"training tokens (GPT-2 BPE): {sum(map(len, data.train_ids)):,}")
print(f"backbone: {'pretrained here' if backbone.pretrained_here else 'from ' + backbone.path}")
for row in backbone.metrics:
    print(f"step {row['step']:>5}  train loss {row['train_loss']:.3f}  val loss {row['val_loss']:.3f}  val ppl {row['val_ppl']:.1f}")

# %%
from metabolic.report.figures import save_figure
from plotly.subplots import make_subplots

if backbone.metrics:
    steps = [r["step"] for r in backbone.metrics]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=steps, y=[r["train_loss"] for r in backbone.metrics], name="train loss (nats/token)")
    fig.add_scatter(x=steps, y=[r["val_loss"] for r in backbone.metrics], name="validation loss (nats/token)")
    fig.add_scatter(x=steps, y=[r["val_ppl"] for r in backbone.metrics], name="validation perplexity", secondary_y=True,
                    line={"dash": "dot"})
    fig.update_layout(title=f"Backbone pretraining ({cfg.profile})", xaxis_title="optimiser step")
    fig.update_yaxes(title_text="loss (nats/token)", secondary_y=False)
    fig.update_yaxes(title_text="perplexity", type="log", secondary_y=True)
    save_figure(fig, cfg, "00_pretrain_curve", "00_pretrain_backbone")
    fig.show()

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
if backbone.pretrained_here:
    last = backbone.metrics[-1]
    print(
        f"On the {profile_label(cfg)}, a GPT-2 of {cfg.backbone.n_layer} layers x {cfg.backbone.n_embd} "
        f"was trained for {last['step']} steps ({last['tokens_seen']:,} tokens) and reached validation "
        f"perplexity {last['val_ppl']:.1f} on {cfg.backbone.max_eval_blocks} validation blocks of "
        f"{cfg.backbone.block_size} tokens. It is saved at data/{cfg.profile}/backbone/ and loads with from_pretrained."
    )
else:
    print(f"On the {profile_label(cfg)}, the backbone is {backbone.path!r} from the Hub or a folder; nothing was trained here.")
