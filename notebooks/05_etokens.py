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
# # 05 · e-tokens: measured energy per query, by phase, task, model, batch size and device
#
# A query's energy runs from receiving its text to its last output token: **preprocess**
# (tokenisation), **prefill** (`generate` with one new token, as in the AI Energy Score method) and
# **decode** (the full `generate` minus prefill). Each phase is measured in windows of whole,
# identical calls lasting at least `energy.min_window_s` (a named zeus window, longer than the energy
# counter's update period), repeated, and reported as medians with their inter-quartile range. The idle
# device is measured before each cell; an active energy (or decode energy) the meter cannot resolve is
# shown as "below resolution (< x J)", never as a negative number.
#
# `e-token (input) = E_Wh / T_in x 1000` and `e-token (output) = E_Wh / T_out x 1000`, with
# `e_in / e_out = T_out / T_in` checked on every row. Tasks follow the note's I/O ratios:
# classification 1:0.1, chat 1:1, reasoning 1:5, creative writing 1:50.
#
# **Energy is measured wherever a counter can be read**, through zeus (`metabolic.energy.meter`): the
# GPU that runs the queries through NVML, or on a CPU run the CPU package and DRAM through RAPL
# (`/sys/class/powercap/intel-rapl`, which most Linux laptops and workstations expose, often readable
# by root only). Where no counter can be read (no GPU, RAPL hidden as in containers and on CI) the
# rows are wall times and tokens/s, labelled as timings, and the first line below says which
# counters were missing. GPU runs are committed under `results/etokens/<gpu>/` (a slice made by
# `scripts/gpu_results.sh`, the rest of the grid by `scripts/gpu_etokens.sh`). No number here is an
# estimate presented as a measurement; the plan's time estimate is labelled as one.

# %% tags=["parameters"]
profile = "smoke"
overrides = {}

# %%
from metabolic.report.notebook import profile_label, setup

cfg = setup(profile, overrides)
print("profile:", profile_label(cfg))

# %%
import pandas as pd
from metabolic.core.artefacts import project_root
from metabolic.energy.measurement import joule_fits, merge_results, paths_agree, summarise, window_resolution_note
from metabolic.pipeline import stages
from metabolic.report import etoken_figures as ef
from metabolic.report.figures import save_figure

res = stages.measure_etokens(cfg)
committed_root = project_root() / "results" / "etokens"
committed = merge_results(committed_root)  # GPU runs committed to the repository
rows = pd.DataFrame(res.rows)
own_file = (res.folder.name + "/") if res.folder is not None else "unfinished/"
own_rows = [r for r in res.rows if r["results_file"].startswith(own_file)] if res.measured_here else []
own = pd.DataFrame(own_rows)

# %%
# NBVAL_CHECK_OUTPUT
print(ef.energy_status_line(res.machine))
print(f"rows measured here: {len(own)} (models x paths x tasks x batch sizes x {cfg.energy.repeats} repeats)"
      + ("" if res.complete else "; the grid is unfinished: rerun to measure its next part"))
if len(own):
    print("tasks (T_in -> T_out):", ", ".join(sorted({f"{t} {i}->{o}" for t, i, o in own[["task", "input_tokens", "output_tokens"]].itertuples(index=False)})))
    print("models:", ", ".join(sorted(own["model"].unique())), "| paths:", ", ".join(sorted(own["path"].unique())),
          "| batch sizes:", ", ".join(str(b) for b in sorted(own["batch_size"].unique())))
for s in res.skipped:
    print(f"skipped {s['model']}: {s['reason'][:90]}")
print("devices in this profile's merged table:", ", ".join(sorted(set(rows["gpu_name"].fillna("cpu")))) if len(rows) else "none")

# %%
# the counters this machine could not read, and why (machine-specific, so not a checked output)
print("counters not read:", res.machine["energy_missing"] or "none")

# %% [markdown]
# ## GPU measurements committed to the repository
#
# `results/etokens/<gpu>/` holds the rows (and, once its grid is complete, the machine records and
# joule fit) of each GPU's run of the `gpu` profile's grid (see `results/etokens/README.md`).

# %%
# NBVAL_CHECK_OUTPUT
from metabolic.report import gpu_results

print(gpu_results.overview("etokens"))
if committed:
    gpus = sorted({r["gpu_name"] for r in committed if r.get("gpu_name")})
    print(f"committed GPU results: {len(committed)} rows from {len({r['results_file'] for r in committed})} run(s) on "
          f"{', '.join(gpus)}; {window_resolution_note(committed)}")
else:
    print("results/etokens/ holds no rows yet, so this notebook shows no joules and no e-tokens.")

# %% [markdown]
# ## The GPU grid, as planned for one H100
#
# What the `gpu` profile measures and how long it should take on one H100, from the throughputs
# measured there in issue 14 (an estimate, not a measurement; the compile times are assumptions).
# Every unit's record keeps its estimate beside its measured wall time.

# %%
# NBVAL_CHECK_OUTPUT
from metabolic.core.profiles import load_config

print(stages.etokens_plan(load_config("gpu")).describe())

# %% [markdown]
# ## e-tokens by task x model x device
#
# Medians over repeats with their inter-quartile range (`_iqr`); every row names its device, batch
# size and shortest window. Measured energy comes from the committed GPU runs and from this machine
# when one of its counters is readable; without any, the table holds this machine's wall time per
# query instead (not energy).

# %%
committed_files = {r["results_file"] for r in committed}  # a committed run also in data/ counts once
energy_rows = [r for r in committed + [r for r in res.rows if r["results_file"] not in committed_files]
               if r.get("total_j") is not None]
has_energy = bool(energy_rows)
table = pd.DataFrame(summarise(energy_rows if has_energy else res.rows))
print(f"table: {len(table)} cells from {len(energy_rows) if has_energy else len(res.rows)} rows")
agree = paths_agree(energy_rows if has_energy else res.rows)
if agree["cells_with_several_paths"]:
    print(f"greedy outputs identical across serving paths in {agree['identical_outputs']} of "
          f"{agree['cells_with_several_paths']} cells measured on both")
if has_energy:
    print("Wh per 1,000 tokens (e-tokens) and joules per query, measured:")
else:
    print("Wall times per query (seconds) and tokens/s: timings only, NOT energy (no energy counter readable).")
ef.etoken_view(table, has_energy).sort_values(ef.CELL_COLUMNS).round(6)

# %% [markdown]
# ## Prefill vs decode

# %%
fig = ef.prefill_decode_figure(table, has_energy)
save_figure(fig, cfg, "05_prefill_decode", "05_etokens")
fig.show()

# %% [markdown]
# ## Batch size: what the rows show
#
# J per output token where energy was measured, else tokens/s, at every batch size this profile ran
# (`energy.batch_sizes`); the lines under the figure compare each batch size with batch 1, computed
# from the same rows, and say nothing about energy where no row has it.

# %%
fig = ef.batch_size_figure(table, has_energy)
save_figure(fig, cfg, "05_batch_size", "05_etokens")
fig.show()
measured_by = "the committed and this machine's energy rows" if has_energy else \
    f"this machine ({res.machine['cpu']}, {res.machine['cpu_threads']} threads), {profile_label(cfg)}"
print(ef.batching_text(table, has_energy, measured_by))

# %% [markdown]
# ## Semantic cost -> joules: the joule fit, and physical (joule) budgets

# %%
joule_fit = next((c for c in joule_fits(committed_root) if "skipped" not in c), res.joule_fit)
if "skipped" in joule_fit:
    print("joule fit not measured (here or in the committed results):", joule_fit["skipped"].split(":")[0])
    print("On a GPU this cell plots per-request joules against semantic cost (and tokens), with the fitted lines,"
          " R^2 and residuals; then the Hit@10% of generation stopped within joule budgets.")
else:
    print(ef.joule_fit_text(joule_fit))
    fig = ef.joule_fit_figure(joule_fit)
    save_figure(fig, cfg, "05_cost_to_joules", "05_etokens")
    fig.show()
    print(ef.joule_budget_table(joule_fit).round(4).to_string(index=False))

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
print(ef.etokens_summary(profile_label(cfg), table, energy_rows, has_energy, joule_fit, own))
