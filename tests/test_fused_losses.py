"""The fast training paths against the formulas they replace.

* `losses.next_token_terms` (one shared softmax, hand-fused backward) against the separate terms
  `lm_loss`, `mean_entropy`, `repetition_loss`, `expected_totals` on `log_softmax`: values and
  gradients (logits and vocabulary costs) on random inputs, in float64 so that only rounding differs.
* `step.EpochLedger`: a training step with a ledger leaves its metrics on the device; the host reads
  them once (`settle`), which feeds the calibration the same points and raises on a non-finite loss.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from metabolic.core.config import BackboneConfig
from metabolic.core.errors import DivergedError
from metabolic.model.backbone import scratch_model
from metabolic.model.metabolic_gpt2 import MetabolicGPT2
from metabolic.train import loop as training
from metabolic.train import losses
from metabolic.train.data import make_batch, token_label_means
from metabolic.train.step import EpochLedger, make_optimizer, step_budgets, train_step
from torch.nn import functional as F


def random_batch(seed: int, b: int, t: int, v: int, k: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)  # small V: many repeated tokens
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    at = losses.Positions.of(ids, mask)
    logits = (3 * torch.randn(at.seq.numel(), v, generator=g, dtype=torch.float64)).requires_grad_()
    costs = torch.rand(v, k, generator=g, dtype=torch.float64).requires_grad_()
    weights = torch.randn(4 + k, generator=g, dtype=torch.float64)  # a random mix of every output
    return ids, mask, at, logits, costs, weights


def separate(logits, at, ids, mask, costs):
    """The previous computation: one autograd chain per term on a shared log-softmax."""
    logp = F.log_softmax(logits, dim=-1)
    probs = logp.exp()
    return (losses.lm_loss(logp, at), losses.mean_entropy(logp, probs), losses.repetition_loss(probs, at, ids, mask),
            losses.expected_totals(probs, at, ids, mask, costs))


def fused(logits, at, ids, mask, costs):
    nt = losses.next_token_terms(logits, at, ids, mask, costs)
    return nt.lm, nt.entropy, nt.repetition, losses.sequence_expected_totals(nt.per_pos_cost, at, ids, mask, costs)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), t=st.integers(1, 7), v=st.integers(2, 9),
       k=st.integers(1, 3))
def test_shared_softmax_terms_and_gradients_equal_the_separate_terms(seed, b, t, v, k):
    ids, mask, at, logits, costs, weights = random_batch(seed, b, t, v, k)
    results = []
    for fn in (separate, fused):
        lm, ent, rep, totals = fn(logits, at, ids, mask, costs)
        objective = weights[0] * lm + weights[1] * ent + weights[2] * rep + (totals.mean(0) * weights[4:]).sum()
        grads = torch.autograd.grad(objective, (logits, costs), allow_unused=True)
        results.append((lm, ent, rep, totals, *(torch.zeros(0) if g is None else g for g in grads)))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_shared_softmax_without_costs_and_without_positions():
    ids, mask, at, logits, costs, _ = random_batch(3, 3, 6, 5, 2)
    nt = losses.next_token_terms(logits, at, ids, mask)  # faithful: no expected cost
    assert nt.per_pos_cost is None
    lm, ent, rep, _ = separate(logits, at, ids, mask, costs)
    g_fused = torch.autograd.grad(nt.lm - 0.3 * nt.entropy + 0.7 * nt.repetition, logits)[0]
    g_sep = torch.autograd.grad(lm - 0.3 * ent + 0.7 * rep, logits)[0]
    torch.testing.assert_close(g_fused, g_sep, rtol=1e-10, atol=1e-12)
    one = torch.tensor([[4, 0]])  # a single token: no prediction position
    empty = losses.Positions.of(one, torch.tensor([[1, 0]]))
    nt0 = losses.next_token_terms(torch.zeros(0, 5, requires_grad=True), empty, one, torch.tensor([[1, 0]]), costs)
    assert nt0.lm.item() == nt0.entropy.item() == nt0.repetition.item() == 0.0 and nt0.per_pos_cost.shape == (0, 2)


def test_csc_mse_without_any_label_is_zero_with_zero_gradient():
    costs = torch.rand(2, 3, 2, requires_grad=True)
    mse = losses.csc_mse(costs, torch.full((2, 3), float("nan")))
    mse.backward()
    assert mse.item() == 0.0 and torch.equal(costs.grad, torch.zeros_like(costs))


# --- the ledger ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_cfg, tokenizer):
    """A 1-layer GPT-2 (real GPT-2 vocabulary) and a batch of 4 real texts with made-up labels."""
    cfg = dataclasses.replace(tiny_cfg.train, lr=1e-3)
    texts = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in
             ("The cat sat on the mat.", "A storm hit the coast at night and the town lost power.",
              "Valkyria Chronicles III is a tactical role-playing game.", "It rained.")]
    labels = [np.linspace(0.01, 0.05, len(x)).astype(np.float32) for x in texts]
    totals = np.array([float(np.sum(x)) for x in labels[:3]] + [np.nan])  # the last text has no known total
    backbone = scratch_model(BackboneConfig(n_layer=1, n_embd=16, n_head=2, seed=1), vocab_size=len(tokenizer),
                             n_positions=32, eos_id=tokenizer.eos_token_id)
    return cfg, backbone, texts, labels, totals


def fresh(tiny, variant, cfg):
    _, backbone, texts, labels, totals = tiny
    torch.manual_seed(0)
    model = MetabolicGPT2(copy.deepcopy(backbone), training.model_settings(cfg, variant, 1.0, mean_label=0.03))
    batch = make_batch(texts, labels, totals, "cpu")
    ids, means = token_label_means(texts, labels)
    return model, make_optimizer(model, cfg), batch, torch.as_tensor(ids), torch.as_tensor(means).float()


def test_ledger_steps_equal_self_contained_steps_and_read_back_once(tiny):
    cfg = tiny[0]
    runs = []
    for use_ledger in (False, True):
        model, opt, batch, ids, means = fresh(tiny, "expected-cost", cfg)
        budgets = step_budgets(model, batch, np.array([0.2, 0.3, 0.4]), 1.0)
        ledger = EpochLedger() if use_ledger else None
        rows = [train_step(model, opt, batch, budgets, cfg, ids, means, step, ledger).terms.as_floats()
                for step in range(2)]
        if use_ledger:
            assert model.calibration_stats.n == 0  # nothing read back yet: the points wait in the ledger
            ledger.settle(model, cfg)
            terms, gap, achieved, target = ledger.summary()
            assert terms == {k: (rows[0][k] * 4 + rows[1][k] * 4) / 8 for k in rows[0]}  # 2 batches of 4
            assert gap.shape == achieved.shape == target.shape == (cfg.K,)
        assert model.calibration_stats.n == 2 * 3  # 3 known totals per step
        runs.append((rows, model.dual_lambda.clone(), model.calibration_stats.state_dict(),
                     [p.detach().clone() for p in model.parameters()]))
    (rows0, lam0, cal0, w0), (rows1, lam1, cal1, w1) = runs
    assert rows0 == rows1 and torch.equal(lam0, lam1) and cal0 == cal1
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def test_ledger_settle_raises_for_the_first_non_finite_step(tiny):
    cfg = dataclasses.replace(tiny[0], lr=1e30)  # the first step's update makes every later loss NaN
    model, opt, batch, ids, means = fresh(tiny, "faithful", cfg)
    budgets = step_budgets(model, batch, np.array([0.2, 0.3, 0.4]), 1.0)
    ledger = EpochLedger()
    for step in range(2):
        train_step(model, opt, batch, budgets, cfg, ids, means, step, ledger)  # no raise: no host sync
    with pytest.raises(DivergedError, match=r"^training diverged at step 1 \(loss nan\): lower train.lr"):
        ledger.settle(model, cfg)
    assert model.calibration_stats.n == 0  # the diverged steps' points never reached the calibration


def test_shared_softmax_refuses_a_second_backward_through_the_same_graph():
    """The backward reuses log p's buffer: a second pass must fail loudly, not read overwritten values."""
    ids, mask, at, logits, costs, _ = random_batch(5, 2, 6, 5, 2)
    nt = losses.next_token_terms(logits, at, ids, mask, costs)
    loss = nt.lm + nt.entropy
    torch.autograd.grad(loss, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, logits)
