"""Stop rules judged on fixed text (`metabolic.evaluate.stop_rules`) and the baselines on the verified pools."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metabolic.core.budget import ProxyCalibration
from metabolic.evaluate.stop_rules import RULES, LabelledContinuation, best_length, judge_stop_rules, label_continuations
from metabolic.evaluate.verified_rows import baseline_cut, nearest_stop
from metabolic.generate.verified import Candidate, PrefixLabeller


def text(totals, prompt_len=4, stops=None) -> LabelledContinuation:
    totals = np.asarray(totals, dtype=np.float64)
    stops = np.arange(1, totals.size + 1) if stops is None else np.asarray(stops)
    return LabelledContinuation(list(range(prompt_len)), list(range(100, 100 + int(stops[-1]))), stops, totals)


def test_length_scale_multiplies_each_prefix_by_its_text_length():
    t = text([0.1, 0.2, 0.25], prompt_len=4)
    assert t.totals("length").tolist() == pytest.approx([0.5, 1.2, 1.75])
    assert t.totals("raw") is t.raw_totals


def test_best_length_maximises_hits_and_prefers_the_shorter():
    texts = [text([0.1, 0.2, 0.3, 0.4]), text([0.1, 0.2, 0.31, 0.5]), text([0.2, 0.3, 0.5, 0.6])]
    # budget 0.3: length 2 hits 1 text, length 3 hits 2 (0.3, 0.31), length 4 none
    assert best_length(texts, 0.3, "raw", 0.1, 4) == 3
    # budget 0.5: lengths 3 and 4 hit one text each: the shorter wins
    assert best_length(texts, 0.5, "raw", 0.1, 4) == 3
    assert best_length(texts, 0.2, "raw", 0.1, 4) == 2


def _tok():
    class Tok:  # only `decode` of single ids is read (sentence ends): none here
        def __len__(self):
            return 200

        def decode(self, ids):
            return "x"
    return Tok()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(0.001, 0.2), min_size=3, max_size=12), min_size=3, max_size=8),
       st.floats(0.1, 1.5), st.integers(0, 1000))
def test_exact_bounds_every_rule_and_the_oracle_bounds_the_fitted_length(steps, budget, seed):
    texts = [text(np.cumsum(s)) for s in steps]
    costs = np.full(200, 0.05)
    out = judge_stop_rules(texts, texts[::-1], {"only": budget}, "raw", rate=0.1, token_costs=costs,
                           calibration=ProxyCalibration(0.0, 1.0), tokenizer=_tok(), band=0.1, max_tokens=12, seed=seed)
    hits = {rule: out["rules"][rule]["only"]["Hit@10"] for rule in RULES}
    assert all(hits["exact"] >= h for h in hits.values())  # exact picks an in-band stop wherever one exists
    assert hits["length_oracle"] >= hits["length_fitted"]  # the oracle's length is the best on these texts
    for rule in RULES:
        lo, hi = out["rules"][rule]["only"]["Hit@10_ci"]
        assert lo <= hits[rule] <= hi


def test_proxy_rule_stops_where_the_learned_spend_meets_the_budget():
    t = text(np.linspace(0.1, 1.0, 10))
    costs = np.zeros(200)
    costs[100:110] = 0.1  # each token of the text spends 0.1 proxy: spend after k tokens is 0.1 k
    out = judge_stop_rules([t], [t], {"b": 0.5}, "raw", rate=0.1, token_costs=costs,
                           calibration=ProxyCalibration(0.0, 1.0), tokenizer=_tok(), band=0.1, max_tokens=10)
    # stop_rule fires at spend >= B - rate/2 = 0.45: after 5 tokens (0.5), whose true total is 0.5: a hit
    assert out["rules"]["proxy"]["b"] == {"Hit@10": 100.0, "Hit@10_ci": pytest.approx([20.65, 100.0], abs=0.01),
                                          "mean_tokens": 5.0, "mean_csc": pytest.approx(0.5), "n": 1}
    assert out["rules"]["token_count"]["b"]["mean_tokens"] == 5.0  # 0.5 / 0.1 tokens


def test_baseline_cuts():
    c = Candidate(prompt_index=0, index=0, ids=list(range(10)), mean_logprob=-1.0, stops=np.array([2, 4, 7, 10]),
                  sentence_stops=frozenset())
    rng = np.random.default_rng(0)
    assert nearest_stop(c.stops, 5.4) == 4 and nearest_stop(c.stops, 5.5) == 4 and nearest_stop(c.stops, 5.6) == 7
    assert baseline_cut("token_count", c, 0.3, 0.05, rng) == 7  # 6 tokens -> the nearest stop
    assert {baseline_cut("random_cut", c, 0.3, 0.05, rng) for _ in range(50)} == {2, 4, 7, 10}
    with pytest.raises(ValueError, match="unknown"):
        baseline_cut("oracle", c, 0.3, 0.05, rng)


@pytest.fixture(scope="module")
def labeller(tokenizer, assets_dir):
    from metabolic.core.assets import load_encoder
    from metabolic.csc.labeller import CSCLabeller

    return CSCLabeller(load_encoder("sentence-transformers/all-MiniLM-L6-v2").value, tokenizer, batch_size=64)


def test_labelled_continuations_are_the_labellers_prefix_totals(tokenizer, labeller):
    texts = ["The river flows north through the old town. It was built in 1820 by the mill owners.",
             "Robert Boulter is an English film and television actor."]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    prefixes = PrefixLabeller(labeller)
    (a, b) = label_continuations(ids + [ids[0][:3]], tokenizer, prefixes, prompt_tokens=4, max_tokens=8, n_texts=5)
    assert a.ids == ids[0][4:12] and b.ids == ids[1][4:12]  # the too-short third text is skipped
    for t in (a, b):
        assert t.stops[-1] == len(t.ids) and t.stops.size == t.raw_totals.size
        k = int(t.stops[1])
        truth = labeller.label_generated([t.prompt_ids], [t.ids[:k]])[0].astype(np.float64).sum()
        assert t.raw_totals[1] == pytest.approx(truth, abs=1e-6)
