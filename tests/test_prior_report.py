"""Notebook 01's report (`metabolic.report.prior_figures`) on the prior of the real WikiText-2 training split
(the same prior on every profile: the tiny test config's equals smoke's)."""

from __future__ import annotations

import numpy as np
import pytest
from metabolic.core.config import PriorConfig
from metabolic.report import prior_figures as pf


@pytest.fixture(scope="module")
def prior(tiny_cfg):
    from metabolic.pipeline import stages

    return stages.energy_prior(tiny_cfg).prior


def test_summary_and_conclusion_state_the_real_prior(prior):
    cfg = PriorConfig()
    assert pf.summary(prior, cfg) == ["vocabulary: 50,257 tokens; unseen in the training split: 21,603",
                                      "mean cost 1.000000  median 0.8031  min 0.3000 (c_min 0.3)  max 5.8300",
                                      "tokens on the floor: 8.4%; heading-like tokens: 41"]
    assert pf.conclusion(prior, cfg, "test run") == (
        "Measured on the test run (the prior uses the whole training split on every profile): the 50,257-token prior "
        "has mean 1.000000 and minimum 0.30. Frequent short tokens cost 0.31 on average, rare long ones 1.80; 41 "
        "heading-like tokens carry the +1.0 penalty.")


def test_token_examples_name_the_frequent_dear_and_heading_tokens(prior):
    frequent, dear, heading = pf.token_examples(prior)
    assert frequent.startswith("10 most frequent tokens: ' the' 0.30, ' ,' 0.30, ' .' 0.30, ' of' 0.30")
    assert dear.startswith("10 most expensive tokens: ' =================================================================' 5.83")
    assert heading == ("heading-like tokens: '=' 1.05, ' =' 1.11, '==' 2.38, '====' 2.49, '========' 2.71, "
                       "'================' 3.14, ' ==' 2.44, '================================' 4.00, ' Notes' 1.51, "
                       "' Gallery' 1.46, 'Contents' 2.71, 'Notes' 1.40")  # the first 12 heading-like tokens


def test_histogram_counts_every_token_once(prior):
    fig = pf.cost_histogram(prior)
    assert int(np.sum(fig.data[0].y)) == prior.cost.size
    assert [a.text for a in fig.layout.annotations] == ["mean 1.00", "median 0.80"]
    assert fig.layout.title.text == ("Synthetic token-cost prior over the full vocabulary<br><sup>n = 50,257 vocabulary "
                                     "tokens in 80 equal bins</sup>")
    assert (fig.layout.xaxis.title.text, fig.layout.yaxis.title.text) == (pf.COST, "tokens per bin (log scale)")


def test_frequency_grid_holds_every_seen_token_and_the_heading_tokens(prior):
    fig = pf.cost_against_frequency(prior)
    grid, heading = fig.data
    seen = prior.counts > 0
    assert int(np.sum(grid.customdata)) == int(seen.sum()) == 50_257 - 21_603
    assert np.asarray(grid.customdata).shape == (pf.GRID_BINS, pf.GRID_BINS)
    ids = np.flatnonzero(prior.heading & seen)
    assert list(heading.x) == list(prior.counts[ids]) and list(heading.y) == list(prior.cost[ids])
    assert list(heading.text) == [prior.tokens[i] for i in ids] and heading.name == f"heading-like tokens (n = {ids.size})"
    assert "n = 28,654 tokens seen in the training split, counted in a 60 x 60 grid; 21,603 unseen tokens not shown" in (
        fig.layout.title.text)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.title.text == pf.COST


def test_extremes_are_the_cheapest_and_dearest_hundred(prior):
    fig = pf.extremes_box(prior)
    cheap, dear = fig.data
    ordered = np.sort(prior.cost)
    assert np.array_equal(np.sort(cheap.y), ordered[:100]) and np.array_equal(np.sort(dear.y), ordered[-100:])
    assert (cheap.name, dear.name) == ("100 cheapest tokens", "100 most expensive tokens")
    assert dear.text[0] == " =================================================================" and dear.y[0] == prior.cost.max()
    assert fig.layout.yaxis.title.text == pf.COST and fig.layout.xaxis.title.text == "token group (of 50,257)"
