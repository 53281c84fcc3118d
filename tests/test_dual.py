"""Dual ascent (eq. 23) and the budget curriculum: bounds, direction, exact values, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metabolic.core.errors import ConfigError
from metabolic.train.dual import curriculum_factor, dual_update

value = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    lam_frac=st.lists(st.floats(0, 1), min_size=1, max_size=4),
    costs=st.lists(value, min_size=4, max_size=4),
    budgets=st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4),
    mu=st.floats(1e-4, 10),
    lambda_max=st.floats(1e-2, 200),
)
def test_dual_update_bounds_direction_and_value(lam_frac, costs, budgets, mu, lambda_max):
    k = len(lam_frac)
    lam = np.asarray(lam_frac) * lambda_max
    cost, budget = np.asarray(costs[:k]), np.asarray(budgets[:k])
    new = dual_update(lam, cost, budget, mu, lambda_max)
    assert new.shape == (k,)
    assert np.all(new >= 0) and np.all(new <= lambda_max)
    over, under = cost > budget, cost < budget
    assert np.all(new[over] >= lam[over])  # cost above budget: lambda rises (or stays at the cap)
    assert np.all(new[under] <= lam[under])  # cost below budget: lambda falls (or stays at 0)
    np.testing.assert_array_equal(new[cost == budget], lam[cost == budget])
    np.testing.assert_allclose(new, np.clip(lam + mu * (cost - budget), 0, lambda_max), rtol=0, atol=0)


def test_dual_update_known_values():
    lam = np.array([0.0, 1.0, 99.0])
    new = dual_update(lam, np.array([2.0, 0.0, 10.0]), np.array([1.0, 5.0, 1.0]), mu=0.15, lambda_max=100.0)
    np.testing.assert_allclose(new, [0.15, 0.25, 100.0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"mu": 0.0}, "train.mu"),
    ({"mu": float("nan")}, "train.mu"),
    ({"lambda_max": -1.0}, "train.lambda_max"),
    ({"cost": np.array([np.nan])}, "NaN"),
    ({"cost": np.array([1.0, 2.0])}, r"\[K\]"),
])
def test_dual_update_bad_input(kwargs, match):
    args = {"lam": np.array([0.5]), "cost": np.array([1.0]), "budget": np.array([1.0]), "mu": 0.1, "lambda_max": 10.0}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        dual_update(**args)


@settings(max_examples=100, deadline=None)
@given(epochs=st.integers(1, 30), start=st.floats(0.2, 5.0))
def test_curriculum_runs_from_start_to_targets(epochs, start):
    factors = [curriculum_factor(e, epochs, start) for e in range(epochs)]
    assert factors[-1] == pytest.approx(1.0, abs=1e-12)
    if epochs > 1:
        assert factors[0] == pytest.approx(start, abs=1e-12)
        steps = np.diff(factors)
        assert np.all(steps <= 1e-12) if start >= 1 else np.all(steps >= -1e-12)  # monotone towards 1


def test_curriculum_factor_loose_to_target():
    assert [curriculum_factor(e, 3, 1.5) for e in range(3)] == [1.5, 1.25, 1.0]
    assert curriculum_factor(0, 1, 1.5) == 1.0  # one epoch: the targets themselves


@pytest.mark.parametrize("epoch, epochs, start", [(3, 3, 1.5), (-1, 3, 1.5), (0, 0, 1.5), (0, 3, 0.0)])
def test_curriculum_bad_input(epoch, epochs, start):
    with pytest.raises(ConfigError):
        curriculum_factor(epoch, epochs, start)
