"""From semantic cost and tokens to joules, and generation within a joule budget (the paper's future work).

The joule fit (the e-tokens note's "calibration"; in this study "calibration" alone means the proxy <-> CSC
map of eq. 17, and the settings are `energy.joule_fit*`): per-request joules (measured, windows of
repeated identical requests) against a predictor, fitted by ordinary least squares with an intercept:

* ``tokens``: J ~ a + b * T_in + c * T_out (prefill and decode cost grow with their token counts);
* ``cost``:   J ~ a + b * semantic_cost (the request's predicted semantic cost).

R^2 and residuals are reported as they come; a poor fit is a finding, not an error.

Physical budget: `JouleBudgetStopping` is a transformers `StoppingCriteria` that predicts the
request's joules from the joule fit after each generated token and stops a sequence before the
next token would exceed its joule budget. Hit@10% compares the budget with the *measured* joules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from transformers import StoppingCriteria

from metabolic.core.errors import ConfigError, DataError


@dataclass(frozen=True)
class LinearFit:
    """y ~ intercept + coef . x, by least squares; `names` label the columns of x."""

    names: tuple[str, ...]
    intercept: float
    coef: tuple[float, ...]
    r2: float
    residuals: tuple[float, ...]  # y - prediction, in the order of the fitted points
    n: int

    def predict(self, *x: float) -> float:
        if len(x) != len(self.coef):
            raise ConfigError(f"{len(x)} predictor values for a fit on {self.names}: pass {len(self.coef)}")
        return self.intercept + float(np.dot(self.coef, x))

    @property
    def rmse(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.residuals)))) if self.residuals else float("nan")


def fit_linear(x: Sequence[Sequence[float]], y: Sequence[float], names: Sequence[str]) -> LinearFit:
    """Least squares of `y` on the columns of `x` plus an intercept; needs more points than parameters."""
    X = np.asarray(x, dtype=np.float64)
    Y = np.asarray(y, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.shape[0] != Y.shape[0]:
        raise DataError(f"{X.shape[0]} predictor rows for {Y.shape[0]} joule values: they must pair up")
    if X.shape[1] != len(names):
        raise DataError(f"{X.shape[1]} predictor columns but names {tuple(names)}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(Y))):
        raise DataError("joule-fit points contain NaN or infinite values: drop faulty measurements first")
    if X.shape[0] <= X.shape[1] + 1:
        raise DataError(f"{X.shape[0]} points cannot fit {X.shape[1] + 1} parameters: measure more requests "
                        f"(energy.joule_fit_requests)")
    A = np.hstack([np.ones((X.shape[0], 1)), X])
    beta, *_ = np.linalg.lstsq(A, Y, rcond=None)
    pred = A @ beta
    resid = Y - pred
    ss_tot = float(np.sum((Y - Y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan")
    return LinearFit(tuple(names), float(beta[0]), tuple(float(b) for b in beta[1:]), r2,
                     tuple(float(r) for r in resid), int(X.shape[0]))


class JouleBudgetStopping(StoppingCriteria):
    """Stop each sequence before its predicted joules would exceed its budget (transformers StoppingCriteria).

    predict_j(prompt_len, generated_ids) -> predicted joules of the request after those tokens;
    it must not decrease as tokens are added. `lookahead_j(prompt_len, generated_ids)` predicts the
    next token's increment; a sequence is done when current + increment > budget.
    """

    def __init__(self, budgets_j: Sequence[float], prompt_len: int,
                 predict_j: Callable[[int, Sequence[int]], float],
                 next_token_j: Callable[[int, Sequence[int]], float]) -> None:
        budgets = [float(b) for b in budgets_j]
        if not budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
            raise ConfigError(f"joule budgets {budgets_j!r} are invalid: give finite budgets > 0")
        if prompt_len < 1:
            raise ConfigError(f"prompt_len={prompt_len!r} is invalid: use the prompt's token count (>= 1)")
        self.budgets_j = budgets
        self.prompt_len = prompt_len
        self.predict_j = predict_j
        self.next_token_j = next_token_j

    def __call__(self, input_ids: torch.LongTensor, scores: Optional[torch.FloatTensor] = None, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[0] != len(self.budgets_j):
            raise ConfigError(f"batch of {input_ids.shape[0]} sequences for {len(self.budgets_j)} budgets: give one budget per sequence")
        done = []
        for row, budget in zip(input_ids.tolist(), self.budgets_j):
            generated = row[self.prompt_len:]
            now = self.predict_j(self.prompt_len, generated)
            done.append(now + self.next_token_j(self.prompt_len, generated) > budget)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def tokens_predictor(fit: LinearFit) -> tuple[Callable, Callable]:
    """(predict_j, next_token_j) from a `tokens` fit J ~ a + b T_in + c T_out."""
    if fit.names != ("input_tokens", "output_tokens"):
        raise ConfigError(f"a tokens predictor needs a fit on (input_tokens, output_tokens), not {fit.names}")
    c_out = fit.coef[1]
    return (lambda t_in, gen: fit.predict(t_in, len(gen))), (lambda t_in, gen: max(c_out, 0.0))


def cost_predictor(fit: LinearFit, token_cost: np.ndarray, prompt_cost: float = 0.0) -> tuple[Callable, Callable]:
    """(predict_j, next_token_j) from a `cost` fit J ~ a + b * cost, cost = prompt_cost + sum of token costs.

    The next token's cost is unknown before it is sampled: the mean token cost is used as its estimate.
    """
    if fit.names != ("semantic_cost",):
        raise ConfigError(f"a cost predictor needs a fit on (semantic_cost,), not {fit.names}")
    mean_cost = float(np.mean(token_cost))

    def predict(t_in: int, gen: Sequence[int]) -> float:
        return fit.predict(prompt_cost + float(token_cost[list(gen)].sum()) if gen else prompt_cost)

    return predict, (lambda t_in, gen: max(fit.coef[0] * mean_cost, 0.0))
