"""The learned cost model (issue 22): the scale-aware parameterisation, the ceiling predictors, budget spans.

The parameterisation tests pin down the defect they fix: under the paper's parameterisation a
cost's gradients shrink with CSC's scale (at ~1e-2 per token the costs barely move); under the
scaled one they do not depend on it at all.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metabolic.core.config import BackboneConfig
from metabolic.core.errors import DataError
from metabolic.evaluate import cost_fit
from metabolic.model.backbone import scratch_model
from metabolic.model.metabolic_gpt2 import MetabolicGPT2, MetabolicSettings
from metabolic.train import losses

IDS = torch.tensor([[464, 2003, 286, 11666, 4430, 318], [40, 716, 257, 3797, 13, 50256]])
# Per-token labels with CSC's shape (heavy-tailed, mean ~1, a zero): multiplied by a scale k below.
SHAPE = torch.tensor([[0.2, 3.0, 0.5, 0.0, 1.1, 0.7], [0.9, 0.3, 2.2, 0.4, 0.1, 1.6]])


@pytest.fixture(scope="module")
def backbone(tokenizer):
    return scratch_model(BackboneConfig(n_layer=1, n_embd=16, n_head=2, seed=4), vocab_size=len(tokenizer),
                         n_positions=32, eos_id=tokenizer.eos_token_id).eval()  # eval: no dropout noise in the gradients


def model_at(backbone, scale: float, scaled: bool) -> MetabolicGPT2:
    """Costs starting at the labels' mean `scale`: the scaled parameterisation (s = scale) or the paper's (s = 1)."""
    settings = MetabolicSettings(token_cost_init=scale, cost_scale=scale if scaled else 1.0, standardise_head=scaled,
                                 vocab_cost_min=0.0)
    model = MetabolicGPT2(backbone, settings)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a head that reads its inputs (zero weights would hide the input side)
        model.cost_head.weight.copy_(0.3 * torch.randn(model.cost_head.weight.shape, generator=gen))
        model.token_cost_logits.add_(0.5 * torch.randn(model.token_cost_logits.shape, generator=gen))
    return model


def logit_grads(model: MetabolicGPT2, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of L_CSC (in the model's own unit) w.r.t. the token-cost logits in use and the head weights."""
    model.zero_grad(set_to_none=True)
    _, costs, _ = model.hidden_and_costs(IDS, budget=torch.tensor([0.5, 0.5]))
    losses.csc_mse(costs, labels, unit=model.settings.cost_scale).backward()
    return model.token_cost_logits.grad[IDS.flatten()].clone(), model.cost_head.weight.grad.clone()


@settings(max_examples=12, deadline=None)
@given(k=st.floats(min_value=1e-4, max_value=10.0))
def test_scaled_costs_learn_alike_at_every_csc_scale(backbone, k):
    """Scaled: the logits' gradients at labels k x SHAPE equal those at SHAPE (exactly scale-free)."""
    ref_tok, ref_head = logit_grads(model_at(backbone, 1.0, scaled=True), SHAPE)
    tok, head = logit_grads(model_at(backbone, k, scaled=True), k * SHAPE)
    torch.testing.assert_close(tok, ref_tok, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(head, ref_head, rtol=1e-4, atol=1e-7)


def test_paper_costs_barely_learn_at_csc_scale(backbone):
    """The paper's parameterisation at CSC's per-token scale (1e-2): logit gradients ~1e-3 of those at scale 1,
    the collapse the scaled parameterisation removes (same model, same labels' shape)."""
    tok1, head1 = logit_grads(model_at(backbone, 1.0, scaled=False), SHAPE)
    tok, head = logit_grads(model_at(backbone, 0.01, scaled=False), 0.01 * SHAPE)
    assert float(tok.abs().mean() / tok1.abs().mean()) < 1e-2
    assert float(head.abs().mean() / head1.abs().mean()) < 1e-2
    stok, shead = logit_grads(model_at(backbone, 0.01, scaled=True), 0.01 * SHAPE)
    assert float(stok.abs().mean() / tok.abs().mean()) > 100


def test_costs_start_at_init_in_proxy_units_under_both_parameterisations(backbone):
    for scaled in (False, True):
        model = MetabolicGPT2(backbone, MetabolicSettings(token_cost_init=0.02, cost_scale=0.02 if scaled else 1.0,
                                                         standardise_head=scaled))
        _, costs, _ = model.hidden_and_costs(IDS, budget=torch.tensor([0.5, 0.5]))
        torch.testing.assert_close(costs, torch.full_like(costs, 0.02), rtol=1e-5, atol=0)
        torch.testing.assert_close(model.vocab_costs(), torch.full_like(model.vocab_costs(), 0.02), rtol=1e-5, atol=0)


def test_standardised_head_ignores_the_scale_of_each_input_dimension(backbone):
    model = model_at(backbone, 0.02, scaled=True)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(5, 16, generator=gen)
    stretch = torch.linspace(0.1, 7.0, 16)  # GPT-2's final states differ ~7x in scale between dimensions
    model.set_head_standardisation(torch.zeros(16), torch.ones(16))
    plain = model.head_costs(h)
    model.set_head_standardisation(torch.full((16,), 3.0) * stretch, stretch)
    torch.testing.assert_close(model.head_costs(h * stretch + 3.0 * stretch), plain)
    with pytest.raises(DataError, match="positive sd"):
        model.set_head_standardisation(torch.zeros(16), torch.zeros(16))


def test_costs_do_not_bend_the_backbone_when_detached(backbone):
    for grad in (True, False):
        model = MetabolicGPT2(backbone, MetabolicSettings(token_cost_init=0.02, cost_grad_to_backbone=grad))
        with torch.no_grad():  # a head that reads its inputs (zero weights pass no gradient to the states)
            model.cost_head.weight.fill_(0.1)
        model.zero_grad(set_to_none=True)
        _, costs, _ = model.hidden_and_costs(IDS, budget=torch.tensor([0.5, 0.5]))
        losses.csc_mse(costs, 0.02 * SHAPE).backward()
        wpe = model.backbone.transformer.wpe.weight.grad
        assert (wpe is not None and float(wpe.abs().sum()) > 0) == grad
        assert float(model.cost_head.weight.grad.abs().sum()) > 0


def test_log_mse_by_hand():
    costs = torch.tensor([[[0.1], [0.4]]])
    labels = torch.tensor([[0.2, float("nan")]])
    value = losses.csc_log_mse(costs, labels, unit=0.2)
    floor = 0.05 * 0.2
    assert float(value) == pytest.approx((math.log(0.1 + floor) - math.log(0.2 + floor)) ** 2, rel=1e-6)
    assert float(losses.csc_log_mse(costs, torch.full((1, 2), float("nan")))) == 0.0


# --- budget spans ------------------------------------------------------------------------------


def test_expected_totals_count_only_the_continuation():
    gen = torch.Generator().manual_seed(2)
    ids = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    at = losses.Positions.of(ids, mask)
    probs = torch.softmax(torch.randn(at.seq.numel(), 8, generator=gen), -1)
    costs = torch.rand(8, 2, generator=gen)
    per_pos = probs @ costs
    for start in (0, 2, 3, 4):
        got = losses.expected_totals(probs, at, ids, mask, costs, counted_from=start)
        for b in range(2):
            keep = (at.seq == b) & (at.pos + 1 >= max(start, 1))
            want = per_pos[keep].sum(0) + (costs[ids[b, 0]] if start == 0 else 0)
            torch.testing.assert_close(got[b], want)
    assert float(losses.expected_totals(probs, at, ids, mask, costs, counted_from=3)[1].abs().sum()) == 0.0


def test_constraint_leaves_out_texts_without_a_counted_span():
    totals = torch.tensor([[1.0], [3.0], [100.0]])
    budgets = torch.tensor([[2.0], [2.0], [2.0]])
    lam = torch.tensor([0.5])
    lagr, sq, gap = losses.constraint_terms(totals, budgets, lam, per_sequence=True, weights=torch.tensor([1.0, 1.0, 0.0]))
    assert float(gap) == pytest.approx(0.0) and float(sq) == pytest.approx(1.0) and float(lagr) == pytest.approx(0.0)
    lagr, sq, gap = losses.constraint_terms(totals, budgets, lam, per_sequence=False, weights=torch.zeros(3))
    assert float(gap) == float(sq) == float(lagr) == 0.0


def test_span_totals_count_what_a_generation_counts():
    from metabolic.train.data import span_totals

    labels = [np.array([0.1, 0.2, 0.3, 0.4], np.float32), np.array([0.5, 0.5], np.float32)]
    raw = span_totals(labels, "raw", 2)
    assert raw[0] == pytest.approx(0.7) and math.isnan(raw[1])  # a 2-token text has no continuation after 2
    assert span_totals(labels, "length", 2)[0] == pytest.approx(0.7 * 4)  # T = the whole text
    np.testing.assert_allclose(span_totals(labels, "raw", 0), [1.0, 1.0], rtol=1e-6)


# --- the ceiling -------------------------------------------------------------------------------


def test_ridge_fit_is_the_penalised_least_squares_line():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = 2.0 * x[:, 0] + 1.0
    w, c = cost_fit.ridge_fit(x, y, alpha=0.0)
    assert w[0] == pytest.approx(2.0) and c == pytest.approx(1.0)
    w, c = cost_fit.ridge_fit(x, y, alpha=5.0)  # w = Sxy / (Sxx + alpha) on centred data: 10 / (5 + 5)
    assert w[0] == pytest.approx(1.0) and c == pytest.approx(4.0 - 1.0 * 1.5)


def test_ridge_probe_recovers_a_log_linear_rule_and_picks_a_small_penalty():
    gen = np.random.default_rng(0)
    train_x = [gen.normal(size=(12, 3)) for _ in range(8)]
    rule = np.array([1.0, -0.5, 0.2])
    train_y = [0.01 * np.exp(x @ rule) for x in train_x]
    valid_x = [gen.normal(size=(10, 3))]
    pred, alpha = cost_fit.ridge_probe(train_x, train_y, valid_x, target="log")
    truth = 0.01 * np.exp(valid_x[0] @ rule)
    assert alpha == cost_fit.PROBE_ALPHAS[0]
    assert cost_fit.spearman(pred[0], truth) > 0.99  # the log floor bends the rule slightly, not its order
    lin, _ = cost_fit.ridge_probe(train_x, train_y, valid_x, target="linear")
    assert cost_fit.spearman(lin[0], truth) < 1.0  # a line cannot follow the exponential everywhere
    with pytest.raises(DataError, match="linear or log"):
        cost_fit.ridge_probe(train_x, train_y, valid_x, target="cubic")


def test_fit_metrics_on_a_fixed_example():
    ids = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    labels = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 1.0, np.nan]), np.array([0.5, 0.5])]
    predicted = [np.array([1.0, 2.0, 3.0, 5.0]), np.array([4.0, 0.5, 9.0]), np.array([1.0, 1.0])]
    fit = cost_fit.fit_metrics(ids, labels, predicted, prompt_tokens=1)
    assert fit["n_tokens"] == 8 and fit["n_continuations"] == 2  # the 2nd text's continuation has a NaN label
    assert fit["token_spearman"] == pytest.approx(cost_fit.spearman([1, 2, 3, 5, 4, 0.5, 1, 1], [1, 2, 3, 4, 2, 1, 0.5, 0.5]))
    assert math.isnan(fit["continuation_r2"])  # 2 continuations: R² needs 3
    with pytest.raises(DataError, match="one per token"):
        cost_fit.fit_metrics(ids, labels, [p[:-1] for p in predicted], prompt_tokens=1)


def test_cost_ceilings_report_each_predictor_and_the_best(backbone):
    gen = np.random.default_rng(3)
    texts = [list(gen.integers(100, 140, size=n)) for n in (9, 12, 10, 11, 8, 12, 9, 10)]
    prior = np.ones(backbone.config.vocab_size)
    prior[100:140] = np.linspace(0.5, 2.0, 40)
    labels = [0.01 * prior[np.asarray(t)] * (1 + 0.1 * gen.random(len(t))) for t in texts]  # CSC ~ a token property
    out = cost_fit.cost_ceilings(backbone, texts[:5], labels[:5], texts[5:], labels[5:], prior, prompt_tokens=2)
    assert set(out) == {"ridge_linear", "ridge_log", "token_mean", "token_count", "ceiling"}
    # the length-only reference: its continuation totals are the lengths, and it ranks no token
    lengths, totals = [len(t) - 2 for t in texts[5:]], [float(y[2:].sum()) for y in labels[5:]]
    assert out["token_count"]["continuation_r2"] == pytest.approx(cost_fit.r_squared(lengths, totals), rel=1e-5)  # labels held in float32
    assert math.isnan(out["token_count"]["token_spearman"])
    assert out["token_mean"]["token_spearman"] > 0.9  # the per-token mean (with the prior's backoff) sees the rule
    best = max(out[k]["token_spearman"] for k in ("ridge_linear", "ridge_log", "token_mean"))
    assert out["ceiling"]["token_spearman"] == best
    assert out[out["ceiling"]["token_spearman_by"]]["token_spearman"] == best


def test_against_ceiling_takes_the_absolute_goal_or_ninety_percent_of_a_lower_ceiling():
    ceilings = {"ceiling": {"token_spearman": 0.55, "continuation_r2": 0.8}}
    out = cost_fit.against_ceiling({"token_spearman": 0.5, "continuation_r2": 0.45}, ceilings)
    assert out["token_spearman"]["goal"] == pytest.approx(0.495) and out["token_spearman"]["met"]
    assert out["continuation_r2"]["goal"] == 0.5 and not out["continuation_r2"]["met"]
    assert out["token_spearman"]["ratio"] == pytest.approx(0.5 / 0.55)


def test_budgets_reach_proxy_units_through_each_dimensions_calibration(backbone):
    model = MetabolicGPT2(backbone, MetabolicSettings(K=3))
    budgets = torch.tensor([[0.5, 0.5, 0.5], [0.05, 0.05, 0.05]])
    torch.testing.assert_close(model.budget_in_proxy(budgets), budgets)  # identity before any fit
    model.set_calibration(np.array([0.1, 0.1, 0.1]), np.array([2.0, 0.0, -1.0]))
    want = torch.tensor([[0.2, 0.5, 0.5], [0.0, 0.05, 0.05]])  # (B - a) / b, floored at 0; no positive slope, no points: B
    torch.testing.assert_close(model.budget_in_proxy(budgets), want)
    # points whose proxy totals fall as CSC rises: the slope is negative, the ratio map (mean CSC / mean proxy = 0.25) holds
    model.calibration_stats.update(np.array([[1.0] * 3, [3.0] * 3]), np.array([1.0, 0.0]))
    model.refit_calibration()
    assert float(model.calib_b[0]) < 0
    torch.testing.assert_close(model.budget_in_proxy(budgets), budgets / 0.25)


def test_cost_warm_up_fits_the_labels_and_leaves_the_backbone_alone(backbone):
    import dataclasses

    from metabolic.core.config import TrainConfig
    from metabolic.train.loop import head_input_statistics, warm_up_costs

    gen = torch.Generator().manual_seed(5)
    states = []
    for _ in range(6):  # texts whose CSC follows one direction of the states
        h = torch.randn(7, 16, generator=gen)
        states.append((torch.randint(100, 140, (7,), generator=gen), h, 0.02 * torch.exp(h[:, 0])))
    model = MetabolicGPT2(backbone, MetabolicSettings(token_cost_init=0.02, cost_scale=0.02, standardise_head=True))
    model.set_head_standardisation(*head_input_statistics(states, torch.float32))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    cfg = dataclasses.replace(TrainConfig(), batch_size=2, cost_warmup_epochs=20, cost_warmup_lr=0.05)
    info = warm_up_costs(model, states, cfg)
    assert info["epochs"] == 20 and info["loss_last_epoch"] < 0.2 * info["loss_first_epoch"]
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
    ids, h, labels = (torch.cat([s[k] for s in states]) for k in range(3))
    fitted = model.proxy_total(model.costs_at(ids, h)).detach()
    assert cost_fit.spearman(fitted.numpy(), labels.numpy()) > 0.9
    assert warm_up_costs(model, states, dataclasses.replace(cfg, cost_warmup_epochs=0))["loss_first_epoch"] is None


@given(n=st.integers(0, 60), k=st.integers(1, 8))
def test_contiguous_folds_partition_the_texts_in_order(n, k):
    from metabolic.train.loop import contiguous_folds

    folds = contiguous_folds(n, k)
    assert [i for fold in folds for i in fold] == list(range(n))  # every text once, in corpus order
    assert len(folds) == min(k, n) and all(folds)
    assert max(map(len, folds), default=0) - min(map(len, folds), default=0) <= 1


def _states(gen, n_texts, ids_for, labels_for):
    out = []
    for i in range(n_texts):
        h = torch.randn(9, 16, generator=gen)
        ids = ids_for(i)
        out.append((ids, h, labels_for(ids, h)))
    return out


@pytest.mark.parametrize("rule", ["context", "token id"])
def test_a_mix_cross_validation_picks_the_part_that_carries_the_labels(backbone, rule):
    import dataclasses

    from metabolic.core.config import TrainConfig
    from metabolic.train.loop import choose_a_mix, head_input_statistics
    from metabolic.train.step import COST_PREFIXES

    gen = torch.Generator().manual_seed(11)
    if rule == "context":  # CSC follows the states; each fold's texts use token ids no other fold uses
        states = _states(gen, 8, lambda i: torch.randint(100 + 10 * (i // 2), 110 + 10 * (i // 2), (9,), generator=gen),
                         lambda ids, h: 0.02 * torch.exp(h[:, 0]))
        want = 0.0
    else:  # CSC is a property of the token id, shared across folds; the states carry nothing
        cost_of = torch.linspace(0.005, 0.05, 20)
        states = _states(gen, 8, lambda i: torch.randint(100, 120, (9,), generator=gen), lambda ids, h: cost_of[ids - 100])
        want = 1.0
    model = MetabolicGPT2(backbone, MetabolicSettings(token_cost_init=0.02, cost_scale=0.02, standardise_head=True))
    model.set_head_standardisation(*head_input_statistics(states, torch.float32))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(COST_PREFIXES)}
    cfg = dataclasses.replace(TrainConfig(), batch_size=2, cost_warmup_epochs=15, cost_warmup_lr=0.05, a_mix_choices=(0.0, 1.0))
    info = choose_a_mix(model, states, cfg)
    assert info["a_mix"] == want and model.settings.a_mix == want and info["folds"] == 4
    assert info["cv_spearman"][str(want)] > 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the cost parameters as found
