"""How well a learned cost model tracks the true CSC on held-out text, and what simple models reach.

Two numbers, both scale-free, on texts the model was not trained on:
- `token_spearman`: Spearman rank correlation between the predicted cost of each token in its
  context and its exact CSC label (on the training scale: raw CSC_t, or T x CSC_t);
- `continuation_r2`: R² of the best affine map from predicted to true CSC totals of each text's
  continuation (the tokens after its first `prompt_tokens`, the same counting rule as Table I).
And two that show a collapse into a token counter: the spread (sd / mean) of the predicted
per-token costs, and R² of predicted continuation totals against the continuation's token count.

`fit_metrics` computes them for any per-token predictions; `cost_model_fit` for a MetabolicGPT-2.
The ceiling (`cost_ceilings`) is what two simple predictors fitted on the same training labels reach
on the same held-out texts, so that a learned model's numbers can be read against what the data and
the backbone allow:
- a ridge probe on the frozen backbone's final hidden states (what the cost head reads), on the
  labels and on their logarithm (ranks are what Spearman scores, and CSC is heavy-tailed), its ridge
  strength chosen by cross-validation over training texts;
- the per-token-id mean of the training labels, backed off to the synthetic prior (scaled to the
  labels' mean) with `pseudo_count` pseudo-observations, so a token never seen costs its prior.
The ceiling of each metric is the best of these predictors. Beside them, as a reference and not
part of the ceiling, `token_count`: one constant cost per token (the mean training label), whose
continuation totals are the continuation's length. It has no Spearman; its continuation R² is what
length alone explains, so a learned model whose R² sits near it adds nothing to a token counter there.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from metabolic.core.errors import DataError
from metabolic.core.stats import bootstrap_interval, r_squared, spearman
from metabolic.csc.dataset import scale_labels
from metabolic.train.losses import LOG_FLOOR  # log(y + LOG_FLOOR x mean label), as L_CSC's log space

PROBE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)  # ridge strengths tried, on standardised features
PROBE_FOLDS = 4  # cross-validation folds over training texts (texts, not tokens, are held out)
BOOTSTRAP_RESAMPLES = 400  # text-level resamples behind each interval (seeded: the same on every run)
CEILING_PREDICTORS = ("ridge_linear", "ridge_log", "token_mean")  # the ceiling; `token_count` is a reference


def fit_metrics(ids_list: Sequence[Sequence[int]], labels: Sequence[np.ndarray], predicted: Sequence[np.ndarray],
                prompt_tokens: int) -> dict[str, float]:
    """The module's four numbers for per-token `predicted` costs against `labels` (both on one scale).

    Only labelled tokens count per token; a text's continuation counts when it has one and every
    token of it is labelled.
    """
    if not (len(ids_list) == len(labels) == len(predicted)):
        raise DataError(f"{len(ids_list)} texts, {len(labels)} label arrays and {len(predicted)} predictions: "
                        f"give one label array and one prediction per text")
    tok_pred, tok_true, cont_pred, cont_true, cont_len = [], [], [], [], []
    for ids, lab, pred in zip(ids_list, labels, predicted):
        lab, pred = np.asarray(lab, dtype=np.float64), np.asarray(pred, dtype=np.float64)
        if lab.shape != (len(ids),) or pred.shape != (len(ids),):
            raise DataError(f"a text of {len(ids)} tokens has {lab.size} labels and {pred.size} predictions: give one per token")
        ok = np.isfinite(lab)
        tok_pred.append(pred[ok])
        tok_true.append(lab[ok])
        tail = slice(prompt_tokens, len(ids))
        if len(ids) > prompt_tokens and np.all(ok[tail]):
            cont_pred.append(pred[tail].sum())
            cont_true.append(lab[tail].sum())
            cont_len.append(len(ids) - prompt_tokens)
    p, t = np.concatenate(tok_pred), np.concatenate(tok_true)
    # 95% intervals by resampling texts (a text's tokens are not independent draws)
    texts = list(zip(tok_pred, tok_true))
    pairs = list(zip(cont_pred, cont_true))
    spearman_ci = bootstrap_interval(lambda g: spearman(np.concatenate([x for x, _ in g]), np.concatenate([y for _, y in g])),
                                     texts, n_boot=BOOTSTRAP_RESAMPLES)
    r2_ci = bootstrap_interval(lambda g: r_squared([x for x, _ in g], [y for _, y in g]), pairs, n_boot=BOOTSTRAP_RESAMPLES)
    return {
        "n_tokens": int(p.size), "n_continuations": len(cont_true),
        "token_spearman": spearman(p, t),
        "token_spearman_ci": list(spearman_ci),
        "continuation_r2": r_squared(cont_pred, cont_true),
        "continuation_r2_ci": list(r2_ci),
        "predicted_cost_cv": float(np.std(p) / np.mean(p)) if p.size and np.mean(p) > 0 else math.nan,
        "true_csc_cv": float(np.std(t) / np.mean(t)) if t.size and np.mean(t) > 0 else math.nan,
        "continuation_r2_vs_token_count": r_squared(cont_len, cont_pred),
    }


@torch.inference_mode()
def predicted_token_costs(model, ids_list: Sequence[Sequence[int]], budget_csc: float | None = None) -> list[np.ndarray]:
    """The model's in-context proxy cost of every token (mean over K), one array per text.

    The faithful variant's costs depend on the budget; they are read at `budget_csc` (default: the
    model's budget scale, the median training budget).
    """
    budget = float(budget_csc if budget_csc is not None else model.settings.budget_scale)
    out = []
    for ids in ids_list:
        x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
        costs = model(x, budget=torch.tensor([budget], device=model.device)).token_costs
        out.append(model.proxy_total(costs)[0].double().cpu().numpy())
    return out


def cost_model_fit(model, ids_list: Sequence[Sequence[int]], csc_list: Sequence[np.ndarray], prompt_tokens: int,
                   scale: str = "raw") -> dict[str, float]:
    """`fit_metrics` of a MetabolicGPT-2's learned costs against the true CSC of `ids_list` on `scale`."""
    if len(ids_list) != len(csc_list):
        raise DataError(f"{len(ids_list)} texts for {len(csc_list)} label arrays: give one label array per text")
    return fit_metrics(ids_list, scale_labels(csc_list, scale), predicted_token_costs(model, ids_list), prompt_tokens)


# --- the ceiling -------------------------------------------------------------------------------


@torch.inference_mode()
def hidden_states(backbone, ids_list: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The final hidden states [T, H] of a GPT-2 (`GPT2LMHeadModel`) on each text, as float64 arrays."""
    device = next(backbone.parameters()).device
    out = []
    for ids in ids_list:
        h = backbone.transformer(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device)).last_hidden_state
        out.append(h[0].double().cpu().numpy())
    return out


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge regression y ~ w.x + c (intercept not penalised): (w [H], c)."""
    mu, y_mean = x.mean(0), y.mean()
    xc = x - mu
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return w, float(y_mean - mu @ w)


def _folds(n_texts: int, k: int) -> list[np.ndarray]:
    return [np.arange(n_texts)[i::k] for i in range(min(k, n_texts))]


def ridge_probe(train_x: Sequence[np.ndarray], train_y: Sequence[np.ndarray], valid_x: Sequence[np.ndarray],
                target: str = "linear", alphas: Sequence[float] = PROBE_ALPHAS, folds: int = PROBE_FOLDS) -> tuple[list[np.ndarray], float]:
    """Per-token predictions on `valid_x` of a ridge probe fitted on (train_x, train_y), and its alpha.

    Features are standardised on the training tokens; unlabelled (NaN) training tokens are left out.
    `target="log"` fits log(y + LOG_FLOOR x mean y) and predicts its exponential. The alpha is the
    one with the lowest squared error (on the fitted target) over `folds` folds of training *texts*.
    """
    if target not in ("linear", "log"):
        raise DataError(f"target={target!r} is invalid: choose linear or log")
    xs = [np.asarray(x, np.float64) for x in train_x]
    ys = [np.asarray(y, np.float64) for y in train_y]
    ok_all = np.concatenate([np.isfinite(y) for y in ys])
    flat_x, flat_y = np.concatenate(xs)[ok_all], np.concatenate(ys)[ok_all]
    if flat_y.size < 2:
        raise DataError(f"{flat_y.size} labelled training tokens: the probe needs at least 2")
    floor = LOG_FLOOR * max(float(flat_y.mean()), 1e-12)
    forward = (lambda y: np.log(np.maximum(y, 0.0) + floor)) if target == "log" else (lambda y: y)
    mu, sd = flat_x.mean(0), flat_x.std(0) + 1e-8

    def design(x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - mu) / sd

    text_of = np.concatenate([np.full(len(y), i) for i, y in enumerate(ys)])[ok_all]
    z, t = design(flat_x), forward(flat_y)
    errors = []
    for alpha in alphas:
        sq = 0.0
        for held in _folds(len(ys), folds):
            out = np.isin(text_of, held)
            if out.all() or not out.any():
                continue
            w, c = ridge_fit(z[~out], t[~out], alpha)
            sq += float(((z[out] @ w + c - t[out]) ** 2).sum())
        errors.append(sq)
    best = float(alphas[int(np.argmin(errors))])
    w, c = ridge_fit(z, t, best)
    back = (lambda v: np.exp(v) - floor) if target == "log" else (lambda v: v)
    return [back(design(x) @ w + c) for x in valid_x], best


def token_mean_costs(train_ids: Sequence[Sequence[int]], train_y: Sequence[np.ndarray], prior: np.ndarray,
                     pseudo_count: float = 1.0) -> np.ndarray:
    """Per-token-id mean label with backoff to the prior: (sum_v + k a prior_v) / (n_v + k) for every v [V].

    a scales the prior (mean 1) to the labels by least squares over the training tokens; k =
    `pseudo_count` prior observations per token, so a token never seen costs a x prior_v.

    >>> token_mean_costs([[0, 0, 1]], [np.array([1.0, 3.0, 5.0])], np.ones(3), pseudo_count=1.0).round(3).tolist()
    [2.333, 4.0, 3.0]
    """
    prior = np.asarray(prior, np.float64)
    ids = np.concatenate([np.asarray(x, np.int64) for x in train_ids])
    y = np.concatenate([np.asarray(v, np.float64) for v in train_y])
    ok = np.isfinite(y)
    ids, y = ids[ok], y[ok]
    if y.size == 0:
        raise DataError("no labelled training token: the per-token mean needs labels")
    a = float(prior[ids] @ y / (prior[ids] @ prior[ids]))
    sums = np.bincount(ids, weights=y, minlength=prior.size)
    counts = np.bincount(ids, minlength=prior.size).astype(np.float64)
    return (sums + pseudo_count * a * prior) / (counts + pseudo_count)


def cost_ceilings(backbone, train_ids: Sequence[Sequence[int]], train_csc: Sequence[np.ndarray],
                  valid_ids: Sequence[Sequence[int]], valid_csc: Sequence[np.ndarray], prior: np.ndarray,
                  prompt_tokens: int, scale: str = "raw") -> dict[str, Any]:
    """`fit_metrics` of the simple predictors (module doc) on the held-out texts, and the ceiling.

    Returns {"ridge_linear": {...metrics, "alpha"}, "ridge_log": {...}, "token_mean": {...},
    "token_count": {...}, "ceiling": {"token_spearman": best, "continuation_r2": best, "token_spearman_by": name, ...}}
    (the ceiling over `CEILING_PREDICTORS`).
    """
    train_y, valid_y = scale_labels(train_csc, scale), scale_labels(valid_csc, scale)
    train_h, valid_h = hidden_states(backbone, train_ids), hidden_states(backbone, valid_ids)
    out: dict[str, Any] = {}
    for target in ("linear", "log"):
        pred, alpha = ridge_probe(train_h, train_y, valid_h, target)
        out[f"ridge_{target}"] = {**fit_metrics(valid_ids, valid_y, pred, prompt_tokens), "alpha": alpha}
    table = token_mean_costs(train_ids, train_y, prior)
    out["token_mean"] = fit_metrics(valid_ids, valid_y, [table[np.asarray(ids, np.int64)] for ids in valid_ids], prompt_tokens)
    mean_label = float(np.nanmean(np.concatenate([np.asarray(y, np.float64) for y in train_y])))
    out["token_count"] = fit_metrics(valid_ids, valid_y, [np.full(len(ids), mean_label) for ids in valid_ids], prompt_tokens)
    ceiling: dict[str, Any] = {}
    for metric in ("token_spearman", "continuation_r2"):
        name = max(CEILING_PREDICTORS, key=lambda k: -math.inf if math.isnan(out[k][metric]) else out[k][metric])
        ceiling[metric], ceiling[f"{metric}_by"] = out[name][metric], name
        ceiling[f"{metric}_ci"] = out[name].get(f"{metric}_ci", [math.nan, math.nan])
    out["ceiling"] = ceiling
    return out


def against_ceiling(fit: dict[str, float], ceilings: dict[str, Any], goal_spearman: float = 0.6, goal_r2: float = 0.5,
                    share: float = 0.9) -> dict[str, Any]:
    """Per metric: the learned value, the ceiling, their ratio, the goal and whether it is met.

    The goal is the absolute target (Spearman 0.6, R² 0.5), or `share` of the ceiling when the
    ceiling itself is below the target (the data and backbone do not allow more).

    >>> against_ceiling({"token_spearman": 0.5, "continuation_r2": 0.6},
    ...                 {"ceiling": {"token_spearman": 0.55, "continuation_r2": 0.7}})["token_spearman"]["met"]
    True
    """
    out = {}
    for metric, target in (("token_spearman", goal_spearman), ("continuation_r2", goal_r2)):
        value, top = fit[metric], ceilings["ceiling"][metric]
        goal = target if not (math.isfinite(top) and top < target) else share * top
        out[metric] = {"learned": value, "ceiling": top, "ratio": value / top if math.isfinite(top) and top > 0 else math.nan,
                       "goal": goal, "met": bool(math.isfinite(value) and value >= goal)}
    return out
