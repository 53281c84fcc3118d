"""Tables, figures and summaries of notebook 05 (e-tokens): the per-cell table, prefill vs decode, J per
token against batch size, the semantic cost -> joules fit with its joule budgets, and the run's summary.

Every function takes the merged rows (`metabolic.energy.measurement.summarise`) or the joule fit as the
e-token stage stored it, and labels timings as timings: where no energy counter was read (no GPU, no
readable RAPL) nothing here is called energy, and no sentence states an effect that no row shows.
"""

from __future__ import annotations

from typing import Any, Sequence

from metabolic.energy.joules import LinearFit
from metabolic.energy.measurement import window_resolution_note

CELL_COLUMNS = ["gpu_name", "model", "path", "task", "batch_size", "input_tokens", "output_tokens"]


def energy_status_line(machine: dict[str, Any]) -> str:
    """One line: what this machine measured energy with, or that it could read no counter (timings only).

    The reasons (`machine["energy_missing"]`) differ between machines, so they are not in this line.

    >>> energy_status_line({"device": "cpu", "energy_source": "unavailable", "energy_counters": "none"})
    'this machine: cpu; no energy counter readable (no GPU; RAPL, the CPU package and DRAM counters, not readable): timings only, no joules'
    """
    if machine["energy_source"] != "unavailable":
        return f"this machine: {machine['device']}; energy measured by zeus: {machine['energy_counters']}"
    what = "the GPU's NVML counter not readable" if machine["device"] == "cuda" else \
        "no GPU; RAPL, the CPU package and DRAM counters, not readable"
    return f"this machine: {machine['device']}; no energy counter readable ({what}): timings only, no joules"


def etoken_view(table, has_energy: bool):
    """The columns notebook 05 shows: e-tokens and joules per query when measured, else wall times; each
    median with its inter-quartile range over the repeats."""
    if has_energy:
        return table[CELL_COLUMNS + ["repeats", "energy_source", "total_j", "total_j_iqr", "active_text", "decode_text",
                                     "e_in_wh", "e_out_wh", "j_per_output_token", "j_per_output_token_iqr",
                                     "output_tokens_per_s", "window_s_min"]]
    return table[CELL_COLUMNS + ["repeats", "total_s_per_query", "total_s_per_query_iqr", "prefill_s_per_query",
                                 "decode_s_per_query", "output_tokens_per_s", "output_tokens_per_s_iqr", "window_s_min"]]


def batching_text(table, has_energy: bool, measured_by: str) -> str:
    """What the rows show about batch size, per model and path: the median per query (joules per output
    token where measured, else seconds per query) at each larger batch size against batch 1, as the range
    over tasks. Nothing is said about energy where no row has it."""
    y, what = ("j_per_output_token", "J per output token") if has_energy else ("total_s_per_query", "time per query")
    sizes = sorted(int(b) for b in table["batch_size"].unique())
    if len(sizes) < 2 or sizes[0] != 1:
        return f"Measured by {measured_by} at batch size(s) {', '.join(map(str, sizes))} only: no batching comparison."
    lines = [f"{what} at batch B against batch 1, as measured by {measured_by} (medians over repeats; their "
             f"IQRs are in the table above; the range is over tasks):"]
    for (model, path), cells in table[table[y].notna()].groupby(["model", "path"], sort=True):
        by = cells.set_index(["task", "batch_size"])[y]
        parts = []
        for b in sizes[1:]:
            ratios = [by[(t, b)] / by[(t, 1)] for t in cells["task"].unique() if (t, b) in by and (t, 1) in by]
            if ratios:
                parts.append(f"B={b}: {min(ratios):.2f}x-{max(ratios):.2f}x ({len(ratios)} tasks)")
        lines.append(f"  {model} ({path} path): " + ("; ".join(parts) or "no task measured at batch 1 and a larger batch"))
    if not has_energy:
        lines.append("No row has energy, so nothing here says how batch size changes energy.")
    return "\n".join(lines)


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
                  title=f"Prefill vs decode per query at batch {batch}, default path, every model measured "
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
        measured = table[table["total_j"].notna()]
        gpus = ", ".join(sorted(measured["gpu_name"].fillna("CPU package + DRAM through RAPL").unique()))
        batches = ", ".join(str(int(b)) for b in sorted(table["batch_size"].unique()))
        lines = [f"Measured energy ({gpus}): e-tokens for {table['model'].nunique()} model(s) x {table['task'].nunique()} "
                 f"tasks, the prefill/decode split and batch sizes {batches}; every row names its GPU, batch size and window "
                 f"length (shortest phase window {table['window_s_min'].min():.2f} s). {window_resolution_note(energy_rows)}."]
        if "skipped" in fit:
            lines.append("The joule fit (semantic cost -> joules) and joule budgets were not measured in these results.")
        else:
            hits = ", ".join(f"{b['hit10']:.0%} at {b['budget_j']:.3g} J ({b['predictor']})" for b in fit["budgets"])
            lines.append(f"Joule fit on {fit['model']} (batch 1): R^2 {fit['fit_tokens']['r2']:.2f} for J ~ tokens, "
                         f"{fit['fit_cost']['r2']:.2f} for J ~ semantic cost; joule-budget Hit@10%: {hits} (goal >= 90%).")
        return "\n".join(lines)
    batches = ", ".join(str(int(b)) for b in sorted(own["batch_size"].unique())) if len(own) else "none"
    repeats = int(own.groupby(["model", "path", "task", "batch_size"]).size().min()) if len(own) else 0
    return (f"Run on the {label} on a machine where no energy counter could be read (no GPU; RAPL not readable), and "
            f"no measurement with energy is committed yet: this notebook reports no joules and no e-tokens. It shows "
            f"wall times and tokens/s per phase for {own['model'].nunique() if len(own) else 0} model(s) x "
            f"{own['task'].nunique() if len(own) else 0} tasks at batch sizes {batches}, each from {repeats} or more "
            f"repeats (median and IQR), which say nothing about energy. Left to measure where a counter is readable: "
            f"on a GPU (scripts/gpu_results.sh, then scripts/gpu_etokens.sh), or on a CPU whose RAPL counters are "
            f"readable (this notebook, as it is): the e-token table, prefill vs decode joules, J/token vs batch size, "
            f"the joule fit (semantic cost -> joules) and the joule-budget Hit@10%.")
