"""Per-epoch validation, the backbone's reference perplexity, and the best-balanced selection score.

The selection rule ("best balanced", paper VI.D) is described in `metabolic.train.loop`'s module doc.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from metabolic.core import resume
from metabolic.core.config import TrainConfig
from metabolic.model.metabolic_gpt2 import MetabolicGPT2
from metabolic.train import losses
from metabolic.train.data import Batch, TrainingData, make_batch
from metabolic.train.step import compute_step, step_budgets


def level_expected_totals(model: MetabolicGPT2, batch: Batch, level: float, c_vocab: torch.Tensor) -> torch.Tensor:
    """Expected totals [b, K] of a batch's texts under one budget level for every sequence (teacher forced)."""
    at = losses.Positions.of(batch.ids, batch.mask)
    b = batch.ids.shape[0]
    with resume.autocast(batch.ids.device):
        h, _, _ = model.hidden_and_costs(batch.ids, budget=torch.full((b,), float(level), device=batch.ids.device),
                                         attention_mask=batch.mask)
        logits = model.backbone.lm_head(h[at.seq, at.pos])
    probs = F.softmax(logits.float(), dim=-1)
    return losses.expected_totals(probs, at, batch.ids, batch.mask, c_vocab, batch.counted_from)


@torch.no_grad()
def evaluate(model: MetabolicGPT2, data: TrainingData, cfg: TrainConfig, factor: float,
             vocab_ids: torch.Tensor, vocab_means: torch.Tensor) -> dict[str, Any]:
    """Validation: every loss term, perplexity, budget gap, and budget tracking per target level."""
    device = model.device
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    n_tok = n_seq = 0
    lm_sum = 0.0
    xs, ys, gaps = [], [], []
    level_totals = [[] for _ in data.targets]
    bs = cfg.batch_size
    for start in range(0, len(data.valid_ids), bs):
        batch = make_batch(data.valid_ids[start:start + bs], data.valid_labels[start:start + bs],
                           data.valid_totals[start:start + bs], device, data.counted_from)
        budgets = step_budgets(model, batch, data.targets, factor)
        res = compute_step(model, batch, budgets, cfg, vocab_ids, vocab_means)
        n_pred = int((batch.mask[:, 1:] * batch.mask[:, :-1]).sum())
        lm_sum += float(res.terms.lm) * n_pred
        n_tok += n_pred
        b = batch.ids.shape[0]
        n_seq += b
        for key, value in res.terms.as_floats().items():
            sums[key] = sums.get(key, 0.0) + value * b
        kept = res.constrained.bool().cpu().numpy()  # texts with a counted span
        xs.append(res.totals.double().cpu().numpy()[kept])
        ys.append(batch.totals.cpu().numpy()[kept])
        gaps.append((res.totals - res.budgets).double().cpu().numpy()[kept])
        c_vocab = model.vocab_costs().float()
        for j, level in enumerate(data.targets):
            level_totals[j].append(level_expected_totals(model, batch, level, c_vocab).double().cpu().numpy()[kept])
    model.train(was)
    x, y, gap = np.concatenate(xs), np.concatenate(ys), np.concatenate(gaps)
    a, b_ = model.calib_a.cpu().numpy(), model.calib_b.cpu().numpy()
    level_proxy = [float(np.mean(np.concatenate(t, axis=0))) for t in level_totals]
    level_csc = [float(np.mean(a + b_ * np.concatenate(t, axis=0))) for t in level_totals]
    # In proxy units, which CSC supervision ties to CSC units: with raw CSC the calibration slope is
    # near 0 (total CSC hardly depends on the text, README, measured facts), so calibrated values would not move.
    rel_err = float(np.mean([abs(ach - tar) / tar for ach, tar in zip(level_proxy, data.targets)]))
    val_lm = lm_sum / max(n_tok, 1)
    terms = {k: v / n_seq for k, v in sums.items()}
    return {
        "terms": terms,
        "val_loss": terms["total"],
        "val_lm": val_lm,
        "val_ppl": math.exp(min(val_lm, 50.0)),
        "val_err": float(gap.mean()),
        "val_abs_err": float(np.abs(gap).mean()),
        "val_achieved": float(x.mean()),
        "val_level_achieved": level_proxy,
        "val_level_achieved_csc": level_csc,
        "val_level_rel_err": rel_err,
        "points_proxy": x.mean(axis=1).tolist(),
        "points_csc": y.tolist(),
    }


@torch.no_grad()
def backbone_val_ppl(model: MetabolicGPT2, data: TrainingData, batch_size: int) -> float:
    """Validation perplexity of the plain backbone (the reference of the best-balanced rule)."""
    device = model.device
    was = model.backbone.training
    model.backbone.eval()
    total, count = 0.0, 0
    for start in range(0, len(data.valid_ids), batch_size):
        batch = make_batch(data.valid_ids[start:start + batch_size], data.valid_labels[start:start + batch_size],
                           data.valid_totals[start:start + batch_size], device, data.counted_from)
        at = losses.Positions.of(batch.ids, batch.mask)
        h = model.backbone.transformer(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
        logp = F.log_softmax(model.backbone.lm_head(h[at.seq, at.pos]).float(), dim=-1)
        n = at.seq.numel()
        total += float(losses.lm_loss(logp, at)) * n
        count += n
    model.backbone.train(was)
    return math.exp(min(total / max(count, 1), 50.0))


def balanced_score(val_ppl: float, reference_ppl: float, level_rel_err: float) -> float:
    """The best-balanced rule (`metabolic.train.loop`'s module doc): ln(ppl / reference) + mean relative budget error."""
    return math.log(val_ppl / reference_ppl) + level_rel_err
