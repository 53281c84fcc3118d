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
# # 06 · Live budget explorer
#
# Ask for a semantic budget (CSC units), watch the text that spends it. Run All, then move the **budget**
# slider: the text grows with the budget. The first line of the widget names the model and run it shows: the
# strongest finished run on disk (the cpu run's when `scripts/cpu_budgets.sh` has made one here, else smoke).
#
# - **Scale.** Budgets and true CSC are on the length-aware scale (T x mean CSC per token, Table I's verified
#   rows), where a larger budget buys more text; set `scale = "raw"` below for the scale the model was trained on.
# - **Modes** (the `mode` switch, or the `verified N` slider). `verified N` = 0 is the **proxy** mode: the learned costs decide, for free. EOS is held back
#   until the calibrated learned spend reaches the band's lower edge (budget forcing), steering keeps the
#   pace, and the budget stop ends the text. The shown text is then labelled once, so the gauge shows its
#   **true CSC**, with the labels and seconds that took. `verified N` >= 1 is the **verified** mode: N
#   samples, each cut where the exact labeller says the budget is met, the best in-band one shown.
# - **Gauge.** The bar is what was spent against the budget (the black mark is 100%, the pale green band
#   ±10%, the Hit@10 band); green inside the band, orange below it, red above it.
# - **Stop reasons.** the budget, a sentence end within the band, EOS, or the token cap; a warning when EOS
#   or the cap ended the text before the budget. In verified mode, the outcome (`in band`, `closest`,
#   `unreachable`: no candidate can reach the budget within the context).
# - **Colours.** Tokens are coloured by their learned cost or by their labelled CSC (`colour by`); hover
#   shows both. **low / medium / high** renders the study's three budget levels side by side.
#
# Every control regenerates once per committed change (sliders on release, the prompt and seed boxes on
# Enter); "resample" draws the next seed, and the same seed gives the same sample. Budgets outside the
# slider's range are clamped (the status line says so); bad input shows a one-line error in the widget.

# %% tags=["parameters"]
profile = "strongest"  # the strongest finished run on disk (the cpu run's, else smoke), or a profile's name
overrides = {}
variant = "expected-cost"
# "length": budgets and true CSC as T x mean CSC per token, where a larger budget buys more text (Table I's verified
# rows); "raw": the scale the model was trained on, whose totals are nearly flat in length (README, measured facts)
scale = "length"

# %%
from metabolic.report.notebook import STRONGEST, profile_label, setup, strongest_profile

requested = profile
profile, chosen = strongest_profile(profile)
cfg = setup(profile, overrides)
print("profile:", profile_label(cfg))
print("run:", chosen)

# %%
from metabolic.report.explorer import study_explorer

# The same model and budget levels as notebook 04 (on the length scale: its verified rows' targets); labels by the
# exact CSC labeller. A run found on disk is shown as it is: a stale one is an error, never an hour of rebuilding.
study = study_explorer(cfg, variant, reuse_only=requested == STRONGEST and profile != "smoke", scale=scale)
explorer, levels, how = study.explorer, study.levels, study.calibration_note
low, high = explorer.budget_range
print(f"explorer: {explorer.source}; budget levels " + ", ".join(f"{k} {v:.4f}" for k, v in levels.items()) + " CSC")

# %%
explorer.widget()

# %% [markdown]
# The three budget levels side by side (one seed, the proxy mode), as the **low / medium / high** button shows them:

# %%
from IPython.display import HTML, display

views = explorer.render_levels(cfg.generation.prompts[0], cfg.generation.temperature, explorer.max_new_tokens)
display(HTML(explorer.levels_html(views)))

# %% [markdown]
# The same handler without the browser: each budget level in both modes, then the bad inputs the widget must survive.

# %%
# NBVAL_CHECK_OUTPUT
print(f"variant {variant}; slider range {low:.4f} .. {high:.4f} CSC; calibration: {how}")
for name, view in views.items():
    print(f"proxy, {name}: {view.n_tokens} tokens, true CSC {view.true_csc:.4f} of {view.budget_csc:.4f}, "
          f"stopped by {view.stopped_by}{'; ' + view.warning if view.warning else ''}: {view.text_html.count('<span title')} "
          "tokens coloured")
for label, args in {"empty prompt": ("", 1.0, 1.0, 8), "budget 0": ("Hi", 0.0, 1.0, 8), "budget NaN": ("Hi", float("nan"), 1.0, 8),
                    "prompt beyond the context": ("word " * 2000, 1.0, 1.0, 8)}.items():
    print(f"{label}: {explorer.render(*args).error[:90]}")
print(f"far above the range: {explorer.render('Hi', high * 100, 1.0, 8).status.split('; ')[-1]}")
verified = explorer.render_levels(cfg.generation.prompts[0], cfg.generation.temperature, explorer.max_new_tokens,
                                  candidates=explorer.VERIFIED_N)
for name, view in verified.items():
    print(f"verified N={explorer.VERIFIED_N}, {name}: " + view.status.rsplit("; ", 1)[0])

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
from metabolic.core.budget import in_band



def summary(mode: str, shown: dict) -> str:
    tokens = [v.n_tokens for v in shown.values()]
    rising = all(a < b for a, b in zip(tokens, tokens[1:]))
    hits = sum(bool(in_band(v.true_csc, v.budget_csc, cfg.generation.verified_band)) for v in shown.values())
    return (f"{mode}: {tokens} tokens from low to high budget ({'rising' if rising else 'NOT strictly rising'}), "
            f"{hits} of {len(shown)} in the ±10% band of true CSC")


print(f"On the {profile_label(cfg)}, {scale} scale, one seed. " + summary("Proxy mode", views)
      + f" ({sum(v.warning is not None for v in views.values())} of {len(views)} ended by EOS or the cap before the "
      f"budget). " + summary(f"Verified mode (N = {explorer.VERIFIED_N})", verified) + ". Every bad input above became "
      "a one-line error in the widget instead of an exception; tests/test_explorer_browser.py drives the widget in "
      "JupyterLab in headless Chromium.")
