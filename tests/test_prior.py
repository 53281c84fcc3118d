"""Synthetic energy prior (eq. 8): normalisation, floor, heading penalty, frequency/length ordering."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from metabolic.core.config import PriorConfig
from metabolic.core.errors import ConfigError, DataError
from metabolic.data.prior import base_cost, build_prior, decoded_tokens, is_heading_like, normalise_with_floor, token_counts


@pytest.fixture(scope="module")
def real_prior_inputs(tiny_cfg):
    from metabolic.pipeline import stages

    data = stages.corpus(tiny_cfg)
    vocab = len(data.tokenizer)
    return token_counts(data.train_ids, vocab), decoded_tokens(data.tokenizer, vocab)


def test_prior_acceptance_on_the_real_corpus(real_prior_inputs):
    counts, tokens = real_prior_inputs
    cfg = PriorConfig()
    prior = build_prior(counts, tokens, cfg)
    assert abs(prior.cost.mean() - 1.0) < 1e-6
    assert prior.cost.min() >= cfg.c_min
    # heading-like tokens cost more than they would without the penalty
    plain = build_prior(counts, tokens, dataclasses.replace(cfg, apply_heading_penalty=False))
    assert prior.heading.sum() >= 10
    assert np.all(prior.cost[prior.heading] > plain.cost[prior.heading])
    # frequent short tokens are cheaper than rare long ones
    # (heading markers such as " =" are frequent and short but deliberately penalised: compared apart)
    plain_tokens = ~prior.heading
    frequent_short = (counts >= np.quantile(counts[counts > 0], 0.99)) & (prior.lengths <= 3) & plain_tokens
    rare_long = (counts <= 2) & (prior.lengths >= 8) & plain_tokens
    assert frequent_short.sum() > 20 and rare_long.sum() > 20
    assert prior.cost[frequent_short].max() < prior.cost[rare_long].min()


def test_unseen_tokens_cost_like_the_rarest_seen_ones(real_prior_inputs):
    counts, tokens = real_prior_inputs
    cfg = PriorConfig()
    base = base_cost(counts, np.ones(len(counts)), cfg)
    unseen, once = counts == 0, counts == 1
    assert np.allclose(base[unseen], base[once][0])
    assert base.max() == pytest.approx(base[once][0])


@pytest.mark.parametrize(
    "text, expected",
    [("=", True), (" =", True), (" ==", True), ("====", True), (" Biography", True), ("Summary", True),
     ("References", True), ("summary", False), (" biography", False), (" History", False), (" the", False),
     ("", False), ("   ", False), ("=a", False)],
)
def test_heading_rule(text, expected):
    assert is_heading_like(text) is expected


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float64, st.integers(1, 300), elements=st.floats(1e-3, 1e3)),
    st.floats(0.0, 0.95),
    st.floats(0.0, 0.5),
    st.data(),
)
def test_normalisation_gives_mean_one_and_respects_the_floor(base, c_min, pen, data):
    mask = data.draw(arrays(np.bool_, base.shape))
    penalty = np.where(mask, pen, 0.0)
    if np.maximum(c_min, penalty).mean() >= 1.0:
        with pytest.raises(ConfigError):
            normalise_with_floor(base, penalty, c_min)
        return
    cost = normalise_with_floor(base, penalty, c_min)
    assert abs(cost.mean() - 1.0) < 1e-9
    assert cost.min() >= c_min - 1e-12
    # without penalty the order of base costs is kept
    plain = normalise_with_floor(base, np.zeros_like(base), c_min)
    order = np.argsort(base, kind="stable")
    assert np.all(np.diff(plain[order]) >= -1e-12)


def test_counts_reject_ids_outside_the_vocabulary():
    with pytest.raises(DataError, match="token id 10 is outside the vocabulary of size 10"):
        token_counts([[1, 2, 10]], 10)


def test_counts_of_an_empty_corpus_are_an_error():
    with pytest.raises(DataError, match="no tokens"):
        base_cost(np.zeros(5), np.ones(5), PriorConfig())
