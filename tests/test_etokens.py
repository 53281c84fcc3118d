"""e-token arithmetic: definitions, the identity (property-tested), bad inputs, medians with spread."""

from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st
from metabolic.core.errors import DataError
from metabolic.energy.etokens import check_rows, etokens, spread

# 0 J or at least 1 uJ: NVML reads mJ, and subnormal floats would underflow to 0 Wh
energies = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e7, allow_nan=False, allow_infinity=False))
tokens_in = st.integers(min_value=1, max_value=10**6)
tokens_out = st.integers(min_value=1, max_value=10**6)


def test_worked_example_from_the_issue():
    # 92 J for 32 in / 100 out: 92/3600 Wh = 0.025556 Wh; per 1,000 output tokens 0.25556 Wh.
    e = etokens(92.0, 32, 100)
    assert e.energy_wh == pytest.approx(92 / 3600)
    assert e.e_out_wh == pytest.approx(0.255555555, rel=1e-8)
    assert e.e_in_wh == pytest.approx(92 / 3600 / 32 * 1000)
    assert e.e_in_wh / e.e_out_wh == pytest.approx(100 / 32)


@given(energies, tokens_in, tokens_out)
def test_identity_holds(energy_j, t_in, t_out):
    e = etokens(energy_j, t_in, t_out)
    assert e.identity_holds()
    if energy_j > 0:
        assert e.e_in_wh / e.e_out_wh == pytest.approx(t_out / t_in, rel=1e-12)
    # both carry the same energy: e * T / 1000 == E_Wh
    assert e.e_in_wh * t_in / 1000 == pytest.approx(e.energy_wh, rel=1e-12)
    assert e.e_out_wh * t_out / 1000 == pytest.approx(e.energy_wh, rel=1e-12)


@given(energies, tokens_in, tokens_out)
def test_more_output_lowers_output_etoken(energy_j, t_in, t_out):
    a, b = etokens(energy_j, t_in, t_out), etokens(energy_j, t_in, t_out + 1)
    assert b.e_out_wh <= a.e_out_wh
    assert b.e_in_wh == a.e_in_wh


def test_zero_output_tokens_is_undefined_not_division():
    e = etokens(10.0, 16, 0)
    assert e.e_out_wh is None and "undefined" in e.note and "no output tokens" in e.note
    assert e.e_in_wh == pytest.approx(10 / 3600 / 16 * 1000)
    assert e.identity_holds()


@pytest.mark.parametrize("energy, match", [
    (-1.0, "negative"), (float("nan"), "not finite"), (float("inf"), "not finite"), (None, "not a number"),
])
def test_bad_energy_rejected(energy, match):
    with pytest.raises(DataError, match=match):
        etokens(energy, 10, 10)


@pytest.mark.parametrize("t_in, t_out, match", [
    (0, 10, "input_tokens=0 is invalid"), (-3, 10, "input_tokens=-3"), (10, -1, "output_tokens=-1"),
    (2.5, 10, "not a whole number"), (True, 10, "not a whole number"),
])
def test_bad_token_counts_rejected(t_in, t_out, match):
    with pytest.raises(DataError, match=match):
        etokens(1.0, t_in, t_out)


def test_spread_median_and_quartiles():
    s = spread([4.0, 1.0, 3.0, 2.0, None])
    assert (s.median, s.q25, s.q75, s.minimum, s.maximum, s.n, s.n_undefined) == (2.5, 1.75, 3.25, 1.0, 4.0, 4, 1)
    assert s.iqr == pytest.approx(1.5)
    assert spread([None, None]) is None
    with pytest.raises(DataError, match="NaN"):
        spread([1.0, float("nan")])


def test_spread_known_values_and_undefined_repeats():
    # linear interpolation between order statistics: q25 of (1, 2, 4, 8, 16) is the 2nd value, q75 the 4th
    s = spread([16.0, 1.0, None, 4.0, 8.0, 2.0])
    assert (s.minimum, s.q25, s.median, s.q75, s.maximum) == (1.0, 2.0, 4.0, 8.0, 16.0)
    assert (s.n, s.n_undefined) == (5, 1)
    s = spread([0.0, 10.0])  # between two values: interpolated, not rounded to one of them
    assert (s.q25, s.median, s.q75) == (2.5, 5.0, 7.5)
    assert spread([None, None]) is None


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=40), st.permutations(range(40)))
def test_spread_ignores_the_order_of_the_repeats(values, order):
    shuffled = [values[i] for i in order if i < len(values)]
    assert spread(values) == spread(shuffled)


def test_check_rows_detects_edited_row():
    good = etokens(50.0, 20, 40).__dict__
    assert check_rows([good, etokens(5.0, 3, 0).__dict__]) == 1
    bad = {**good, "e_in_wh": good["e_in_wh"] * 1.01}
    with pytest.raises(DataError, match="row 1"):
        check_rows([good, bad])
    # 50 J = 50 / 3600 Wh over 20 input and 40 output tokens, per 1,000 tokens
    assert good["e_in_wh"] == pytest.approx(50 / 3600 / 20 * 1000, rel=1e-12)
    assert good["e_out_wh"] == pytest.approx(50 / 3600 / 40 * 1000, rel=1e-12)


def test_numpy_scalars_are_numbers():
    """A reading as a numpy scalar is valid (issue 17: np.float32 was rejected as "not a number")."""
    import numpy as np

    e = etokens(np.float32(1.0), np.int64(5), 5)
    assert e.energy_wh == pytest.approx(1 / 3600) and e.input_tokens == 5 and e.identity_holds()
    with pytest.raises(DataError, match="not finite"):
        etokens(np.float64("nan"), 5, 5)
    with pytest.raises(DataError, match="not a number"):
        etokens(np.bool_(True), 5, 5)
    with pytest.raises(DataError, match="NaN"):
        spread([np.float32("nan"), 1.0])  # numpy NaN is an error too, not a NaN median
    assert spread([np.float32(2.0), np.float64(4.0)]).median == 3.0


def test_check_rows_with_zero_input_tokens_is_a_data_error():
    """input_tokens=0 in a row with e-tokens names the row instead of raising ZeroDivisionError (issue 17)."""
    row = {**etokens(50.0, 20, 40).__dict__, "input_tokens": 0}
    with pytest.raises(DataError, match="row 0: input_tokens=0"):
        check_rows([row])
