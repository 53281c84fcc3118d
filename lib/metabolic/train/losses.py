"""The terms of the training objective (paper eq. 22, 24), each computed and returned on its own.

    L_total = L_LM + beta_CSC L_CSC + lambda^T (C_hat - B) + beta_constr ||C_hat - B||^2
              + L_entropy + L_repetition + L_vocab-aux

Next-token quantities are computed on *packed* prediction positions only (padding never reaches the
[positions, V] softmax, which dominates the step): `Positions` lists, for every position t of a real
token whose successor x_{t+1} is also real, its sequence and t. Shapes: ids and mask [batch, T];
logp/probs [N, V] at those positions; per-token costs [batch, T, K]; CSC labels [batch, T] (NaN =
unlabelled); totals and budgets [batch, K].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class LossTerms:
    """Each term of eq. (22) unweighted, with the weighted total; all scalar tensors."""

    lm: torch.Tensor
    csc_mse: torch.Tensor
    lagrangian: torch.Tensor  # lambda^T (C_hat - B), lambda held constant (a buffer)
    constraint_sq: torch.Tensor  # ||C_hat - B||^2 (mean over sequences for per-sequence budgets)
    entropy: torch.Tensor  # mean predictive entropy H (nats); the loss term is -alpha_ent H
    repetition: torch.Tensor
    vocab_aux: torch.Tensor
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Positions:
    """Packed prediction positions: sequence `seq[n]`, position `pos[n]` predicting `target[n]` = x_{pos+1}."""

    seq: torch.Tensor  # [N] int64
    pos: torch.Tensor  # [N] int64
    target: torch.Tensor  # [N] int64

    @classmethod
    def of(cls, ids: torch.Tensor, mask: torch.Tensor) -> "Positions":
        real = mask[:, 1:].bool() & mask[:, :-1].bool()
        seq, pos = real.nonzero(as_tuple=True)
        return cls(seq=seq, pos=pos, target=ids[seq, pos + 1])


def lm_loss(logp: torch.Tensor, at: Positions) -> torch.Tensor:
    """Eq. (6) per token: mean next-token negative log-likelihood over the packed positions."""
    if at.target.numel() == 0:
        return logp.sum() * 0.0
    return -logp.gather(-1, at.target[:, None]).mean()


def csc_mse(token_costs: torch.Tensor, csc: torch.Tensor) -> torch.Tensor:
    """Eq. (18): mean squared error over labelled tokens (finite labels), every cost dimension alike."""
    labelled = torch.isfinite(csc)
    if not bool(labelled.any()):
        return token_costs.sum() * 0.0
    target = torch.where(labelled, csc, torch.zeros_like(csc))[..., None]
    err = (token_costs - target.to(token_costs.dtype)) ** 2 * labelled[..., None]
    return err.sum() / (labelled.sum() * token_costs.shape[-1])


def constraint_terms(totals: torch.Tensor, budgets: torch.Tensor, lam: torch.Tensor, per_sequence: bool):
    """lambda^T (C_hat - B) and ||C_hat - B||^2, plus the gap C_hat - B [K] for the dual update.

    `per_sequence=False` (the paper): C_hat and B are batch averages. `True` (budgets that vary per
    sequence): the squared term is the mean over sequences of each sequence's own squared gap.
    """
    gaps = totals - budgets.to(totals.dtype)  # [batch, K]
    gap = gaps.mean(dim=0)
    lagrangian = (lam.to(gap.dtype) * gap).sum()
    sq = (gaps**2).sum(-1).mean() if per_sequence else (gap**2).sum()
    return lagrangian, sq, gap


def mean_entropy(logp: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the predictive distributions (eq. 24's H; the loss is -alpha_ent H)."""
    if logp.shape[0] == 0:
        return logp.sum() * 0.0
    return -(probs * logp).sum(-1).mean()


def expected_totals(probs: torch.Tensor, at: Positions, ids: torch.Tensor, mask: torch.Tensor,
                    vocab_costs: torch.Tensor) -> torch.Tensor:
    """E_i = C_vocab(x_1) + sum_t <p(. | x_<=t), C_vocab> over the sequence's predictions: [batch, K]."""
    per_pos = probs @ vocab_costs.to(probs.dtype)  # [N, K]
    totals = torch.zeros(ids.shape[0], vocab_costs.shape[1], dtype=per_pos.dtype, device=ids.device)
    totals = totals.index_add(0, at.seq, per_pos)
    return totals + vocab_costs[ids[:, 0]].to(per_pos.dtype) * mask[:, :1].to(per_pos.dtype)


def _first_occurrence(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, T] bool: x_s is a real token seen for the first time at s."""
    t = ids.shape[1]
    same = ids[:, :, None] == ids[:, None, :]
    earlier = torch.tril(torch.ones(t, t, dtype=torch.bool, device=ids.device), diagonal=-1)
    return ~(same & earlier).any(-1) & mask.bool()


def repeat_probability(probs: torch.Tensor, at: Positions, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r[n]: the probability given at prediction n to the distinct tokens already in x_<=pos[n] ([N])."""
    first = _first_occurrence(ids, mask)  # [batch, T]
    picked = probs.gather(-1, ids[at.seq])  # [N, T]: p_n(x_s) for every s of the sequence
    s = torch.arange(ids.shape[1], device=ids.device)
    allowed = (s[None, :] <= at.pos[:, None]) & first[at.seq]
    return (picked * allowed).sum(-1)


def repetition_loss(probs: torch.Tensor, at: Positions, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Anti-degeneracy (paper IV.G): the model's repeat probability beyond the text's own repeat rate.

    The paper penalises 1 - |unique(x)|/T, which is a constant under teacher forcing. Its
    differentiable counterpart: per sequence, the mean probability of emitting a token already in
    the context minus the fraction of the text's own next tokens that repeat one; only the excess is
    penalised, so a model that repeats exactly as often as the text pays nothing.
    """
    if at.seq.numel() == 0:
        return probs.sum() * 0.0
    r = repeat_probability(probs, at, ids, mask)
    actual = (~_first_occurrence(ids, mask))[at.seq, at.pos + 1].to(r.dtype)  # x_{t+1} repeats a token
    b = ids.shape[0]
    count = torch.zeros(b, dtype=r.dtype, device=r.device).index_add(0, at.seq, torch.ones_like(r))
    excess = torch.zeros(b, dtype=r.dtype, device=r.device).index_add(0, at.seq, r - actual)
    has = count > 0
    return F.relu(excess[has] / count[has]).mean()


def vocab_aux_loss(vocab_costs: torch.Tensor, token_ids: torch.Tensor, mean_csc: torch.Tensor) -> torch.Tensor:
    """1 - Pearson correlation between C_vocab and the empirical mean CSC per token, averaged over K.

    `token_ids` [n] are the tokens that carry labels in the training data, `mean_csc` [n] their mean CSC.
    """
    if token_ids.numel() < 2:
        return vocab_costs.sum() * 0.0
    c = vocab_costs[token_ids].to(torch.float32)  # [n, K]
    y = mean_csc.to(c.dtype)[:, None]
    cc, yc = c - c.mean(0), y - y.mean(0)
    corr = (cc * yc).sum(0) / (cc.norm(dim=0) * yc.norm(dim=0)).clamp_min(1e-12)
    return (1.0 - corr).mean()
