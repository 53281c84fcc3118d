"""How well a learned cost model tracks the true CSC on held-out text (issue 12, step 1).

Two numbers, both scale-free, on texts the model was not trained on:
- `token_spearman`: Spearman rank correlation between the model's in-context cost of each token
  (cost head + token costs, mean over K) and its exact CSC label;
- `continuation_r2`: R² of the best affine map from predicted to true CSC totals of each text's
  continuation (the tokens after its first `prompt_tokens`, the same counting rule as Table I).
And two that show a collapse into a token counter: the spread (sd / mean) of the predicted
per-token costs, and R² of predicted continuation totals against the continuation's token count.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from metabolic.core.budget import length_factor
from metabolic.core.errors import DataError


def r_squared(x: Any, y: Any) -> float:
    """R² of the least-squares line y ~ a + b x (the squared Pearson correlation); NaN if undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1] ** 2)


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN if undefined."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


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
    """Spearman and R² of the learned costs against true CSC on `ids_list` (see the module docstring)."""
    if len(ids_list) != len(csc_list):
        raise DataError(f"{len(ids_list)} texts for {len(csc_list)} label arrays: give one label array per text")
    predicted = predicted_token_costs(model, ids_list)
    tok_pred, tok_true, cont_pred, cont_true, cont_len = [], [], [], [], []
    for ids, lab, pred in zip(ids_list, csc_list, predicted):
        lab = np.asarray(lab, dtype=np.float64)
        ok = np.isfinite(lab)
        tok_pred.append(pred[ok])
        tok_true.append(lab[ok])
        tail = slice(prompt_tokens, len(ids))
        if len(ids) > prompt_tokens and np.all(ok[tail]):
            factor = length_factor(scale, len(ids))
            cont_pred.append(pred[tail].sum() * factor)
            cont_true.append(lab[tail].sum() * factor)
            cont_len.append(len(ids) - prompt_tokens)
    p, t = np.concatenate(tok_pred), np.concatenate(tok_true)
    return {
        "n_tokens": int(p.size), "n_continuations": len(cont_true),
        "token_spearman": spearman(p, t),
        "continuation_r2": r_squared(cont_pred, cont_true),
        "predicted_cost_cv": float(np.std(p) / np.mean(p)) if p.size and np.mean(p) > 0 else math.nan,
        "true_csc_cv": float(np.std(t) / np.mean(t)) if t.size and np.mean(t) > 0 else math.nan,
        "continuation_r2_vs_token_count": r_squared(cont_len, cont_pred),
    }
