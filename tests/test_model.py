"""MetabolicGPT2: initial state, cost maps, the two variants' budget pathways, save/load, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from metabolic.core.config import BackboneConfig
from metabolic.core.errors import ConfigError, DataError
from metabolic.model.backbone import load_backbone, scratch_model
from metabolic.model.metabolic_gpt2 import MetabolicGPT2, MetabolicSettings
from torch.nn import functional as F


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory, tokenizer):
    """A tiny from-scratch GPT-2 (1 x 32) with the real GPT-2 vocabulary, saved like notebook 00's."""
    folder = tmp_path_factory.mktemp("tiny_backbone")
    cfg = BackboneConfig(n_layer=2, n_embd=32, n_head=2, seed=3)
    model = scratch_model(cfg, vocab_size=len(tokenizer), n_positions=64, eos_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make(backbone_dir, **kwargs) -> MetabolicGPT2:
    settings = MetabolicSettings(**{"budget_scale": 0.5, **kwargs})
    return MetabolicGPT2(load_backbone(backbone_dir, device="cpu"), settings)


def randomise_budget_pathway(model: MetabolicGPT2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in [model.budget_proj, *model.layer_budget_proj]:
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen))
        model.cost_head.weight.copy_(torch.randn(model.cost_head.weight.shape, generator=gen) * 0.3)


IDS = torch.tensor([[464, 2003, 286, 11666, 4430, 318], [40, 716, 257, 3797, 13, 50256]])


def test_untrained_model_predicts_like_its_backbone_and_costs_start_at_init(backbone_dir):
    model = make(backbone_dir, token_cost_init=0.05).eval()
    out = model(IDS, budget=torch.tensor([0.3, 0.9]))
    ref = model.backbone(input_ids=IDS).logits
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-6)
    assert out.token_costs.shape == (2, 6, 3)
    torch.testing.assert_close(out.token_costs, torch.full((2, 6, 3), 0.05), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.vocab_costs(), torch.full((model.backbone.config.vocab_size, 3), 0.05),
                               rtol=0, atol=1e-6)


def test_vocab_costs_follow_eq14(backbone_dir):
    model = make(backbone_dir, a_mix=0.3, vocab_cost_min=0.04)
    randomise_budget_pathway(model)
    with torch.no_grad():
        model.token_cost_logits.copy_(torch.linspace(-6, 2, model.token_cost_logits.numel()).view_as(model.token_cost_logits))
    wte = model.backbone.transformer.wte.weight
    expected = torch.clamp_min(0.3 * F.softplus(model.token_cost_logits) + 0.7 * F.softplus(model.cost_head(wte)), 0.04)
    torch.testing.assert_close(model.vocab_costs(), expected)
    assert float(model.vocab_costs().detach().min()) == pytest.approx(0.04)


def test_prior_initialisation_keeps_the_mean_and_the_order(backbone_dir):
    vocab = load_backbone(backbone_dir, device="cpu").config.vocab_size
    prior = np.linspace(0.3, 3.0, vocab)
    model = MetabolicGPT2(load_backbone(backbone_dir, device="cpu"), MetabolicSettings(budget_scale=0.5), prior_cost=prior)
    costs = F.softplus(model.token_cost_logits[:, 0]).detach().double().numpy()
    np.testing.assert_allclose(costs, 0.05 * prior / prior.mean(), rtol=1e-5)
    with pytest.raises(DataError, match="one per token"):
        MetabolicGPT2(load_backbone(backbone_dir, device="cpu"), MetabolicSettings(), prior_cost=prior[:10])


@pytest.mark.parametrize("per_layer", [False, True])
def test_budget_changes_costs_in_faithful_but_not_in_expected_cost(backbone_dir, per_layer):
    for variant, budget_moves_costs in (("faithful", True), ("expected-cost", False)):
        model = make(backbone_dir, variant=variant, per_layer_budget=per_layer).eval()
        randomise_budget_pathway(model)
        low = model(IDS, budget=torch.tensor([0.2, 0.2]))
        high = model(IDS, budget=torch.tensor([2.0, 2.0]))
        assert not torch.allclose(low.logits, high.logits)  # the budget always conditions the LM
        assert torch.allclose(low.token_costs, high.token_costs, atol=1e-7) != budget_moves_costs


def test_one_level_equals_that_level_in_every_dimension(backbone_dir):
    model = make(backbone_dir).eval()
    randomise_budget_pathway(model)
    scalar = model(IDS, budget=torch.tensor([0.7, 1.1]))
    vector = model(IDS, budget=torch.tensor([[0.7] * 3, [1.1] * 3]))
    torch.testing.assert_close(scalar.logits, vector.logits)
    mixed = model(IDS, budget=torch.tensor([[0.7, 0.8, 0.9], [1.1] * 3]))
    assert not torch.allclose(mixed.logits[0], scalar.logits[0])
    torch.testing.assert_close(model.budget_vector(0.5, batch=2), torch.full((2, 3), 0.5))
    torch.testing.assert_close(model(IDS, budget=0.7).logits, model(IDS, budget=torch.tensor([0.7, 0.7])).logits)
    with pytest.raises(DataError, match="is a scalar"):
        model.budget_vector(0.5)


def test_incremental_decoding_with_cache_matches_full_forward(backbone_dir):
    model = make(backbone_dir).eval()
    randomise_budget_pathway(model)
    budget = torch.tensor([0.4, 0.9])
    full = model(IDS, budget=budget)
    first = model(IDS[:, :4], budget=budget, use_cache=True)
    rest = model(IDS[:, 4:], budget=budget, past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(rest.logits, full.logits[:, 4:], rtol=1e-5, atol=1e-5)


def test_calibration_maps_both_ways(backbone_dir):
    model = make(backbone_dir)
    model.set_calibration(np.array([0.1, 0.2, 0.3]), np.array([2.0, 2.0, 2.0]))
    cal = model.proxy_calibration()  # the mean of the K pairs: a = 0.2, b = 2
    assert cal.to_csc(1.0) == pytest.approx(0.2 + 2.0)
    assert cal.to_proxy(cal.to_csc(1.5)) == pytest.approx(1.5)
    # a slope <= 0 cannot map a budget: the ratio map (mean CSC / proxy ratio), as budget_in_proxy per dimension
    model.set_calibration(np.array([0.5, 0.5, 0.5]), np.array([-0.4, -0.4, -0.4]))
    model.budget_ratio.copy_(torch.tensor([1.5, 2.0, 2.5], dtype=torch.float64))
    cal = model.proxy_calibration()
    assert (cal.a, cal.b) == (0.0, pytest.approx(2.0))
    budgets = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    assert cal.to_proxy(1.0) == pytest.approx(float(model.budget_in_proxy(budgets).mean()), rel=0.1)
    model.budget_ratio.zero_()  # no ratio either: nothing can map a budget, said as such
    with pytest.raises(ConfigError, match="slope b=0.0 is invalid"):
        model.proxy_calibration()


def test_save_and_load_round_trip_everything(backbone_dir, tmp_path):
    model = make(backbone_dir, variant="faithful", per_layer_budget=True, a_mix=0.25).eval()
    randomise_budget_pathway(model, seed=5)
    with torch.no_grad():
        model.token_cost_logits.add_(torch.randn(model.token_cost_logits.shape, generator=torch.Generator().manual_seed(1)))
        model.dual_lambda.copy_(torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64))
    model.calibration_stats.update(np.array([1.0, 2.0, 3.5]), np.array([0.4, 0.5, 0.7]))
    model.refit_calibration()
    model.training_info = {"budget_range": [0.3, 1.1], "targets": [0.4, 0.5, 0.6]}
    model.save_pretrained(tmp_path / "m")
    loaded = MetabolicGPT2.from_pretrained(tmp_path / "m", device="cpu")
    assert loaded.settings == model.settings
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert loaded.calibration_stats.state_dict() == model.calibration_stats.state_dict()
    assert loaded.training_info == model.training_info
    budget = torch.tensor([0.5, 0.8])
    a, b = model(IDS, budget=budget), loaded(IDS, budget=budget)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.token_costs, b.token_costs, rtol=0, atol=0)


@pytest.mark.parametrize(
    "budget, match",
    [
        (torch.tensor([0.5, 0.0]), "must be finite and > 0"),
        (torch.tensor([-1.0, 0.5]), "must be finite and > 0"),
        (torch.tensor([float("nan"), 0.5]), "must be finite and > 0"),
        (torch.tensor([float("inf"), 0.5]), "must be finite and > 0"),
        (torch.ones(2, 2), "K=3"),
        (torch.ones(3), "one budget"),
        (torch.ones(2, 3, 1), "K=3"),
    ],
)
def test_bad_budgets_are_rejected(backbone_dir, budget, match):
    model = make(backbone_dir)
    with pytest.raises(DataError, match=match):
        model(IDS, budget=budget)


def test_checkpoint_from_another_config_is_rejected_and_left_alone(backbone_dir, tmp_path):
    model = make(backbone_dir, K=3)
    folder = model.save_pretrained(tmp_path / "m")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    with pytest.raises(DataError, match="another config"):
        MetabolicGPT2.from_pretrained(folder, device="cpu", expected=MetabolicSettings(K=2, budget_scale=0.5))
    with pytest.raises(DataError, match="not a saved MetabolicGPT-2"):
        MetabolicGPT2.from_pretrained(backbone_dir, device="cpu")
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    assert after == before
    # A cost state made for another K cannot be loaded into these settings either.
    other = make(backbone_dir, K=2)
    other.save_pretrained(tmp_path / "k2")
    os.replace(tmp_path / "k2" / "metabolic.safetensors", folder / "metabolic.safetensors")
    with pytest.raises(DataError, match="another vocabulary or K"):
        MetabolicGPT2.from_pretrained(folder, device="cpu")
