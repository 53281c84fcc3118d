"""Backbone: schedule, pretraining with exact resume, and the from_pretrained loading path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from metabolic.core.config import BackboneConfig
from metabolic.core.errors import AssetError
from metabolic.model.backbone import load_backbone, scratch_model
from metabolic.train.pretrain import lr_at, pretrain

TINY = BackboneConfig(n_layer=1, n_embd=16, n_head=2, block_size=8, batch_size=2, epochs=2, lr=1e-2,
                      warmup_steps=1, eval_every=2, max_eval_blocks=2, checkpoint_every=1, seed=3)


@given(st.integers(1, 500), st.integers(0, 50), st.floats(1e-5, 1.0), st.floats(0.0, 1.0))
def test_schedule_warms_up_then_decays_within_bounds(total, warmup, peak, ratio):
    lrs = [lr_at(s, total, warmup, peak, ratio) for s in range(total + 1)]
    assert all(peak * ratio - 1e-12 <= lr <= peak + 1e-12 for lr in lrs[warmup:])
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
    if total > warmup:
        assert lrs[-1] == pytest.approx(peak * ratio)


def _blocks(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 100, (n, 8), generator=torch.Generator().manual_seed(seed))


def test_interrupted_pretraining_resumes_to_identical_metrics(tmp_path):
    train, valid = _blocks(0, 10), _blocks(1, 4)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = pretrain(scratch_model(TINY, 100, 8, 0), train, valid, TINY, tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        pretrain(scratch_model(TINY, 100, 8, 0), train, valid, TINY, tmp_path / "b", progress=False, stop_after_steps=3)
    resumed = pretrain(scratch_model(TINY, 100, 8, 0), train, valid, TINY, tmp_path / "b", progress=False)
    assert resumed.steps == full.steps == 10
    assert resumed.metrics == full.metrics
    assert full.metrics[-1]["val_loss"] < full.metrics[0]["val_loss"] + 1.0  # finite and sane


def test_pretraining_lowers_validation_loss(tmp_path):
    data = torch.arange(8).repeat(12, 1)  # a learnable pattern
    cfg = dataclasses.replace(TINY, epochs=6)
    result = pretrain(scratch_model(cfg, 100, 8, 0), data, data[:2], cfg, tmp_path, progress=False)
    assert result.metrics[-1]["val_loss"] < 0.5 * result.metrics[0]["val_loss"]


def test_saved_model_loads_through_from_pretrained(tmp_path):
    model = scratch_model(TINY, 100, 8, 0).eval()
    model.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path, "cpu")
    x = _blocks(2, 2)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_missing_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(AssetError, match="cannot load backbone .* Fix: run the pretrain stage"):
        load_backbone(tmp_path / "nothing-here", "cpu")
