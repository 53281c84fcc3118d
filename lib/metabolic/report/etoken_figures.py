"""Tables, figures and summaries of notebook 05 (e-tokens): the per-cell table, prefill vs decode, J per
token against batch size, the semantic cost -> joules fit with its joule budgets, and the run's summary.

Every function takes the merged rows (`metabolic.energy.measurement.summarise`) or the joule fit as the
e-token stage stored it, and labels CPU timings as timings: without a GPU energy meter nothing here is
called energy.
"""

from __future__ import annotations

from typing import Any, Sequence

from metabolic.energy.joules import LinearFit
from metabolic.energy.measurement import window_resolution_note

CELL_COLUMNS = ["gpu_name", "model", "path", "task", "batch_size", "input_tokens", "output_tokens"]


def etoken_view(table, has_energy: bool):
    """The columns notebook 05 shows: e-tokens and joules per query when measured, else CPU wall times."""
    if has_energy:
        return table[CELL_COLUMNS + ["total_j", "active_text", "decode_text", "e_in_wh", "e_out_wh", "j_per_output_token",
                                     "output_tokens_per_s", "window_s_min"]]
    return table[CELL_COLUMNS + ["total_s_per_query", "prefill_s_per_query", "decode_s_per_query", "output_tokens_per_s",
                                 "window_s_min"]]


def prefill_decode_figure(table, has_energy: bool):
    """Per-query phases stacked per task, at the smallest batch size on the default path (never batch sizes added up)."""
    import plotly.express as px

    batch = int(table["batch_size"].min())
    split = table[(table["path"] == "default") & (table["batch_size"] == batch)].copy()
    if has_energy:
        value_cols, unit = ["preprocess_j", "prefill_j", "decode_j"], "J per query (measured; decode blank when below resolution)"
    else:
        value_cols, unit = ["prefill_s_per_query", "decode_s_per_query"], "CPU seconds per query (timing, not energy)"
    long = split.melt(id_vars=["gpu_name", "model", "task", "batch_size"], value_vars=value_cols, var_name="phase",
                      value_name="value")
    long["phase"] = long["phase"].str.replace(r"_(j|s_per_query)$", "", regex=True)  # preprocess, prefill, decode
    long["gpu_name"] = long["gpu_name"].fillna("cpu")
    return px.bar(long, x="task", y="value", color="phase", facet_col="model", facet_row="gpu_name", barmode="stack",
                  hover_data=["batch_size"], labels={"value": unit, "task": "task", "phase": "phase"},
                  title=f"Prefill vs decode per query at batch {batch}, default path, every model incl. MetabolicGPT-2 "
                        f"({'energy' if has_energy else 'CPU timings, no energy here'})")


def batch_size_figure(table, has_energy: bool):
    """J per output token (or, without energy, CPU tokens/s) against batch size, one line per model, path and GPU."""
    import plotly.express as px

    y = "j_per_output_token" if has_energy else "output_tokens_per_s"
    label = "J per output token (measured)" if has_energy else "output tokens/s on CPU (timing, not energy)"
    by_batch = table.copy()
    by_batch["series"] = by_batch["model"] + " · " + by_batch["path"] + " · " + by_batch["gpu_name"].fillna("cpu")
    return px.line(by_batch.sort_values("batch_size"), x="batch_size", y=y, color="series", facet_col="task", markers=True,
                   log_y=True, labels={y: label, "batch_size": "batch size"}, title=f"{label} against batch size")


def fit_of(stored: dict[str, Any]) -> LinearFit:
    """A `LinearFit` from the dict the e-token stage stored (its fields)."""
    return LinearFit(**{**stored, "names": tuple(stored["names"]), "coef": tuple(stored["coef"]),
                        "residuals": tuple(stored["residuals"])})


def joule_fit_text(fit: dict[str, Any]) -> str:
    """The two fits (J ~ tokens, J ~ semantic cost): R^2, coefficients, RMSE, and what was measured."""
    ft, fc = fit["fit_tokens"], fit["fit_cost"]
    return (f"J ~ tokens: R^2 {ft['r2']:.3f}, J = {ft['intercept']:.3g} + {ft['coef'][0]:.3g} T_in + {ft['coef'][1]:.3g} T_out; "
            f"RMSE {fit_of(ft).rmse:.3g} J\n"
            f"J ~ semantic cost: R^2 {fc['r2']:.3f}, J = {fc['intercept']:.3g} + {fc['coef'][0]:.3g} x cost "
            f"(cost: {fit['semantic_cost']}); model {fit['model']}, windows >= {fit['min_window_s']} s, batch 1")


def joule_fit_figure(fit: dict[str, Any]):
    """Per-request joules against semantic cost, with the fitted line."""
    import plotly.graph_objects as go

    points, fc = fit["points"], fit["fit_cost"]
    cost = [p["semantic_cost"] for p in points]
    fig = go.Figure()
    fig.add_scatter(x=cost, y=[p["energy_j"] for p in points], mode="markers", name="requests (measured J)")
    xs = [min(cost), max(cost)]
    fig.add_scatter(x=xs, y=[fc["intercept"] + fc["coef"][0] * x for x in xs], mode="lines", name=f"fit, R^2 {fc['r2']:.2f}")
    fig.update_layout(title="Per-request joules against semantic cost", xaxis_title="semantic cost", yaxis_title="J per request")
    return fig


def joule_budget_table(fit: dict[str, Any]):
    """One row per joule budget: predictor, fraction, budget, Hit@10% and the median measured joules (a DataFrame)."""
    import pandas as pd

    return pd.DataFrame([{k: b[k] for k in ("predictor", "fraction", "budget_j", "hit10")}
                         | {"median_measured_j": pd.Series(b["measured_j"]).median()} for b in fit["budgets"]])


def etokens_summary(label: str, table, energy_rows: Sequence[dict], has_energy: bool, fit: dict[str, Any], own) -> str:
    """Notebook 05's "what this run shows": what was measured where, or, without a GPU, what is left to measure."""
    if has_energy:
        gpus = ", ".join(sorted(table.loc[table["total_j"].notna(), "gpu_name"].unique()))
        batches = ", ".join(str(int(b)) for b in sorted(table["batch_size"].unique()))
        lines = [f"Measured GPU energy ({gpus}): e-tokens for {table['model'].nunique()} model(s) x {table['task'].nunique()} "
                 f"tasks, the prefill/decode split and batch sizes {batches}; every row names its GPU, batch size and window "
                 f"length (shortest phase window {table['window_s_min'].min():.2f} s). {window_resolution_note(energy_rows)}."]
        if "skipped" in fit:
            lines.append("The semantic-cost -> joules calibration and joule budgets were not measured in these results.")
        else:
            hits = ", ".join(f"{b['hit10']:.0%} at {b['budget_j']:.3g} J ({b['predictor']})" for b in fit["budgets"])
            lines.append(f"Calibration on {fit['model']} (batch 1): R^2 {fit['fit_tokens']['r2']:.2f} for J ~ tokens, "
                         f"{fit['fit_cost']['r2']:.2f} for J ~ semantic cost; joule-budget Hit@10%: {hits} (goal >= 90%).")
        return "\n".join(lines)
    return (f"Run on the {label} on a machine without a GPU, and no GPU measurement is committed yet: this "
            f"notebook reports no joules and no e-tokens. It shows CPU wall times and tokens/s per phase for "
            f"{own['model'].nunique() if len(own) else 0} model(s) x {own['task'].nunique() if len(own) else 0} tasks, "
            f"which say nothing about GPU energy. Left to measure on a GPU (scripts/gpu_results.sh, then "
            f"scripts/gpu_etokens.sh): the e-token table, "
            f"prefill vs decode joules, J/token vs batch size, the semantic-cost -> joules calibration and the "
            f"joule-budget Hit@10%.")
