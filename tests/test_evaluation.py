"""Budget-tracking metrics (pure, property-tested) and the Table I helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from metabolic.core.errors import DataError
from metabolic.evaluate.scoring import (
    PAPER_TABLE1,
    distinct_n,
    goal_status,
    hit_rate,
    mae,
    mape,
    perplexity,
    relative_change,
    table_row,
)

positive = st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False)
pairs = st.lists(st.tuples(positive, positive), min_size=1, max_size=30)


def split(p):
    a, t = zip(*p)
    return np.array(a), np.array(t)


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_metric_bounds_and_orderings(p):
    a, t = split(p)
    assert mae(a, t) >= 0 and mape(a, t) >= 0
    h10, h20, h50 = (hit_rate(a, t, d) for d in (10, 20, 50))
    assert 0 <= h10 <= h20 <= h50 <= 100
    # Hit@delta is the share of per-item relative errors <= delta: it is 100 when MAPE's max term is within
    if np.max(np.abs(a - t) / t) <= 0.099:
        assert h10 == 100.0
    assert mape(a, t) == pytest.approx(100 * np.mean(np.abs(a - t) / t))


@settings(max_examples=60, deadline=None)
@given(pairs, st.floats(0.1, 10.0))
def test_scale_invariance_of_relative_metrics(p, c):
    a, t = split(p)
    assert mape(a * c, t * c) == pytest.approx(mape(a, t), rel=1e-9, abs=1e-9)
    for d in (10, 20, 50):
        # boundary cases may flip by one ulp; compare away from the boundary
        rel = np.abs(a - t) / t
        assume(np.all(np.abs(rel - d / 100) > 1e-9))
        assert hit_rate(a * c, t * c, d) == hit_rate(a, t, d)
    assert mae(a * c, t * c) == pytest.approx(c * mae(a, t), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(positive, min_size=1, max_size=20))
def test_perfect_tracking(t):
    t = np.array(t)
    assert mae(t, t) == 0 and mape(t, t) == 0
    assert hit_rate(t, t, 0) == 100.0
    row = table_row(t, t, 1.0)
    assert row["Hit@10"] == row["Hit@50"] == 100.0 and row["Achieved"] == pytest.approx(row["Target"])


def test_exact_values_and_boundaries():
    # target 10: achieved 11 (10% off: a hit at 10, inclusive), 12 (20%), 16 (60%)
    a, t = [11.0, 12.0, 16.0], [10.0, 10.0, 10.0]
    assert mae(a, t) == pytest.approx(3.0)
    assert mape(a, t) == pytest.approx(30.0)
    assert hit_rate(a, t, 10) == pytest.approx(100 / 3)
    assert hit_rate(a, t, 20) == pytest.approx(200 / 3)
    assert hit_rate(a, t, 50) == pytest.approx(200 / 3)
    row = table_row(a, 10.0, 10.0)
    assert row == {"Budget": 10.0, "MAE": pytest.approx(3.0), "MAPE": pytest.approx(30.0), "Hit@10": pytest.approx(100 / 3),
                   "Hit@20": pytest.approx(200 / 3), "Hit@50": pytest.approx(200 / 3), "Achieved": pytest.approx(13.0),
                   "Target": 10.0, "n": 3, "Hit@10_ci": pytest.approx([6.15, 79.23], abs=0.01),
                   "Hit@20_ci": pytest.approx([20.77, 93.85], abs=0.01), "Hit@50_ci": pytest.approx([20.77, 93.85], abs=0.01)}


def test_paper_table_reproduces_its_own_average():
    rows = PAPER_TABLE1["rows"]
    assert np.mean([r["MAE"] for r in rows]) == pytest.approx(PAPER_TABLE1["average_MAE"], abs=1e-3)
    # MAE >= |mean achieved - target| (Jensen): the paper's rows satisfy it (low: 1.78 >= 1.19)
    for r in rows:
        assert r["MAE"] >= abs(r["Achieved"] - r["Target"]) - 0.01


@pytest.mark.parametrize("bad", [([], []), ([1.0], [0.0]), ([1.0, 2.0], [1.0, 2.0, 3.0]), ([math.nan], [1.0])])
def test_bad_inputs_raise(bad):
    with pytest.raises(DataError):
        mae(*bad)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 20), max_size=15), max_size=6), st.integers(1, 3))
def test_distinct_n_is_a_ratio(lists, n):
    d = distinct_n(lists, n)
    assert 0 <= d <= 1
    total = sum(max(0, len(x) - n + 1) for x in lists)
    if total:
        assert d > 0
        assert d == pytest.approx(len({tuple(x[i:i + n]) for x in lists for i in range(len(x) - n + 1)}) / total)


def test_distinct_exact_and_perplexity():
    assert distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert distinct_n([[1]], 2) == 0.0
    assert perplexity(0.0, 5) == 1.0 and perplexity(5 * math.log(3), 5) == pytest.approx(3.0)
    assert math.isnan(perplexity(1.0, 0))
    assert relative_change(11.0, 10.0) == pytest.approx(0.1) and math.isnan(relative_change(1.0, 0.0))


def test_goal_status_and_side_by_side():
    row = lambda level, hit: {"level": level, "csc": {"Budget": 1.0, "MAE": 0.1, "MAPE": 5.0, "Hit@10": hit, "Hit@20": 100.0,
                                                       "Hit@50": 100.0, "Achieved": 1.0, "Target": 1.0}}
    table = {"rows": [row("low", 95.0), row("medium", 90.0), row("high", 100.0)], "fluency": {"judge_ppl_rel_change": 0.08}}
    assert goal_status(table)["met"] is True
    table["rows"][1] = row("medium", 89.9)
    assert goal_status(table)["met"] is False and goal_status(table)["hit_ok"] is False
    table["rows"][1] = row("medium", 90.0)
    table["fluency"]["judge_ppl_rel_change"] = 0.11  # 11% more perplexed than unbudgeted text: fluency lost
    status = goal_status(table)
    assert status["hit_ok"] and not status["fluency_ok"] and not status["met"]
    table["fluency"]["judge_ppl_rel_change"] = -0.25  # likelier than unbudgeted text: no fluency loss (one-sided)
    assert goal_status(table)["fluency_ok"] and goal_status(table)["met"]
    table["fluency"]["judge_ppl_rel_change"] = float("nan")
    assert not goal_status(table)["fluency_ok"]


def test_continuation_points_count_only_tokens_after_the_prompt():
    from metabolic.evaluate.budgets import continuation_points

    costs = np.array([0.1, 0.2, 0.3, 0.4])
    ids = [[0, 1, 2, 3], [3, 3], [0, 1, 2]]
    labels = [np.array([0.5, 0.1, 0.2, 0.3]), np.array([0.1, 0.1]), np.array([0.2, np.nan, np.nan])]
    x, y = continuation_points(ids, labels, costs, prompt_tokens=2)
    assert x.tolist() == pytest.approx([0.7]) and y.tolist() == pytest.approx([0.5])  # text 2: no continuation; 3: unlabelled
    x, y = continuation_points(ids, labels, costs, prompt_tokens=1, scale="length")
    assert x.tolist() == pytest.approx([0.9, 0.4]) and y.tolist() == pytest.approx([0.6 * 4, 0.1 * 2])


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 2.0), st.floats(0.1, 3.0), st.integers(0, 1000))
def test_continuation_calibration_recovers_a_line_and_falls_back(a, b, seed):
    from metabolic.evaluate.budgets import fit_continuation_calibration

    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 5.0, 40)
    cal, how = fit_continuation_calibration(x, a + b * x, ridge=0.0)
    assert how == "ridge" and cal.a == pytest.approx(a, abs=1e-6) and cal.b == pytest.approx(b, rel=1e-6)
    # a falling line cannot map budgets: the ratio fallback keeps b > 0
    cal, how = fit_continuation_calibration(x, 10.0 - x, ridge=0.0)
    assert how.startswith("ratio") and cal.a == 0 and cal.b == pytest.approx((10.0 - x).sum() / x.sum())
    # a budget below the intercept also falls back
    cal, how = fit_continuation_calibration(x, a + b * x, ridge=0.0, budgets=[a / 2])
    assert how.startswith("ratio") and cal.to_proxy(a / 2) > 0


def test_judge_scores_each_distinct_text_once_with_the_direct_numbers(tokenizer):
    """The memo changes nothing but the work: the same NLL as a direct log-softmax, one forward per text."""
    from types import SimpleNamespace

    import torch
    from metabolic.evaluate.scoring import Judge, judge_nll
    from tiny_lm import tiny_gpt2

    model = tiny_gpt2(tokenizer)
    a = SimpleNamespace(prompt_ids=[464, 1110], generated_ids=[318, 257, 1332])
    b = SimpleNamespace(prompt_ids=[464], generated_ids=[1110, 318])
    empty = SimpleNamespace(prompt_ids=[464], generated_ids=[])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([a.prompt_ids + a.generated_ids])).logits[0].float(), -1)
    direct = -sum(float(logp[t - 1, tok]) for t, tok in enumerate(a.generated_ids, start=len(a.prompt_ids)))
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    judge = Judge(model)
    nll, count = judge.nll([a, b, a, empty])
    assert count.tolist() == [3, 2, 3, 0] and nll[3] == 0.0 and nll[0] == nll[2]
    assert nll[0] == pytest.approx(direct, rel=1e-5)
    assert len(forwards) == 2  # a and b; the repeat and the empty generation cost nothing
    again, _ = judge_nll(judge, [b, a])  # a Judge passed to judge_nll shares its memo
    assert again.tolist() == [nll[1], nll[0]] and len(forwards) == 2


# --- intervals -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.data())
def test_wilson_interval_is_inside_0_1_and_holds_the_rate(n, data):
    from metabolic.core.stats import wilson_interval

    hits = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(hits, n)
    assert 0.0 <= lo <= hits / n <= hi <= 1.0
    assert (lo == 0.0) == (hits == 0) and (hi == 1.0) == (hits == n)
    if n >= 2 and 0 < hits < n:  # more trials at the same rate give a narrower interval
        lo2, hi2 = wilson_interval(2 * hits, 2 * n)
        assert hi2 - lo2 < hi - lo


def test_wilson_interval_known_values_and_bad_input():
    from metabolic.core.stats import wilson_interval

    assert [round(v, 4) for v in wilson_interval(16, 16)] == [0.8064, 1.0]  # the 81% lower bound
    assert [round(v, 4) for v in wilson_interval(5, 10)] == [0.2366, 0.7634]
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="hits=11"):
        wilson_interval(11, 10)


def test_table_row_carries_wilson_intervals():
    row = table_row([9.5, 11.5, 10.0, 20.0], 10.0, 10.0)
    assert row["Hit@10"] == 50.0 and row["Hit@50"] == 75.0
    assert row["Hit@10_ci"] == pytest.approx([15.0, 85.0], abs=0.01)
    assert row["Hit@50_ci"][0] < 75.0 < row["Hit@50_ci"][1]


def test_bootstrap_interval_resamples_groups_and_is_seeded():
    from metabolic.core.stats import bootstrap_interval, spearman

    rng = np.random.default_rng(0)
    groups = [(x, x + rng.normal(0, 0.5, x.size)) for x in (rng.normal(size=20) for _ in range(30))]
    stat = lambda g: spearman(np.concatenate([a for a, _ in g]), np.concatenate([b for _, b in g]))  # noqa: E731
    lo, hi = bootstrap_interval(stat, groups, n_boot=200)
    assert lo < stat(groups) < hi and 0.0 < hi - lo < 0.3
    assert bootstrap_interval(stat, groups, n_boot=200) == (lo, hi)  # seeded
    assert all(math.isnan(v) for v in bootstrap_interval(stat, groups[:2]))  # < 3 groups
    assert all(math.isnan(v) for v in bootstrap_interval(lambda g: math.nan, groups))  # undefined everywhere
