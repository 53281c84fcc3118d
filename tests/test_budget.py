"""`metabolic.core.budget`: the CSC scale, the band test and the budget -> proxy map every stage shares."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metabolic.core.budget import (
    SCALES,
    ProxyCalibration,
    above_band,
    below_band,
    check_scale,
    in_band,
    length_factor,
    usable_calibration,
)
from metabolic.core.errors import ConfigError

finite = st.floats(-1e6, 1e6, allow_nan=False)
positive = st.floats(1e-3, 1e6, allow_nan=False)


def test_scales_and_length_factor():
    assert SCALES == ("raw", "length")
    assert [length_factor(s, 7) for s in SCALES] == [1, 7]
    with pytest.raises(ConfigError, match="scale='words' is invalid: choose one of raw, length"):
        check_scale("words")
    with pytest.raises(ConfigError, match="scale='words'"):
        length_factor("words", 3)


@settings(max_examples=200, deadline=None)
@given(finite, positive, st.floats(0, 0.99))
def test_below_in_above_partition_every_finite_value(achieved, target, band):
    flags = [bool(below_band(achieved, target, band)), bool(in_band(achieved, target, band)),
             bool(above_band(achieved, target, band))]
    assert flags.count(True) == 1
    assert flags[1] == (abs(achieved - target) <= band * target * (1 + 1e-12))


def test_band_edges_are_inclusive_and_nan_is_never_in_band():
    assert in_band(np.array([9.0, 11.0, 8.99, 11.01]), 10.0, 0.1).tolist() == [True, True, False, False]
    assert not in_band(math.nan, 10.0, 0.1) and not below_band(math.nan, 10.0, 0.1) and not above_band(math.nan, 10.0, 0.1)
    assert not in_band(math.inf, 10.0, 0.1) and above_band(math.inf, 10.0, 0.1)


def test_budget_to_proxy_keeps_unlimited_and_refuses_budgets_below_the_intercept():
    cal = ProxyCalibration(a=0.1, b=2.0)
    assert cal.proxy_budgets([0.5, math.inf]).tolist() == [0.2, math.inf]
    assert cal.maps([0.5, math.inf]) and not cal.maps([0.05]) and not cal.maps([math.nan])
    with pytest.raises(ConfigError, match=r"budget_csc=\[0.05\] maps to a proxy budget <= 0 .* above 0.1 CSC"):
        cal.proxy_budgets([0.5, 0.05])
    assert usable_calibration(0.1, 2.0, [0.5]) == cal
    assert usable_calibration(0.1, 2.0, [0.1]) is None  # exactly at the intercept: proxy budget 0
    assert usable_calibration(0.1, 0.0, [0.5]) is None and usable_calibration(math.nan, 1.0, [0.5]) is None
    with pytest.raises(ConfigError, match="b > 0"):
        ProxyCalibration(0.0, -1.0)
