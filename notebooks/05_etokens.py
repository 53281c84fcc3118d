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
# # 05 · e-tokens: measured energy per query, by phase, task, model, batch size and GPU
#
# A query's energy runs from receiving its text to its last output token: **preprocess**
# (tokenisation), **prefill** (`generate` with one new token, as in the AI Energy Score method) and
# **decode** (the full `generate` minus prefill). Each phase is measured in windows of whole,
# identical calls lasting at least `energy.min_window_s` (NVML's counter moves in ~100 ms steps),
# repeated, and reported as medians with their inter-quartile range. The idle GPU is measured before
# each cell; an active energy (or decode energy) the meter cannot resolve is shown as
# "below resolution (< x J)", never as a negative number.
#
# `e-token (input) = E_Wh / T_in x 1000` and `e-token (output) = E_Wh / T_out x 1000`, with
# `e_in / e_out = T_out / T_in` checked on every row. Tasks follow the note's I/O ratios:
# classification 1:0.1, chat 1:1, reasoning 1:5, creative writing 1:50.
#
# **Without a GPU there is no energy measurement.** Energy comes from GPU runs committed under
# `results/etokens/<gpu>/` (a slice made by `scripts/gpu_results.sh`, the rest of the grid by
# `scripts/gpu_etokens.sh`); this machine adds what it can measure
# itself (on a CPU: wall times and tokens/s, labelled as timings). No number here is an estimate
# presented as a measurement; the plan's time estimate is labelled as one.

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
from metabolic.energy.measurement import calibrations, merge_results, paths_agree, summarise, window_resolution_note
from metabolic.pipeline import stages

res = stages.measure_etokens(cfg)
committed_root = project_root() / "results" / "etokens"
committed = merge_results(committed_root)  # GPU runs committed to the repository
rows = pd.DataFrame(res.rows)
here = "energy measured" if res.energy_available else "energy UNAVAILABLE"
own_file = (res.folder.name + "/") if res.folder is not None else "unfinished/"
own_rows = [r for r in res.rows if r["results_file"].startswith(own_file)] if res.measured_here else []
own = pd.DataFrame(own_rows)

# %%
# NBVAL_CHECK_OUTPUT
print(f"this machine: {res.machine['device']}, GPU {res.machine['gpu_name']}, energy source: {res.machine['energy_source']} ({here})")
if not res.energy_available:
    print("why:", res.machine["energy_unavailable_reason"].split(" (")[0])
print(f"rows measured here: {len(own)} (models x paths x tasks x batch sizes x {cfg.energy.repeats} repeats)"
      + ("" if res.complete else "; the grid is unfinished: rerun to measure its next part"))
if len(own):
    print("tasks (T_in -> T_out):", ", ".join(sorted({f"{t} {i}->{o}" for t, i, o in own[["task", "input_tokens", "output_tokens"]].itertuples(index=False)})))
    print("models:", ", ".join(sorted(own["model"].unique())), "| paths:", ", ".join(sorted(own["path"].unique())),
          "| batch sizes:", ", ".join(str(b) for b in sorted(own["batch_size"].unique())))
for s in res.skipped:
    print(f"skipped {s['model']}: {s['reason'][:90]}")
print("devices in this profile's merged table:", ", ".join(sorted(set(rows["gpu_name"].fillna("cpu (no energy)")))) if len(rows) else "none")

# %% [markdown]
# ## GPU measurements committed to the repository
#
# `results/etokens/<gpu>/` holds the rows (and, once its grid is complete, the machine records and
# calibration) of each GPU's run of the `gpu` profile's grid (see `results/etokens/README.md`).

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
# ## e-tokens by task x model x GPU
#
# Medians over repeats; every row names its GPU, batch size and shortest window. Measured energy
# comes from the committed GPU runs and from this machine when it has a GPU; without any, the
# table holds this machine's CPU wall time per query instead (not energy).

# %%
committed_files = {r["results_file"] for r in committed}  # a committed run also in data/ counts once
energy_rows = [r for r in committed + [r for r in res.rows if r["results_file"] not in committed_files]
               if r.get("total_j") is not None]
has_energy = bool(energy_rows)
table = pd.DataFrame(summarise(energy_rows if has_energy else res.rows))
cols = ["gpu_name", "model", "path", "task", "batch_size", "input_tokens", "output_tokens"]
print(f"table: {len(table)} cells from {len(energy_rows) if has_energy else len(res.rows)} rows")
agree = paths_agree(energy_rows if has_energy else res.rows)
if agree["cells_with_several_paths"]:
    print(f"greedy outputs identical across serving paths in {agree['identical_outputs']} of "
          f"{agree['cells_with_several_paths']} cells measured on both")
if has_energy:
    view = table[cols + ["total_j", "active_text", "decode_text", "e_in_wh", "e_out_wh", "j_per_output_token",
                         "output_tokens_per_s", "window_s_min"]]
    print("Wh per 1,000 tokens (e-tokens) and joules per query, measured:")
else:
    view = table[cols + ["total_s_per_query", "prefill_s_per_query", "decode_s_per_query", "output_tokens_per_s", "window_s_min"]]
    print("CPU wall times per query (seconds) and tokens/s: timings only, NOT energy (no GPU energy measured).")
view.sort_values(cols).round(6)

# %% [markdown]
# ## Prefill vs decode

# %%
import plotly.express as px
from metabolic.report.figures import save_figure

# One batch size (the smallest), so that stacked bars are the phases of one query, never batch sizes added up.
batch = int(table["batch_size"].min())
split = table[(table["path"] == "default") & (table["batch_size"] == batch)].copy()
if has_energy:
    value_cols, unit = ["preprocess_j", "prefill_j", "decode_j"], "J per query (measured; decode blank when below resolution)"
else:
    value_cols, unit = ["prefill_s_per_query", "decode_s_per_query"], "CPU seconds per query (timing, not energy)"
long = split.melt(id_vars=["gpu_name", "model", "task", "batch_size"], value_vars=value_cols, var_name="phase", value_name="value")
long["phase"] = long["phase"].str.replace(r"_(j|s_per_query)$", "", regex=True)  # preprocess, prefill, decode
long["gpu_name"] = long["gpu_name"].fillna("cpu")
fig = px.bar(long, x="task", y="value", color="phase", facet_col="model", facet_row="gpu_name", barmode="stack",
             hover_data=["batch_size"], labels={"value": unit, "task": "task", "phase": "phase"},
             title=f"Prefill vs decode per query at batch {batch}, default path, every model incl. MetabolicGPT-2 "
                   f"({'energy' if has_energy else 'CPU timings, no energy here'})")
save_figure(fig, cfg, "05_prefill_decode", "05_etokens")
fig.show()

# %% [markdown]
# ## J per output token against batch size
#
# Batching shares each decode step's weight reads across queries, so J/token falls several fold.

# %%
y = "j_per_output_token" if has_energy else "output_tokens_per_s"
label = "J per output token (measured)" if has_energy else "output tokens/s on CPU (timing, not energy)"
by_batch = table.copy()
by_batch["series"] = by_batch["model"] + " · " + by_batch["path"] + " · " + by_batch["gpu_name"].fillna("cpu")
fig = px.line(by_batch.sort_values("batch_size"), x="batch_size", y=y, color="series", facet_col="task", markers=True,
              log_y=True, labels={y: label, "batch_size": "batch size"},
              title=f"{label} against batch size")
save_figure(fig, cfg, "05_batch_size", "05_etokens")
fig.show()

# %% [markdown]
# ## Semantic cost -> joules calibration, and physical (joule) budgets

# %%
calib = next((c for c in calibrations(committed_root) if "skipped" not in c), res.calibration)
if "skipped" in calib:
    print("calibration not measured (here or in the committed results):", calib["skipped"].split(":")[0])
    print("On a GPU this cell plots per-request joules against semantic cost (and tokens), with the fitted lines,"
          " R^2 and residuals; then the Hit@10% of generation stopped within joule budgets.")
else:
    import plotly.graph_objects as go

    pts = pd.DataFrame(calib["points"])
    ft, fc = calib["fit_tokens"], calib["fit_cost"]
    print(f"J ~ tokens: R^2 {ft['r2']:.3f}, J = {ft['intercept']:.3g} + {ft['coef'][0]:.3g} T_in + {ft['coef'][1]:.3g} T_out; "
          f"RMSE {pd.Series(ft['residuals']).pow(2).mean() ** 0.5:.3g} J")
    print(f"J ~ semantic cost: R^2 {fc['r2']:.3f}, J = {fc['intercept']:.3g} + {fc['coef'][0]:.3g} x cost "
          f"(cost: {calib['semantic_cost']}); model {calib['model']}, windows >= {calib['min_window_s']} s, batch 1")
    fig = go.Figure()
    fig.add_scatter(x=pts["semantic_cost"], y=pts["energy_j"], mode="markers", name="requests (measured J)")
    xs = [pts["semantic_cost"].min(), pts["semantic_cost"].max()]
    fig.add_scatter(x=xs, y=[fc["intercept"] + fc["coef"][0] * x for x in xs], mode="lines", name=f"fit, R^2 {fc['r2']:.2f}")
    fig.update_layout(title="Per-request joules against semantic cost", xaxis_title="semantic cost", yaxis_title="J per request")
    save_figure(fig, cfg, "05_cost_to_joules", "05_etokens")
    fig.show()
    hits = pd.DataFrame([{k: b[k] for k in ("predictor", "fraction", "budget_j", "hit10")} | {"median_measured_j": pd.Series(b["measured_j"]).median()}
                         for b in calib["budgets"]])
    print(hits.round(4).to_string(index=False))

# %% [markdown]
# ## What this run shows

# %%
# NBVAL_CHECK_OUTPUT
if has_energy:
    gpus = ", ".join(sorted(table.loc[table["total_j"].notna(), "gpu_name"].unique()))
    batches = ", ".join(str(int(b)) for b in sorted(table["batch_size"].unique()))
    print(f"Measured GPU energy ({gpus}): e-tokens for {table['model'].nunique()} model(s) x {table['task'].nunique()} "
          f"tasks, the prefill/decode split and batch sizes {batches}; every row names its GPU, batch size and window "
          f"length (shortest phase window {table['window_s_min'].min():.2f} s). {window_resolution_note(energy_rows)}.")
    if "skipped" in calib:
        print("The semantic-cost -> joules calibration and joule budgets were not measured in these results.")
    else:
        hits = ", ".join(f"{b['hit10']:.0%} at {b['budget_j']:.3g} J ({b['predictor']})" for b in calib["budgets"])
        print(f"Calibration on {calib['model']} (batch 1): R^2 {calib['fit_tokens']['r2']:.2f} for J ~ tokens, "
              f"{calib['fit_cost']['r2']:.2f} for J ~ semantic cost; joule-budget Hit@10%: {hits} (goal >= 90%).")
else:
    print(f"Run on the {profile_label(cfg)} on a machine without a GPU, and no GPU measurement is committed yet: this "
          f"notebook reports no joules and no e-tokens. It shows CPU wall times and tokens/s per phase for "
          f"{own['model'].nunique() if len(own) else 0} model(s) x {own['task'].nunique() if len(own) else 0} tasks, "
          f"which say nothing about GPU energy. Left to measure on a GPU (scripts/gpu_results.sh, then "
          f"scripts/gpu_etokens.sh): the e-token table, "
          f"prefill vs decode joules, J/token vs batch size, the semantic-cost -> joules calibration and the "
          f"joule-budget Hit@10%.")
