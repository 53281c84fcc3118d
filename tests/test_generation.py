"""Budgeted generation: processor and criterion contracts, identity with plain generate(), bad input."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from metabolic.core.errors import ConfigError, DataError
from metabolic.generate.budgeted import generate_with_budget, kept_lengths, plain_generate, sentence_end_mask
from metabolic.generate.processors import BudgetStoppingCriteria, CostSteeringLogitsProcessor, stop_rule
from metabolic.core.budget import ProxyCalibration
from tiny_lm import tiny_gpt2, token_costs

PROMPTS = ["The future of artificial intelligence", "Hello"]  # different lengths: left padding is exercised


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt2(tokenizer)


@pytest.fixture(scope="module")
def costs(tokenizer):
    return token_costs(len(tokenizer))


IDENTITY = ProxyCalibration(a=0.0, b=1.0)


# --- identity with plain generate() -------------------------------------------------------------


@pytest.mark.parametrize("do_sample", [True, False])
@pytest.mark.parametrize("steer", [False, True])
def test_unlimited_budget_matches_plain_generate(model, tokenizer, costs, do_sample, steer):
    ref = plain_generate(model, tokenizer, PROMPTS, max_new_tokens=12, do_sample=do_sample, seed=3)
    gens = generate_with_budget(model, tokenizer, PROMPTS, math.inf, token_costs=costs, calibration=IDENTITY,
                                max_new_tokens=12, steer=steer, stop=True, do_sample=do_sample, seed=3)
    prompt_len = ref.shape[1] - 12
    for row, g in enumerate(gens):
        expected = ref[row, prompt_len:].tolist()
        if tokenizer.eos_token_id in expected:  # the text ends at EOS; generate pads after it
            expected = expected[: expected.index(tokenizer.eos_token_id)]
        assert g.generated_ids == expected
        assert g.stopped_by in ("max_new_tokens", "eos")
        if steer:
            assert g.lambdas == [0.0] * len(g.generated_ids)


# --- the steering processor ---------------------------------------------------------------------


def test_processor_returns_new_tensor_and_leaves_scores_alone(costs):
    proc = CostSteeringLogitsProcessor(costs, [0.5, 2.0], prompt_len=3, max_new_tokens=10, two_sided=True)
    scores = torch.randn(2, costs.numel())
    before = scores.clone()
    ids = torch.randint(0, costs.numel(), (2, 5))
    out = proc(ids, scores)
    assert out is not scores and out.data_ptr() != scores.data_ptr()
    assert torch.equal(scores, before)
    lam = proc.last_lambda
    assert torch.allclose(out, scores - lam[:, None] * costs[None, :] / proc.lambda_unit, atol=1e-6)
    assert proc.lambda_unit == pytest.approx(float(costs.std()))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), pace_quantile=st.floats(0.2, 0.8))
def test_processor_tilts_expected_cost_to_the_pace(seed, pace_quantile):
    """When the pace lies inside the reachable range, E_tilted[C] lands on it (within Newton's error)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 64
    costs = 0.05 + torch.rand(vocab, generator=gen)
    scores = torch.randn(1, vocab, generator=gen)
    mean0 = float(torch.softmax(scores, -1) @ costs)
    # a pace between the cheapest-weighted and the untilted expectation, or above it
    lo, hi = float(costs.min()) + 0.2, float(costs.max()) - 0.2
    pace = lo + (hi - lo) * pace_quantile
    proc = CostSteeringLogitsProcessor(costs, [pace * 4], prompt_len=0, max_new_tokens=4, lambda_max=50.0, newton_steps=8,
                                       two_sided=True)
    out = proc(torch.zeros(1, 0, dtype=torch.long), scores)
    tilted = float(torch.softmax(out, -1) @ costs)
    assert abs(tilted - pace) < abs(mean0 - pace) + 1e-6  # never further from the pace than before
    assert abs(tilted - pace) < 0.02
    assert math.copysign(1, float(proc.last_lambda)) == math.copysign(1, mean0 - pace) or abs(mean0 - pace) < 1e-3


def test_processor_lambda_sign_follows_the_spend(costs):
    """A row far over its pace gets lambda > 0 (cheaper tokens), one far under gets lambda < 0."""
    scores = torch.zeros(2, costs.numel())
    ids = torch.zeros(2, 4, dtype=torch.long)  # prompt_len 2, two generated tokens of cost costs[0]
    proc = CostSteeringLogitsProcessor(costs, [costs[0].item() * 2.05, 100.0], prompt_len=2, max_new_tokens=10, two_sided=True)
    lam = proc.lambdas(ids, scores)
    assert lam[0] > 0 and lam[1] < 0
    assert lam.abs().max() <= proc.lambda_max
    one_sided = CostSteeringLogitsProcessor(costs, [costs[0].item() * 2.05, 100.0], 2, 10, two_sided=False)
    assert one_sided.lambdas(ids, scores)[1] == 0


def test_processor_handles_masked_scores(costs):
    scores = torch.full((1, costs.numel()), -math.inf)
    scores[0, :5] = torch.tensor([1.0, 0.5, 0.2, 0.0, -1.0])  # what top-k leaves
    out = CostSteeringLogitsProcessor(costs, [0.1], 0, 5)(torch.zeros(1, 0, dtype=torch.long), scores)
    assert torch.isfinite(out[0, :5]).all() and torch.isinf(out[0, 5:]).all()


# --- the stopping criterion ---------------------------------------------------------------------


def test_stop_rule_exact_values():
    spent = torch.tensor([0.9, 0.94, 0.96, 0.5], dtype=torch.float64)
    budget = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    at_end = torch.tensor([False, True, False, True])
    # n = 10 generated: average 0.09-0.096, half of it 0.045-0.048
    out = stop_rule(spent, 10, budget, at_end, sentence_slack=0.05)
    # 0.9 < 1 - 0.045 -> go on; 0.94 at a sentence end >= 0.95? no, but 0.94 >= 1 - 0.047 -> no; 0.96 >= 1-0.048 -> stop
    assert out.tolist() == [False, False, True, False]
    assert stop_rule(spent, 10, torch.full((4,), math.inf, dtype=torch.float64), at_end, 0.1).tolist() == [False] * 4


def test_criterion_contract_and_rows(costs):
    vocab = costs.numel()
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    spent = float(costs[3] + costs[4])
    crit = BudgetStoppingCriteria(costs, [spent, spent * 10], prompt_len=2)
    out = crit(ids, None)
    assert out.dtype == torch.bool and out.shape == (2,)
    assert out.tolist() == [True, False]
    assert crit(ids[:, :2], None).tolist() == [False, False]  # nothing generated yet
    end = torch.zeros(vocab, dtype=torch.bool)
    end[4] = True
    soft = BudgetStoppingCriteria(costs, [spent / 0.95], prompt_len=2, sentence_end=end, sentence_slack=0.1)
    assert soft(ids[:1], None).tolist() == [True]


def test_generation_stops_near_budget_per_row(model, tokenizer, costs):
    budgets = [0.6, 1.5]
    gens = generate_with_budget(model, tokenizer, PROMPTS, budgets, token_costs=costs, calibration=IDENTITY,
                                max_new_tokens=30, steer=False, seed=1)
    top = float(costs.max())
    for g, b in zip(gens, budgets):
        # 30 tokens at ~0.17 each would spend ~5: both budgets bind, so both rows end at their budget
        assert g.stopped_by == "budget" and 0 < len(g.generated_ids) < 30
        assert b - top <= g.spent_proxy <= b + top
        assert abs(g.spent_proxy - b) <= top / 2 + max(c for c in costs[g.generated_ids].tolist()) / 2 + 1e-9
        assert g.spent_proxy == pytest.approx(float(costs[g.generated_ids].double().sum()))
    assert len(gens[0].generated_ids) < len(gens[1].generated_ids)  # the larger budget's row runs longer


def test_steering_moves_spend_towards_the_budget(model, tokenizer, costs):
    """Over a fixed window (no stopping), steering spends closer to the budget than plain sampling."""
    prompts = ["The history of the city", "In 1990 the team"] * 2
    n = 20
    for budget in (0.8, 5.0):  # pace 0.04/token (cheap) and 0.25/token (dear), the mean cost is 0.17
        free = generate_with_budget(model, tokenizer, prompts, budget, token_costs=costs, calibration=IDENTITY,
                                    max_new_tokens=n, steer=False, stop=False, seed=5)
        steered = generate_with_budget(model, tokenizer, prompts, budget, token_costs=costs, calibration=IDENTITY,
                                       max_new_tokens=n, steer=True, stop=False, seed=5, two_sided=True)
        err_free = sum(abs(g.spent_proxy - budget) for g in free)
        err_steered = sum(abs(g.spent_proxy - budget) for g in steered)
        assert err_steered < err_free


def test_kept_lengths_matches_the_criterion(costs):
    gen = torch.tensor([[5, 6, 7, 8, 9], [5, 50256, 0, 0, 0]])
    budgets = torch.tensor([float(costs[5] + costs[6] + costs[7]), 100.0], dtype=torch.float64)
    out = kept_lengths(gen, costs, budgets, None, 0.1, eos_token_id=50256)
    crit = BudgetStoppingCriteria(costs, budgets[:1], prompt_len=0)
    first = next(t for t in range(1, 6) if crit(gen[:1, :t], None)[0])
    assert out[0] == (first, "budget")
    assert out[1] == (1, "eos")


def test_sentence_end_mask(tokenizer):
    mask = sentence_end_mask(tokenizer, len(tokenizer))
    assert mask[tokenizer.encode(".")[0]] and mask[tokenizer.encode("?")[0]]
    assert not mask[tokenizer.encode(" the")[0]]


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.0, -1.0, math.nan, [1.0, math.nan]])
def test_bad_budgets_raise(model, tokenizer, costs, budget):
    with pytest.raises(ConfigError, match="budget"):
        generate_with_budget(model, tokenizer, PROMPTS, budget, token_costs=costs, calibration=IDENTITY, max_new_tokens=4)


@pytest.mark.parametrize("budget", ["abc", None, [1.0, "x"], {"low": 1.0}])
def test_budgets_that_are_not_numbers_name_the_value(model, tokenizer, costs, budget):
    with pytest.raises(ConfigError, match=r"^budget_csc=.* is not a number: give budgets > 0") as info:
        generate_with_budget(model, tokenizer, PROMPTS, budget, token_costs=costs, calibration=IDENTITY, max_new_tokens=4)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("prompts", [[], [""], ["ok", "   "]])
def test_empty_prompts_raise(model, tokenizer, costs, prompts):
    with pytest.raises(DataError, match="prompt"):
        generate_with_budget(model, tokenizer, prompts, 1.0, token_costs=costs, calibration=IDENTITY, max_new_tokens=4)


def test_prompt_longer_than_context_raises(model, tokenizer, costs):
    long_prompt = "word " * 60  # the tiny model has 48 positions
    with pytest.raises(DataError, match="context of 48"):
        generate_with_budget(model, tokenizer, [long_prompt], 1.0, token_costs=costs, calibration=IDENTITY, max_new_tokens=4)


def test_out_of_range_budget_is_clamped_with_a_warning(model, tokenizer, costs, caplog):
    with caplog.at_level(logging.WARNING, logger="metabolic.generate.budgeted"):
        gens = generate_with_budget(model, tokenizer, ["Hello"], 500.0, token_costs=costs, calibration=IDENTITY,
                                    max_new_tokens=4, budget_range=(0.5, 2.0))
    assert gens[0].budget_requested_csc == 500.0 and gens[0].budget_csc == 2.0 and gens[0].budget_proxy == 2.0
    assert "outside the trained range" in caplog.text


def test_calibration_maps_and_validates():
    cal = ProxyCalibration(a=-7.297, b=2.0)
    assert cal.to_proxy(cal.to_csc(3.0)) == pytest.approx(3.0)
    assert cal.to_proxy(5.0) == pytest.approx((5.0 + 7.297) / 2.0)
    with pytest.raises(ConfigError, match="slope"):
        ProxyCalibration(a=0.0, b=0.0)
    with pytest.raises(ConfigError, match="finite"):
        ProxyCalibration(a=math.nan, b=1.0)


def test_budget_below_the_calibration_intercept_raises(model, tokenizer, costs):
    with pytest.raises(ConfigError, match="above 2"):
        generate_with_budget(model, tokenizer, ["Hi"], 1.0, token_costs=costs, calibration=ProxyCalibration(2.0, 1.0), max_new_tokens=4)


def test_processor_argument_validation(costs):
    with pytest.raises(ConfigError):
        CostSteeringLogitsProcessor(costs[None, :], [1.0], 0, 4)
    with pytest.raises(ConfigError):
        CostSteeringLogitsProcessor(-costs, [1.0], 0, 4)
    with pytest.raises(ConfigError):
        CostSteeringLogitsProcessor(costs, [1.0], 0, 0)
    with pytest.raises(ConfigError):
        BudgetStoppingCriteria(costs, [1.0], 0, sentence_slack=1.0)
    proc = CostSteeringLogitsProcessor(costs, [1.0], 0, 4)
    with pytest.raises(DataError, match="token_costs"):
        proc(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 10))
    with pytest.raises(ConfigError, match="batch rows"):
        CostSteeringLogitsProcessor(costs, [1.0, 2.0], 0, 4)(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, costs.numel()))


# --- MetabolicGPT-2: the budget pathway through the backbone's generate() ------------------------


@pytest.fixture(scope="module")
def metabolic_model(tokenizer):
    from metabolic.model.metabolic_gpt2 import MetabolicGPT2, MetabolicSettings

    model = MetabolicGPT2(tiny_gpt2(tokenizer), MetabolicSettings(K=3, budget_scale=0.5, per_layer_budget=True))
    torch.manual_seed(11)
    with torch.no_grad():  # a non-zero budget pathway, as after training
        model.budget_proj.weight.normal_(0, 2.0)
        for proj in model.layer_budget_proj:
            proj.weight.normal_(0, 1.0)
        model.set_calibration([0.1] * 3, [2.0] * 3)
    return model.eval()


def test_budget_conditioning_reproduces_the_model_logits(metabolic_model):
    ids = torch.tensor([[464, 2003, 286, 11666], [15496, 995, 13, 383]])
    budgets = torch.tensor([0.3, 2.0])
    with torch.no_grad():
        expected = metabolic_model(ids, budget=budgets).logits
        plain = metabolic_model.backbone(input_ids=ids).logits
        with metabolic_model.conditioned_on(budgets):
            got = metabolic_model.backbone(input_ids=ids).logits
        after = metabolic_model.backbone(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the pathway matters here
    assert torch.equal(after, plain)  # hooks removed


def test_metabolic_generation_uses_model_costs_and_budget(metabolic_model, tokenizer):
    from metabolic.generate.budgeted import model_token_costs

    gens = generate_with_budget(metabolic_model, tokenizer, PROMPTS, [0.4, 0.9], max_new_tokens=10, seed=2)
    costs = model_token_costs(metabolic_model)
    cal = metabolic_model.proxy_calibration()
    assert (cal.a, cal.b) == pytest.approx((0.1, 2.0))
    for g, b in zip(gens, [0.4, 0.9]):
        assert g.budget_proxy == pytest.approx((b - 0.1) / 2.0)
        assert g.spent_proxy == pytest.approx(float(costs[g.generated_ids].double().sum()), rel=1e-6)
    # budget-conditioned sampling differs from the unconditioned backbone on the same seed
    free = plain_generate(metabolic_model, tokenizer, PROMPTS, max_new_tokens=10, seed=2)
    cond = generate_with_budget(metabolic_model, tokenizer, PROMPTS, [0.4, 0.9], max_new_tokens=10, seed=2,
                                steer=False, stop=False)
    assert [g.generated_ids for g in cond] != [free[r, -10:].tolist() for r in range(2)]


def test_one_sided_shortcut_is_exact(costs):
    """Under budget, the one-sided brake skips the softmax; the full solve gives the same zero lambda."""
    scores = torch.randn(2, costs.numel())
    ids = torch.zeros(2, 3, dtype=torch.long)
    fast = CostSteeringLogitsProcessor(costs, [100.0], prompt_len=2, max_new_tokens=5)
    full = CostSteeringLogitsProcessor(costs, [100.0], prompt_len=2, max_new_tokens=5, two_sided=True)
    assert fast.lambdas(ids, scores).tolist() == [0.0, 0.0]
    assert (full.lambdas(ids, scores) < 0).all()  # two-sided would push towards dearer tokens
    assert torch.equal(fast(ids, scores), scores)


# --- budget forcing and the budget-sized cap ------------------------------------------------------


def test_forcing_holds_eos_back_only_below_the_floor(costs, tokenizer):
    from metabolic.generate.processors import EosForcingLogitsProcessor

    eos = tokenizer.eos_token_id
    ids = torch.tensor([[1, 2, 3], [1, 2, 3]])  # prompt [1], generated [2, 3]
    spent = float(costs[[2, 3]].double().sum())  # the processor sums in float64
    proc = EosForcingLogitsProcessor(costs, [spent + 1e-3, spent], prompt_len=1, eos_token_id=eos)
    scores = torch.zeros(2, costs.numel())
    out = proc(ids, scores)
    assert out[0, eos] == -math.inf and out[1, eos] == 0.0  # a spend exactly at the floor releases EOS
    assert torch.equal(out[0, :eos], scores[0, :eos]) and torch.equal(scores, torch.zeros_like(scores))
    with pytest.raises(ConfigError, match="floor_proxy"):
        EosForcingLogitsProcessor(costs, [-1.0], prompt_len=1, eos_token_id=eos)
    with pytest.raises(ConfigError, match="eos_token_id"):
        EosForcingLogitsProcessor(costs, [0.1], prompt_len=1, eos_token_id=costs.numel())


@pytest.fixture(scope="module")
def eos_model(tokenizer):
    """A tiny GPT-2 whose every next-token distribution puts almost all mass on EOS."""
    m = tiny_gpt2(tokenizer, n_positions=64)
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(torch.linspace(-1, 1, m.config.n_embd))
        m.transformer.wte.weight[tokenizer.eos_token_id] = 30.0 * m.transformer.ln_f.bias
    return m


def test_forcing_makes_the_budget_end_the_text(eos_model, tokenizer, costs):
    kw = dict(token_costs=costs, calibration=IDENTITY, steer=False, stop=True, seed=0, max_new_tokens=40)
    free = generate_with_budget(eos_model, tokenizer, PROMPTS, 1.0, force=False, **kw)
    assert all(g.stopped_by == "eos" and len(g.generated_ids) == 0 for g in free)
    forced = generate_with_budget(eos_model, tokenizer, PROMPTS, 1.0, force=True, band=0.1, **kw)
    for g in forced:
        assert g.floor_proxy == pytest.approx(0.9)
        assert g.spent_proxy >= 0.9  # EOS came only once the band's lower edge was spent
        assert g.stopped_by in ("eos", "budget", "sentence")


def test_cap_is_sized_from_the_budget_and_reports_reach(model, tokenizer, costs):
    kw = dict(token_costs=costs, calibration=IDENTITY, steer=True, stop=True, seed=0, max_new_tokens=None)
    (g,) = generate_with_budget(model, tokenizer, PROMPTS[:1], 1.0, proxy_rate=0.1, **kw)
    assert g.tokens_needed == pytest.approx(10.0) and g.max_new_tokens == 20 and g.reachable
    assert len(g.generated_ids) <= 20
    (far,) = generate_with_budget(model, tokenizer, PROMPTS[:1], 100.0, proxy_rate=0.1, **kw)
    room = model.config.n_positions - len(far.prompt_ids)
    assert far.max_new_tokens == room and not far.reachable and far.tokens_needed == pytest.approx(1000.0)
    with pytest.raises(ConfigError, match="proxy_rate"):
        generate_with_budget(model, tokenizer, PROMPTS[:1], 1.0, **kw)
    with pytest.raises(ConfigError, match="band=1.5"):
        generate_with_budget(model, tokenizer, PROMPTS[:1], 1.0, proxy_rate=0.1, band=1.5, **kw)


def test_sampled_proxy_rate_is_the_spend_per_token_of_unbudgeted_samples(model, tokenizer, costs):
    from metabolic.evaluate.budgets import sampled_proxy_rate

    samples = generate_with_budget(model, tokenizer, PROMPTS, math.inf, token_costs=costs, calibration=IDENTITY,
                                   steer=False, stop=False, force=False, seed=0, max_new_tokens=12)
    ids = [i for g in samples for i in g.generated_ids]
    assert sampled_proxy_rate(samples) == pytest.approx(float(costs[ids].double().sum()) / len(ids), rel=1e-9)
    # a cap sized from that rate gives the samples' own mean spend the tokens they took, on average
    needed = [generate_with_budget(model, tokenizer, [g.prompt], g.spent_proxy, token_costs=costs, calibration=IDENTITY,
                                   proxy_rate=sampled_proxy_rate(samples), max_new_tokens=None, seed=0)[0].tokens_needed
              for g in samples]
    assert sum(needed) == pytest.approx(len(ids), rel=1e-9)
    empty = [g.__class__(**{**g.__dict__, "generated_ids": [], "spent_proxy": 0.0}) for g in samples]
    with pytest.raises(DataError, match="no rate to size the token cap"):
        sampled_proxy_rate(empty)


# --- one validator for every generation function -------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.0), ConfigError, "temperature=0.0 is invalid: use a number in"),
    (dict(temperature=-1.0), ConfigError, "temperature=-1.0"),
    (dict(temperature=math.nan), ConfigError, "temperature=nan"),
    (dict(temperature=1e-300), ConfigError, "temperature=1e-300"),
    (dict(temperature=1e300), ConfigError, "temperature=1e"),
    (dict(top_k=-1), ConfigError, "top_k=-1"),
    (dict(max_new_tokens=10**9), ConfigError, "not below the model's context of 48 tokens: use at most"),
    (dict(max_new_tokens=0), ConfigError, "max_new_tokens=0"),
    (dict(prompts=["The river \ud800 flows"]), DataError, "lone surrogate"),
])
@pytest.mark.parametrize("function", ["generate_with_budget", "plain_generate"])
def test_every_generation_function_checks_its_arguments_the_same_way(model, tokenizer, costs, kwargs, error, match,
                                                                       function):
    args = dict(prompts=PROMPTS, max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        if function == "generate_with_budget":
            generate_with_budget(model, tokenizer, budget_csc=1.0, token_costs=costs, calibration=IDENTITY, **args)
        else:
            plain_generate(model, tokenizer, **args)
