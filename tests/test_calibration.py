"""OnlineAffine (eq. 19-21) against a closed-form ridge regression in numpy, fed whole, in batches, merged."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from metabolic.core.errors import DataError
from metabolic.model.calibration import OnlineAffine


def numpy_ridge(x: np.ndarray, y: np.ndarray, gamma: float) -> tuple[float, float]:
    """Closed-form ridge with an unpenalised intercept, two-pass in numpy:
    b = sum (x - x_bar)(y - y_bar) / (sum (x - x_bar)^2 + gamma), a = y_bar - b x_bar."""
    xc, yc = x - x.mean(), y - y.mean()
    b = float((xc * yc).sum() / ((xc * xc).sum() + gamma))
    return float(y.mean() - b * x.mean()), b


def lstsq_ridge(x: np.ndarray, y: np.ndarray, gamma: float) -> tuple[float, float]:
    """The same problem min sum (y - a - b x)^2 + gamma b^2 by least squares on an augmented design,
    to check that the closed form above is the ridge solution (to lstsq's own accuracy)."""
    design = np.vstack([np.stack([np.ones_like(x), x], axis=1), [[0.0, np.sqrt(gamma)]]])
    (a, b), *_ = np.linalg.lstsq(design, np.append(y, 0.0), rcond=None)
    return float(a), float(b)


finite = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False)


@st.composite
def points(draw):
    n = draw(st.integers(2, 40))
    k = draw(st.integers(1, 3))
    x = draw(arrays(np.float64, (n, k), elements=finite))
    y = draw(arrays(np.float64, (n, k), elements=finite))
    gamma = draw(st.floats(min_value=1e-3, max_value=10.0))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=4, unique=True)))
    return x, y, gamma, cuts


def assert_matches_numpy(fit, x, y, gamma):
    eps = np.finfo(np.float64).eps
    for k in range(x.shape[1]):
        a, b = numpy_ridge(x[:, k], y[:, k], gamma)
        xk, yk = x[:, k], y[:, k]
        # Rounding of the centred sums (each batch re-centred on its own mean, then merged) is up to ~n eps
        # |x| |y|; the slope divides it by sum (x - x_bar)^2 + gamma, which is only gamma when every x is
        # equal (then a = y_bar - b x_bar carries it times |x_bar|). Well-conditioned points keep ~1e-9.
        slack_b = 16 * eps * len(xk) * (1 + np.abs(xk).max()) * (1 + np.abs(yk).max()) / (((xk - xk.mean()) ** 2).sum() + gamma)
        assert abs(fit.b[k] - b) <= 1e-9 * (1.0 + abs(b)) + slack_b
        assert abs(fit.a[k] - a) <= 1e-9 * (1.0 + abs(a)) + slack_b * abs(xk.mean())
        a_ls, b_ls = lstsq_ridge(x[:, k], y[:, k], gamma)
        assert abs(b - b_ls) <= 1e-6 * (1.0 + abs(b)) and abs(a - a_ls) <= 1e-6 * (1.0 + abs(a))


@settings(max_examples=80, deadline=None)
@given(points())
@example((np.full((26, 2), 16.19546622), np.vstack([[14.0, 14.0], np.zeros((25, 2))]), 0.001, [1]))  # all x equal, small gamma
def test_fit_equals_closed_form_ridge_whole_batched_and_merged(data):
    x, y, gamma, cuts = data
    k = x.shape[1]
    whole = OnlineAffine(k, gamma).update(x, y)
    assert whole.n == x.shape[0]
    assert_matches_numpy(whole.fit(), x, y, gamma)

    batched = OnlineAffine(k, gamma)
    for xs, ys in zip(np.split(x, cuts), np.split(y, cuts)):
        batched.update(xs, ys)
    assert_matches_numpy(batched.fit(), x, y, gamma)

    parts = [OnlineAffine(k, gamma).update(xs, ys) for xs, ys in zip(np.split(x, cuts), np.split(y, cuts))]
    merged = OnlineAffine(k, gamma)
    for part in reversed(parts):  # merge order does not matter
        merged.merge(part)
    assert_matches_numpy(merged.fit(), x, y, gamma)


@settings(max_examples=40, deadline=None)
@given(points())
def test_raw_sums_are_the_papers(data):
    x, y, gamma, _ = data
    sums = OnlineAffine(x.shape[1], gamma).update(x, y).sums()
    np.testing.assert_allclose(sums["S_x"], x.sum(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(sums["S_y"], y.sum(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(sums["S_xx"], (x * x).sum(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(sums["S_xy"], (x * y).sum(0), rtol=1e-12, atol=1e-9)
    assert sums["n"] == x.shape[0]


def test_eq21_on_a_known_line():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = 0.5 + 2.0 * x
    fit = OnlineAffine(1, ridge=0.0).update(x, y).fit()
    assert fit.a[0] == pytest.approx(0.5, abs=1e-12)
    assert fit.b[0] == pytest.approx(2.0, abs=1e-12)
    # ridge shrinks the slope: b = S_xy_c / (S_xx_c + gamma) = 10 / (5 + 5)
    shrunk = OnlineAffine(1, ridge=5.0).update(x, y).fit()
    assert shrunk.b[0] == pytest.approx(1.0, abs=1e-12)
    assert shrunk.a[0] == pytest.approx(y.mean() - 1.0 * x.mean(), abs=1e-12)


def test_scalar_points_broadcast_over_k_and_empty_fit_is_identity():
    cal = OnlineAffine(3, 1e-3)
    empty = cal.fit()
    assert empty.n == 0 and np.all(empty.a == 0) and np.all(empty.b == 1)
    cal.update([1.0, 2.0, 4.0], [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [4.0, 8.0, 12.0]])
    fit = cal.fit()
    assert fit.b[2] > fit.b[1] > fit.b[0] > 0


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 2)), rng.normal(size=(20, 2))
    cal = OnlineAffine(2, 0.1).update(x[:10], y[:10])
    restored = OnlineAffine.from_state_dict(cal.state_dict())
    cal.update(x[10:], y[10:])
    restored.update(x[10:], y[10:])
    np.testing.assert_array_equal(cal.fit().a, restored.fit().a)
    np.testing.assert_array_equal(cal.fit().b, restored.fit().b)


@pytest.mark.parametrize(
    "x, y, match",
    [
        ([1.0, float("nan")], [1.0, 2.0], "NaN"),
        ([1.0, 2.0], [1.0], "one y per x"),
        (np.ones((2, 4)), np.ones((2, 4)), "shape"),
    ],
)
def test_bad_points_are_rejected(x, y, match):
    cal = OnlineAffine(3, 1e-3)
    with pytest.raises(DataError, match=match):
        cal.update(x, y)
    assert cal.n == 0  # nothing half-added


def test_bad_construction_and_merge():
    with pytest.raises(DataError, match="ridge"):
        OnlineAffine(1, ridge=-1.0)
    with pytest.raises(DataError, match="same K"):
        OnlineAffine(1).merge(OnlineAffine(2))
    with pytest.raises(DataError, match="not written by"):
        OnlineAffine.from_state_dict({"k": 2})
