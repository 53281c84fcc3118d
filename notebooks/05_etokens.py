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
# **decode** (the full `generate` minus prefill). Each phase is measured in windows of many identical
# calls (at least `energy.min_window_s`; NVML's counter moves in ~100 ms steps), repeated, and
# reported as medians with their inter-quartile range, next to the GPU's idle power.
#
# `e-token (input) = E_Wh / T_in x 1000` and `e-token (output) = E_Wh / T_out x 1000`, with
# `e_in / e_out = T_out / T_in` checked on every row. Tasks follow the note's I/O ratios:
# classification 1:0.1, chat 1:1, reasoning 1:5, creative writing 1:50.
#
# **Without a GPU there is no energy measurement.** On such a machine this notebook shows CPU wall
# times and tokens/s per phase, labelled as timings, and says what the GPU run would show. No number
# here is an estimate presented as a measurement.

# %% tags=["parameters"]
profile = "smoke"
overrides = {}

# %%
from metabolic.report.notebook import profile_label, setup

cfg = setup(profile, overrides)
print("profile:", profile_label(cfg))

# %%
import pandas as pd
from metabolic.energy.measurement import paths_agree, summarise
from metabolic.pipeline import stages

res = stages.measure_etokens(cfg)
rows = pd.DataFrame(res.rows)
table = pd.DataFrame(summarise(res.rows))
has_energy = bool(table["total_j"].notna().any()) if len(table) else False
here = "energy measured" if res.energy_available else "energy UNAVAILABLE"

# %%
# NBVAL_CHECK_OUTPUT
print(f"this machine: {res.machine['device']}, GPU {res.machine['gpu_name']}, energy source: {res.machine['energy_source']} ({here})")
if not res.energy_available:
    print("why:", res.machine["energy_unavailable_reason"].split(" (")[0])
own = rows[rows["results_file"].str.startswith(res.folder.name)] if res.measured_here else rows
print(f"rows measured here: {len(own) if res.measured_here else 0} (models x paths x tasks x batch sizes x {cfg.energy.repeats} repeats)")
print("tasks (T_in -> T_out):", ", ".join(sorted({f"{t} {i}->{o}" for t, i, o in own[["task", "input_tokens", "output_tokens"]].itertuples(index=False)})))
print("models:", ", ".join(sorted(own["model"].unique())), "| paths:", ", ".join(sorted(own["path"].unique())),
      "| batch sizes:", ", ".join(str(b) for b in sorted(own["batch_size"].unique())))
for s in res.skipped:
    print(f"skipped {s['model']}: {s['reason'][:90]}")
print("devices in the merged table:", ", ".join(sorted(set(rows["gpu_name"].fillna("cpu (no energy)")))))

# %% [markdown]
# ## e-tokens by task x model x GPU
#
# Medians over repeats; every row names its GPU, batch size and shortest window. On a machine
# without energy the same table holds CPU wall time per query instead (not energy).

# %%
cols = ["gpu_name", "model", "path", "task", "batch_size", "input_tokens", "output_tokens"]
print(f"merged table: {len(rows)} rows from {rows['results_file'].nunique()} result file(s)")
agree = paths_agree(res.rows)
if agree["cells_with_several_paths"]:
    print(f"greedy outputs identical across serving paths in {agree['identical_outputs']} of "
          f"{agree['cells_with_several_paths']} cells measured on both")
if has_energy:
    view = table[table["total_j"].notna()][cols + ["total_j", "e_in_wh", "e_out_wh", "j_per_output_token",
                                                   "output_tokens_per_s", "window_s_min"]]
    print("Wh per 1,000 tokens (e-tokens) and joules per query, measured:")
else:
    view = table[cols + ["total_s_per_query", "prefill_s_per_query", "decode_s_per_query", "output_tokens_per_s", "window_s_min"]]
    print("CPU wall times per query (seconds) and tokens/s: timings only, NOT energy (no GPU energy meter here).")
view.sort_values(cols).round(6)

# %% [markdown]
# ## Prefill vs decode

# %%
import plotly.express as px
from metabolic.report.figures import save_figure

split = table[table["path"] == "default"].copy()
if has_energy:
    value_cols, unit = ["preprocess_j", "prefill_j", "decode_j"], "J per query (measured)"
else:
    value_cols, unit = ["prefill_s_per_query", "decode_s_per_query"], "CPU seconds per query (timing, not energy)"
long = split.melt(id_vars=["gpu_name", "model", "task", "batch_size"], value_vars=value_cols, var_name="phase", value_name="value")
long["gpu_name"] = long["gpu_name"].fillna("cpu")
fig = px.bar(long, x="task", y="value", color="phase", facet_col="model", facet_row="gpu_name", barmode="stack",
             hover_data=["batch_size"], labels={"value": unit},
             title=f"Prefill vs decode per query, default path ({'energy' if has_energy else 'CPU timings, no energy here'})")
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
calib = res.calibration
if "skipped" in calib:
    print("calibration not run here:", calib["skipped"].split(":")[0])
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
    print(f"Measured on the {profile_label(cfg)} with GPU energy ({gpus}): e-tokens for "
          f"{table['model'].nunique()} model(s) x {table['task'].nunique()} tasks, the prefill/decode split and batch "
          f"sizes {batches}; every row names its GPU, batch size and window length (shortest phase window "
          f"{table['window_s_min'].min():.2f} s).")
    if "skipped" in calib:
        print("The semantic-cost -> joules calibration and joule budgets were not measured in these results.")
    else:
        hits = ", ".join(f"{b['hit10']:.0%} at {b['budget_j']:.3g} J ({b['predictor']})" for b in calib["budgets"])
        print(f"Calibration on {calib['model']} (batch 1): R^2 {calib['fit_tokens']['r2']:.2f} for J ~ tokens, "
              f"{calib['fit_cost']['r2']:.2f} for J ~ semantic cost; joule-budget Hit@10%: {hits} (goal >= 90%).")
else:
    print(f"Run on the {profile_label(cfg)} on a machine without a GPU: energy is unavailable here, so this notebook "
          f"reports no joules and no e-tokens. It shows CPU wall times and tokens/s per phase for "
          f"{own['model'].nunique()} model(s) x {own['task'].nunique()} tasks, which say nothing about GPU energy. "
          f"Left to measure on a GPU: the e-token table, prefill vs decode joules, J/token vs batch size, the "
          f"semantic-cost -> joules calibration and the joule-budget Hit@10%.")
