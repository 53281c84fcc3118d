"""Notebook 04's tables and figures (`metabolic.report.table1`, `metabolic.report.budget_figures`) on the
committed cpu run's `tables.json` and `examples.jsonl`, and on constructed tables where the run has none of a kind."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from metabolic.core.artefacts import read_json
from metabolic.report import budget_figures as bf
from metabolic.report import table1

RUN = next((Path(__file__).resolve().parents[1] / "results" / "budgets").glob("cpu-*"))


@pytest.fixture(scope="module")
def combined():
    return read_json(RUN / "tables.json")


def test_budget_lines_state_the_budgets_and_their_source(combined):
    assert table1.budget_lines(combined, "raw", 123) == [
        "budgets (CSC, scale=raw): {'high': 0.2942, 'low': 0.1507, 'medium': 0.204}",
        "  from: quantiles [0.25, 0.5, 0.75] of the true CSC of 131 training-text continuations (first 16 tokens = "
        "prompt, 1..32 tokens counted)",
        "training targets (whole texts, all tokens counted): [0.1507, 0.204, 0.2942]; true CSC of training-text "
        "continuations: min 0.0002 median 0.2040 max 0.8960",
        "budget range accepted (CSC): [0.0002, 0.896]",
        "64 prompts x 3 samples = 192 generations per level and table; 123 records"]
    assert table1.verified_budget_lines(combined) == [
        "verified budgets per scale: {'length': {'high': 13.4578, 'low': 7.112, 'medium': 9.7917}}",
        "candidates sampled from: expected-cost (best checkpoint; budget pathway off)"]


def test_paper_rows_are_the_papers_table_by_level():
    rows = table1.paper_rows()
    assert [r["level"] for r in rows] == ["low", "medium", "high"]
    assert [(r["Budget"], r["MAE"], r["Hit@10"]) for r in rows] == [(5.01, 1.78, 0.0), (7.16, 0.37, 100.0), (9.31, 2.52, 0.0)]
    assert list(rows[0]) == ["level", *table1.TABLE_I_COLUMNS]


def test_verified_and_proxy_rows_read_each_level(combined):
    row = table1.verified_rows(combined["tables"]["verified_n2_length"])[0]
    assert (row["level"], row["Hit@10 CI"], row["outcome"]) == ("low", "96 [93, 98]", "closest above 5, closest below 2, in band 185")
    assert row["Hit@10"] == pytest.approx(96.354, abs=1e-3) and row["labels/gen"] == pytest.approx(87.432, abs=1e-3)
    proxy = table1.proxy_space_rows(combined["tables"]["faithful_plain"])
    assert [r["level"] for r in proxy] == ["low", "medium", "high"]
    assert proxy[0]["stopped by"] == "budget 177, eos 1, sentence 14" and proxy[0]["Hit@10"] == pytest.approx(94.271, abs=1e-3)
    assert proxy[0]["calibrated MAE"] == pytest.approx(0.006644, abs=1e-6)


def test_steering_rows_put_steered_beside_unsteered_at_each_n(combined):
    rows = table1.steering_rows(combined)
    assert [(r["scale"], r["N"], r["candidates"]) for r in rows] == [("length", n, "unsteered") for n in (1, 2, 4, 8)]
    assert [r["Hit@10 high"] for r in rows] == pytest.approx([86.458, 96.875, 100.0, 100.0], abs=1e-3)
    steered = copy.deepcopy(combined)
    for n in (1, 4):
        table = {**copy.deepcopy(steered["tables"][f"verified_n{n}_length"]), "decoding": "verified_steered"}
        steered["tables"][f"verified_steered_n{n}_length"] = table
    rows = table1.steering_rows(steered)
    assert [(r["N"], r["candidates"]) for r in rows] == [(1, "steered"), (1, "unsteered"), (2, "unsteered"),
                                                         (4, "steered"), (4, "unsteered"), (8, "unsteered")]
    assert table1.example_tables(steered) == ["verified_n8_length", "expected-cost_steered"]  # steered never shown


def test_example_tables_and_scales_come_from_the_tables(combined):
    assert table1.example_tables(combined) == ["verified_n8_length", "expected-cost_steered"]
    assert table1.scales(combined) == ["length", "raw"]
    lines = table1.committed_example_lines(combined, profile="cpu")
    headers = [line for line in lines if not line.startswith("  ")]
    assert headers == ["expected-cost_steered:", "verified_n8_length:"]
    assert len(lines) == 2 + 2 * 15  # five per level and table
    assert lines[1].startswith("  [low] budget 0.151, true CSC 0.256, 43 tokens: 'After completing a conversion course")


def test_fluency_rows_pair_budgeted_with_unbudgeted_text(combined):
    rows = {r["table"]: r for r in table1.fluency_rows(combined)}
    assert list(rows) == ["expected-cost_plain", "expected-cost_steered", "faithful_plain", "faithful_steered",
                          "verified_n1_length", "verified_n2_length", "verified_n4_length", "verified_n8_length"]
    assert rows["faithful_plain"]["rel. change"] == pytest.approx(0.11283, abs=1e-5)
    assert rows["verified_n1_length"]["judge ppl"] == rows["verified_n1_length"]["unbudgeted judge ppl"]
    assert "model val ppl" not in rows["verified_n8_length"]


def test_cost_model_rows_and_goals(combined):
    assert table1.cost_model_heading(combined, 96) == ("held-out: 3344 tokens of 96 validation texts, 66 continuations; "
                                                       "true CSC sd/mean 2.89")
    rows = table1.cost_model_rows(combined)
    assert [r["model"] for r in rows] == ["learned, expected-cost", "learned, faithful", *table1.CEILING_PREDICTORS]
    assert rows[3]["token_spearman 95% CI"] == "[0.61, 0.66]" and rows[-1]["token_spearman 95% CI"] == "[nan, nan]"
    assert table1.cost_model_goal_lines(combined) == [
        "ceiling: {'token_spearman': '0.631 (ridge_log)', 'continuation_r2': '0.042 (ridge_log)'}",
        "expected-cost: continuation_r2 0.024 = 56% of the ceiling, goal 0.038: NOT met; token_spearman 0.629 = 100% of "
        "the ceiling, goal 0.600: met",
        "faithful: continuation_r2 0.039 = 93% of the ceiling, goal 0.038: met; token_spearman 0.614 = 97% of the "
        "ceiling, goal 0.600: met"]


def _record(variant, decoding, budget, achieved, prompt="p", **extra):
    return {"variant": variant, "decoding": decoding, "level": "low", "budget_csc": budget, "csc": achieved,
            "budget_proxy": budget / 10, "spent_proxy": achieved / 10, "prompt": prompt, **extra}


def test_reliability_figures_split_the_records_by_scale_and_space():
    records = [_record("faithful", "steered", 1.0, 1.1), _record("verified", "verified_n8_raw", 1.0, 0.9),
               _record("verified", "verified_n8_length", 5.0, 5.5), _record("baseline", "baseline_token_count_raw", 1.0, 1.3)]
    figs = bf.reliability_figures(records)
    assert list(figs) == ["04_reliability_csc", "04_reliability_csc_length", "04_reliability_proxy"]

    def points(fig):  # each generation's (target, achieved), by group
        return {t.legendgroup: list(zip(t.x, t.y)) for t in fig.data if t.mode == "markers"}

    assert points(figs["04_reliability_csc"]) == {"faithful / steered": [(1.0, 1.1)], "verified / verified_n8_raw": [(1.0, 0.9)],
                                                  "baseline / baseline_token_count_raw": [(1.0, 1.3)]}
    assert points(figs["04_reliability_csc_length"]) == {"verified / verified_n8_length": [(5.0, 5.5)]}
    assert points(figs["04_reliability_proxy"]) == {"faithful / steered": [(0.1, pytest.approx(0.11))]}
    assert figs["04_reliability_proxy"].layout.xaxis.title.text == "calibrated budget (proxy units)"


def test_cost_summary_names_the_extremes():
    costs = {"faithful": np.array([0.5, 0.1, 0.9, 0.3]), "expected-cost": np.array([0.2, 0.2, 0.1, 0.4])}
    assert bf.cost_summary(costs, ["a", "b", "c", "d"], n=2) == [
        "faithful: C_vocab over 4 tokens: mean 0.45000 median 0.40000 min 0.10000 max 0.90000",
        "  cheapest: 'b', 'd'", "  dearest:  'c', 'a'",
        "expected-cost: C_vocab over 4 tokens: mean 0.22500 median 0.20000 min 0.10000 max 0.40000",
        "  cheapest: 'c', 'a'", "  dearest:  'd', 'b'"]


def test_cost_examples_show_the_steered_decodings_of_the_prompts(tokenizer):
    ids = tokenizer.encode(" The budget")

    def record(decoding, prompt):
        return _record("faithful", decoding, 1.0, 1.0, prompt=prompt, generated_ids=ids, token_costs=[0.1] * len(ids),
                       stopped_by="budget")

    costs = {"faithful": np.linspace(0, 1, 101)}
    records = [record("plain", "a"), record("steered", "a"), record("steered", "b"), record("verified_n8_raw", "a")]
    records[-1]["variant"] = "verified"
    page = bf.cost_examples_html(records, tokenizer, costs, ["b"])
    assert page.count("<h4>") == 1 and "<h4>faithful · steered · low" in page
    fallback = bf.cost_examples_html(records, tokenizer, costs, ["not a prompt"])  # no steered one: every proxy decoding
    assert fallback.count("<h4>") == 2 and "plain" in fallback and "verified" not in fallback
