"""Figures and summaries of notebook 03 (training MetabolicGPT-2): every monitored quantity per epoch, the
loss terms, lambda per cost dimension, the online calibration against held-out texts, and the summary.

Each function reads only the training results (`metabolic.train.loop.TrainResult`: per-epoch metrics and
the calibration points saved beside them) and returns a plotly figure or text.
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from metabolic.model.metabolic_gpt2 import read_training_info
from metabolic.train.loop import CALIBRATION_POINTS, TrainResult

COLOURS = {"faithful": "#1f77b4", "expected-cost": "#d62728"}
# Per-epoch metrics as notebook 03 tabulates them.
METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_ppl", "aux", "err", "lambda", "shape", "target_budget",
                  "achieved_budget", "calib_a", "calib_b", "val_level_rel_err", "balanced_score"]
# (metric, panel title, y-axis title with its unit)
PANELS = [("train_loss", "train loss", "nats/token"), ("val_loss", "val loss", "nats/token"),
          ("val_ppl", "val perplexity", "perplexity"), ("aux", "aux (CSC + vocab-aux)", "loss (MSE)"),
          ("err", "budget error C - B", "proxy units"), ("lambda", "lambda (mean over K)", "dual variable"),
          ("shape", "shape (curriculum factor)", "factor"), ("target_budget", "target budget", "proxy units"),
          ("achieved_budget", "achieved budget (proxy)", "proxy units"), ("calib_a", "calib a", "CSC units"),
          ("calib_b", "calib b", "CSC per proxy unit"), ("val_level_rel_err", "val level error (relative)", "fraction")]
LOSS_TERMS = ["lm", "csc_mse", "lagrangian", "constraint_sq", "entropy", "repetition", "vocab_aux"]


def metrics_table(results: Mapping[str, TrainResult]):
    """Every variant's per-epoch metrics (`METRIC_COLUMNS`), indexed by variant and epoch (a DataFrame)."""
    import pandas as pd

    return pd.concat([pd.DataFrame(r.metrics)[METRIC_COLUMNS].assign(variant=v) for v, r in results.items()]
                     ).set_index(["variant", "epoch"])


def training_curves(results: Mapping[str, TrainResult], profile: str):
    """The monitored quantities of paper V.C per epoch, one panel each, one line per variant."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=3, cols=4, subplot_titles=[t for _, t, _ in PANELS], horizontal_spacing=0.08, vertical_spacing=0.14)
    for i, (key, _, unit) in enumerate(PANELS):
        fig.update_yaxes(title_text=unit, title_font_size=11, title_standoff=2, row=i // 4 + 1, col=i % 4 + 1)
        for variant, result in results.items():
            fig.add_scatter(x=[r["epoch"] for r in result.metrics], y=[r[key] for r in result.metrics], mode="lines+markers",
                            name=variant, legendgroup=variant, showlegend=i == 0, line={"color": COLOURS[variant]},
                            row=i // 4 + 1, col=i % 4 + 1)
    fig.update_xaxes(title_text="epoch", title_font_size=11, title_standoff=2, dtick=1)
    fig.update_annotations(font_size=13)  # the panel titles
    fig.update_layout(title=f"Monitored quantities per epoch (paper V.C), {profile} profile", height=820)
    return fig


def loss_terms_figure(results: Mapping[str, TrainResult]):
    """Each term of eq. (22), unweighted, as its training average per epoch."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(LOSS_TERMS), subplot_titles=LOSS_TERMS)
    for j, term in enumerate(LOSS_TERMS):
        for variant, result in results.items():
            fig.add_scatter(x=[r["epoch"] for r in result.metrics], y=[r[f"train_{term}"] for r in result.metrics],
                            name=variant, legendgroup=variant, showlegend=j == 0, line={"color": COLOURS[variant]},
                            row=1, col=j + 1)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="loss term (unweighted)", col=1)
    fig.update_layout(title="Each term of eq. (22), unweighted, training average per epoch", height=400)
    return fig


def lambda_figure(results: Mapping[str, TrainResult]):
    """The dual variable of every cost dimension over epochs (eq. 23), one line per variant and dimension."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for variant, result in results.items():
        lam = [r["lambda_k"] for r in result.metrics]
        for k in range(len(lam[0])):
            fig.add_scatter(x=[r["epoch"] for r in result.metrics], y=[row[k] for row in lam], mode="lines+markers",
                            name=f"{variant} lambda[{k}]", line={"color": COLOURS[variant], "dash": ["solid", "dash", "dot"][k % 3]})
    fig.update_layout(title="Dual variable per cost dimension over epochs (eq. 23)", xaxis_title="epoch",
                      yaxis_title="lambda_k (dual variable, per budget k)")
    return fig


def last_calibration_points(result: TrainResult) -> tuple[np.ndarray, np.ndarray]:
    """(the total the variant constrains, total CSC) of each validation text after the last epoch."""
    points = json.loads((result.folder / CALIBRATION_POINTS).read_text())
    last = points[str(len(result.metrics))]
    return np.asarray(last["proxy"]), np.asarray(last["csc"])


def calibration_scatter(results: Mapping[str, TrainResult]):
    """Proxy vs CSC totals of the validation texts after the last epoch, with the online calibration line."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=list(results))
    for j, (variant, result) in enumerate(results.items()):
        x, y = last_calibration_points(result)
        row = result.metrics[-1]
        xs = np.linspace(x.min(), x.max(), 20)
        fig.add_scatter(x=x, y=y, mode="markers", name=f"{variant}: validation texts (n = {x.size})", row=1, col=j + 1,
                        marker={"color": COLOURS[variant]})
        fig.add_scatter(x=xs, y=row["calib_a"] + row["calib_b"] * xs, mode="lines", row=1, col=j + 1,
                        name=f"{variant}: calibration a={row['calib_a']:.3f}, b={row['calib_b']:.3f}",
                        line={"color": COLOURS[variant], "dash": "dash"})
    fig.update_xaxes(title_text="proxy total (proxy units)")
    fig.update_yaxes(title_text="total CSC (CSC units)")
    fig.update_layout(title="Proxy vs CSC totals on validation texts, with the online calibration line")
    return fig


def calibration_params_figure(results: Mapping[str, TrainResult]):
    """The calibration's intercept a and slope b over training."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["calib a (intercept)", "calib b (slope)"])
    for variant, result in results.items():
        epochs = [r["epoch"] for r in result.metrics]
        fig.add_scatter(x=epochs, y=[r["calib_a"] for r in result.metrics], name=variant, legendgroup=variant,
                        line={"color": COLOURS[variant]}, row=1, col=1)
        fig.add_scatter(x=epochs, y=[r["calib_b"] for r in result.metrics], name=variant, legendgroup=variant,
                        showlegend=False, line={"color": COLOURS[variant]}, row=1, col=2)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="a (CSC units)", row=1, col=1)
    fig.update_yaxes(title_text="b (CSC per proxy unit)", row=1, col=2)
    fig.update_layout(title="Calibration parameters over training (refitted every train.calib_refit_every steps)")
    return fig


def calibration_text(results: Mapping[str, TrainResult]) -> str:
    """Per variant: the final calibration, the pairs it was fitted on, and Pearson r on the validation texts."""
    lines = []
    for variant, result in results.items():
        x, y = last_calibration_points(result)
        r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
        row = result.metrics[-1]
        lines.append(f"{variant}: a={row['calib_a']:.4f} b={row['calib_b']:.4f} on {row['calib_n']} training pairs; "
                     f"validation Pearson r(proxy, CSC) = {r:.3f}")
    return "\n".join(lines)


def training_summary(label: str, results: Mapping[str, TrainResult]) -> str:
    """Notebook 03's "what this run shows": both variants' best balanced epochs and final calibration slopes."""
    f, e = results["faithful"], results["expected-cost"]
    fb, eb = f.metrics[f.best_epoch - 1], e.metrics[e.best_epoch - 1]
    return (
        f"Measured on the {label}: both variants trained {len(f.metrics)} epochs from the same backbone "
        f"(validation perplexity {f.reference_ppl:.1f} before training). Faithful: best balanced epoch {f.best_epoch}, "
        f"val perplexity {fb['val_ppl']:.1f}, mean relative level error {fb['val_level_rel_err']:.3f}, lambda {fb['lambda']:.4f}. "
        f"Expected-cost: best epoch {e.best_epoch}, val perplexity {eb['val_ppl']:.1f}, level error "
        f"{eb['val_level_rel_err']:.3f}, lambda {eb['lambda']:.4f}. The calibration slope b after training is "
        f"{f.metrics[-1]['calib_b']:.3f} (faithful) and {e.metrics[-1]['calib_b']:.3f} (expected-cost). "
        f"These are teacher-forced training diagnostics, not generation results (notebook 04).\n"
        + " ".join(lambda_note(v, r) for v, r in results.items())
        + "".join(f"\n{note}" for note in [a_mix_note(results)] if note)
    )


def a_mix_note(results: Mapping[str, TrainResult]) -> str:
    """Eq. (14)'s mix each variant's cost warm-up chose by cross-validation over training texts ("" when none ran)."""
    chosen = {v: cv for v, r in results.items() if (cv := read_training_info(r.best_dir).get("a_mix_cv"))}
    if not chosen:
        return ""
    parts = [f"{variant} {cv['a_mix']:g} (mean held-out Spearman by a_mix: "
             + ", ".join(f"{a} {r:.3f}" for a, r in cv["cv_spearman"].items()) + ")" for variant, cv in chosen.items()]
    folds = next(iter(chosen.values()))["folds"]
    return (f"a_mix (eq. 14's share of the per-token-id cost table) chosen by {folds}-fold cross-validation over "
            f"contiguous blocks of training texts: " + "; ".join(parts) + ".")


def lambda_note(variant: str, result: TrainResult) -> str:
    """Whether the budget constraint bound for a variant (lambda > 0 at some epoch), from its metrics."""
    peaks = [max(r["lambda_k"]) for r in result.metrics]
    gaps = ", ".join(f"{r['err']:+.3g}" for r in result.metrics)
    if max(peaks) > 0:
        epoch = int(np.argmax(peaks)) + 1
        return (f"{variant}: lambda rose to {max(peaks):.3g} (largest dimension, epoch {epoch}): its constrained totals "
                f"exceeded their budgets on average in some steps (mean gap C - B per epoch {gaps}).")
    return (f"{variant}: lambda stayed 0: the constraint never bound, its totals were at or below their budgets on "
            f"average in every step (mean gap C - B per epoch {gaps}).")
