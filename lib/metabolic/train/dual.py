"""Pure schedules of the Lagrangian training: the dual update (eq. 23) and the budget curriculum (V.B)."""

from __future__ import annotations

import numpy as np
import torch

from metabolic.core.errors import ConfigError


def dual_update(lam: np.ndarray, cost: np.ndarray, budget: np.ndarray, mu: float, lambda_max: float) -> np.ndarray:
    """lambda <- clip(lambda + mu (C - B), 0, lambda_max), elementwise over the K dimensions.

    `cost` is the batch-average proxy cost vector C_hat, `budget` the budgets B (both [K]); lambda
    rises while the cost exceeds the budget and falls (to 0 at most) while it is under it. numpy
    arrays in, numpy out; torch tensors in, a float64 tensor on their device out.
    """
    if not (np.isfinite(mu) and mu > 0):
        raise ConfigError(f"train.mu={mu!r} is invalid: use a finite dual learning rate > 0")
    if not (np.isfinite(lambda_max) and lambda_max > 0):
        raise ConfigError(f"train.lambda_max={lambda_max!r} is invalid: use a finite bound > 0")
    if isinstance(lam, torch.Tensor):
        # Tensors stay on their device (no host sync per step): the same float64 arithmetic as below,
        # and a NaN gap gives a NaN lambda instead of an error; the training loop's divergence check
        # (a NaN loss comes with it) stops the run before anything is saved.
        if lam.shape != cost.shape or lam.shape != budget.shape:
            raise ConfigError(f"dual update got lambda of shape {tuple(lam.shape)} and C - B of shape "
                              f"{tuple(cost.shape)}: both must be [K]")
        return torch.clamp(lam.double() + mu * (cost.double() - budget.double()), 0.0, lambda_max)
    lam = np.asarray(lam, dtype=np.float64)
    gap = np.asarray(cost, dtype=np.float64) - np.asarray(budget, dtype=np.float64)
    if gap.shape != lam.shape:
        raise ConfigError(f"dual update got lambda of shape {lam.shape} and C - B of shape {gap.shape}: both must be [K]")
    if not np.all(np.isfinite(gap)):
        raise ConfigError("dual update got a NaN or infinite cost gap: check the budgets and the loss terms")
    return np.clip(lam + mu * gap, 0.0, lambda_max)


def curriculum_factor(epoch: int, epochs: int, start: float) -> float:
    """Multiplier of the target budgets at `epoch` (0-based): `start` at epoch 0, linear to 1 at the last epoch.

    A factor > 1 is a looser budget (the constraint is an upper bound), so the model first meets
    an easy constraint and is tightened towards the target (paper V.B). The paper does not give its
    schedule; its best epoch (13 of 15) reports budgets 0.957 x the targets, which a linear schedule
    ending at the targets cannot produce, so we end exactly at the targets.
    """
    if epochs < 1 or not (0 <= epoch < epochs):
        raise ConfigError(f"curriculum epoch={epoch!r} of epochs={epochs!r} is invalid: use 0 <= epoch < epochs")
    if not (np.isfinite(start) and start > 0):
        raise ConfigError(f"train.curriculum_start={start!r} is invalid: use a multiplier > 0")
    if epochs == 1:
        return 1.0
    return float(start + (1.0 - start) * epoch / (epochs - 1))

