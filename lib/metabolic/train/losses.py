"""The terms of the training objective (paper eq. 22, 24), each computed and returned on its own.

    L_total = L_LM + beta_CSC L_CSC + lambda^T (C_hat - B) + beta_constr ||C_hat - B||^2
              + L_entropy + L_repetition + L_vocab-aux

Next-token quantities are computed on *packed* prediction positions only (padding never reaches the
[positions, V] softmax, which dominates the step): `Positions` lists, for every position t of a real
token whose successor x_{t+1} is also real, its sequence and t. Shapes: ids and mask [batch, T];
logp/probs [N, V] at those positions; per-token costs [batch, T, K]; CSC labels [batch, T] (NaN =
unlabelled); totals and budgets [batch, K].

Training takes every next-token term from one shared softmax (`next_token_terms`, a fused forward
and backward); the separate functions (`lm_loss`, `mean_entropy`, `repetition_loss`,
`expected_totals`) define the same quantities one by one and are its test oracle (`lm_loss` and
`expected_totals` also serve validation).
Apart from `Positions.of` (packing needs the number of positions) and `LossTerms.as_floats`, nothing
here reads a value back to the host (no `.item()` or `bool()` on a tensor).
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
        """Every term as a Python float (one host sync per term: for tests and one-off reads)."""
        return dict(zip(self.names(), self.stacked().tolist()))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.__dataclass_fields__)

    def stacked(self) -> torch.Tensor:
        """Every term in `names()` order as one detached float32 tensor [8], left on the device (no sync)."""
        return torch.stack([getattr(self, name).detach().float() for name in self.names()])


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


def csc_mse(token_costs: torch.Tensor, csc: torch.Tensor, unit: float = 1.0) -> torch.Tensor:
    """Eq. (18): mean squared error over labelled tokens (finite labels), every cost dimension alike,
    in units of `unit` (1 = CSC units, the paper; the scaled parameterisation passes its cost scale
    s, so the term is O(1) whatever CSC's scale); 0 (with zero gradient) when nothing is labelled.
    Branch-free: no host sync on the label count."""
    labelled = torch.isfinite(csc)
    target = torch.where(labelled, csc, torch.zeros_like(csc))[..., None]
    err = ((token_costs - target.to(token_costs.dtype)) / unit) ** 2 * labelled[..., None]
    return err.sum() / (labelled.sum() * token_costs.shape[-1]).clamp_min(1)


LOG_FLOOR = 0.05  # log-space CSC loss: log(x + LOG_FLOOR x unit), since labels can be 0


def csc_log_mse(token_costs: torch.Tensor, csc: torch.Tensor, unit: float = 1.0) -> torch.Tensor:
    """Eq. (18) on a log scale: mean of (log(c + f u) - log(y + f u))^2 over labelled tokens, f = LOG_FLOOR,
    u = `unit`. CSC is heavy-tailed (sd / mean ~ 2.5 per token), so the plain squared error is ruled by
    a few large labels; a relative error weighs every token's rank alike. 0 when nothing is labelled."""
    labelled = torch.isfinite(csc)
    target = torch.where(labelled, csc, torch.zeros_like(csc)).clamp_min(0.0)[..., None].to(token_costs.dtype)
    floor = LOG_FLOOR * unit
    err = (torch.log(token_costs + floor) - torch.log(target + floor)) ** 2 * labelled[..., None]
    return err.sum() / (labelled.sum() * token_costs.shape[-1]).clamp_min(1)


def constraint_terms(totals: torch.Tensor, budgets: torch.Tensor, lam: torch.Tensor, per_sequence: bool,
                     weights: torch.Tensor | None = None):
    """lambda^T (C_hat - B) and ||C_hat - B||^2, plus the gap C_hat - B [K] for the dual update.

    `per_sequence=False` (the paper): C_hat and B are batch averages. `True` (budgets that vary per
    sequence): the squared term is the mean over sequences of each sequence's own squared gap.
    `weights` [batch] (1 = constrained, 0 = left out, e.g. a text with no continuation) restrict
    both averages to the constrained sequences; none constrained gives zero terms.
    """
    gaps = totals - budgets.to(totals.dtype)  # [batch, K]
    w = torch.ones_like(gaps[:, 0]) if weights is None else weights.to(gaps.dtype)
    n = w.sum().clamp_min(1)
    gaps = gaps * w[:, None]
    gap = gaps.sum(dim=0) / n
    lagrangian = (lam.to(gap.dtype) * gap).sum()
    sq = (gaps**2).sum(-1).sum() / n if per_sequence else (gap**2).sum()
    return lagrangian, sq, gap


def mean_entropy(logp: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the predictive distributions (eq. 24's H; the loss is -alpha_ent H)."""
    if logp.shape[0] == 0:
        return logp.sum() * 0.0
    return -(probs * logp).sum(-1).mean()


def expected_totals(probs: torch.Tensor, at: Positions, ids: torch.Tensor, mask: torch.Tensor,
                    vocab_costs: torch.Tensor, counted_from: int = 0) -> torch.Tensor:
    """E_i = C_vocab(x_1) + sum_t <p(. | x_<=t), C_vocab> over the sequence's predictions: [batch, K].

    With `counted_from` = s > 0 only the tokens at positions >= s count (a generation's budget counts
    its continuation after an s-token prompt): the predictions of x_s onwards, no first-token term.
    """
    return sequence_expected_totals(probs @ vocab_costs.to(probs.dtype), at, ids, mask, vocab_costs, counted_from)


def sequence_expected_totals(per_pos: torch.Tensor, at: Positions, ids: torch.Tensor, mask: torch.Tensor,
                             vocab_costs: torch.Tensor, counted_from: int = 0) -> torch.Tensor:
    """`expected_totals` from the per-prediction expected costs <p_n, C_vocab> [N, K]."""
    totals = torch.zeros(ids.shape[0], vocab_costs.shape[1], dtype=per_pos.dtype, device=ids.device)
    if counted_from > 0:
        per_pos = per_pos * (at.pos + 1 >= counted_from)[:, None].to(per_pos.dtype)
    totals = totals.index_add(0, at.seq, per_pos)
    if counted_from > 0:
        return totals
    return totals + vocab_costs[ids[:, 0]].to(per_pos.dtype) * mask[:, :1].to(per_pos.dtype)


def _first_occurrence(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, T] bool: x_s is a real token seen for the first time at s."""
    t = ids.shape[1]
    same = ids[:, :, None] == ids[:, None, :]
    earlier = torch.tril(torch.ones(t, t, dtype=torch.bool, device=ids.device), diagonal=-1)
    return ~(same & earlier).any(-1) & mask.bool()


def _repeat_from_picked(picked: torch.Tensor, at: Positions, ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """r[n]: the probability prediction n gives the distinct tokens already in x_<=pos[n] ([N]), from
    picked[n, s] = p_n(x_s) for every s of the sequence ([N, T]) and `_first_occurrence`."""
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
    return _repetition_from_picked(probs.gather(-1, ids[at.seq]), at, ids, mask)


def _repetition_from_picked(picked: torch.Tensor, at: Positions, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`repetition_loss` from picked[n, s] = p_n(x_s) [N, T] (N > 0); branch-free (no host sync)."""
    first = _first_occurrence(ids, mask)
    r = _repeat_from_picked(picked, at, ids, first)
    actual = (~first)[at.seq, at.pos + 1].to(r.dtype)  # x_{t+1} repeats a token
    b = ids.shape[0]
    count = torch.zeros(b, dtype=r.dtype, device=r.device).index_add(0, at.seq, torch.ones_like(r))
    excess = torch.zeros(b, dtype=r.dtype, device=r.device).index_add(0, at.seq, r - actual)
    has = count > 0  # sequences with at least one prediction: the mean runs over these only
    per_seq = torch.where(has, F.relu(excess / count.clamp_min(1)), torch.zeros_like(excess))
    return per_seq.sum() / has.sum()


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


# --- the shared softmax -------------------------------------------------------------------------


@dataclass
class NextTokenTerms:
    """Everything the objective takes from the next-token distributions, from one shared softmax."""

    lm: torch.Tensor  # eq. (6): mean NLL over the packed positions
    entropy: torch.Tensor  # mean predictive entropy H (nats)
    repetition: torch.Tensor  # `repetition_loss`
    per_pos_cost: torch.Tensor | None  # [N, K] <p_n, C_vocab>, when vocab costs were given


def next_token_terms(logits: torch.Tensor, at: Positions, ids: torch.Tensor, mask: torch.Tensor,
                     vocab_costs: torch.Tensor | None = None) -> NextTokenTerms:
    """LM loss, entropy, repetition and (with `vocab_costs` [V, K]) the expected costs from logits [N, V].

    The same values as `lm_loss`, `mean_entropy`, `repetition_loss` and `expected_totals` on
    `log_softmax(logits)` (the forward runs the same operations), but the [N, V] work is shared: one
    log-softmax, and a hand-fused backward (`_SharedSoftmax`) that forms the logits' gradient in a few
    vocabulary-sized passes instead of one chain per term. Gradients equal the separate terms' up to
    float rounding (tests/test_fused_losses.py).
    """
    if at.seq.numel() == 0:
        zero = logits.sum() * 0.0
        per_pos = None if vocab_costs is None else logits.new_zeros(0, vocab_costs.shape[1]) + vocab_costs.sum() * 0.0
        return NextTokenTerms(lm=zero, entropy=zero, repetition=zero, per_pos_cost=per_pos)
    costs = vocab_costs.to(logits.dtype) if vocab_costs is not None else logits.new_zeros(logits.shape[1], 0)
    nll, ent, per_pos, picked = _SharedSoftmax.apply(logits, at.target, costs, ids[at.seq])
    return NextTokenTerms(lm=nll.mean(), entropy=ent.mean(), repetition=_repetition_from_picked(picked, at, ids, mask),
                          per_pos_cost=per_pos if vocab_costs is not None else None)


class _SharedSoftmax(torch.autograd.Function):
    """logits [N, V] -> (-log p_n(target_n) [N], H(p_n) [N], p_n @ C [N, K], p_n(picks_n,s) [N, S]).

    Backward: for any f(p), df/dz = p * (G - <p, G>) with G = df/dp. Summing the four outputs' G's
    (C g_E^T, the scattered g_picked, -g_H (log p + 1), and the NLL's, folded in exactly) gives
        dz = p * (G' + s) - g_nll * onehot(target),   G' = C g_E^T + scatter(g_picked) - g_H log p,
    with the per-row scalar s = g_nll - <p, G'> = g_nll - <E, g_E> - <picked, g_picked> - g_H H
    (the constant 1 in log p + 1 cancels against <p, 1> = 1), which needs no pass over V. On the CPU
    every fresh [N, V] buffer costs page faults as much as the arithmetic, so the backward allocates
    none (it works in place in log p's buffer); the separate terms allocate about a dozen.
    """

    @staticmethod
    def forward(ctx, logits, target, costs, picks):
        logp = F.log_softmax(logits, dim=-1)
        p = logp.exp()
        nll = -logp.gather(-1, target[:, None])[:, 0]
        ent = -torch.bmm(p[:, None, :], logp[:, :, None])[:, 0, 0]  # row dot products, no [N, V] temporary
        per_pos = p @ costs
        picked = p.gather(-1, picks)
        ctx.save_for_backward(logp, p, target, costs, picks, ent, per_pos, picked)
        return nll, ent, per_pos, picked

    @staticmethod
    def backward(ctx, g_nll, g_ent, g_cost, g_picked):
        logp, p, target, costs, picks, ent, per_pos, picked = ctx.saved_tensors
        # The gradient is built in log p's buffer (no fresh [N, V] allocation): log p is not needed
        # after this, and a second backward through the same graph fails loudly (autograd's version
        # check on saved tensors) instead of reading the overwritten buffer.
        grad = logp.mul_(-g_ent[:, None])  # -g_H log p
        if costs.shape[1]:
            grad.addmm_(g_cost, costs.T)  # + C g_E^T
        grad.scatter_add_(-1, picks, g_picked)
        row = g_nll - (per_pos * g_cost).sum(-1) - (picked * g_picked).sum(-1) - g_ent * ent
        grad.add_(row[:, None]).mul_(p)
        grad.scatter_add_(-1, target[:, None], -g_nll[:, None])
        grad_costs = (g_cost.T @ p).T if ctx.needs_input_grad[2] else None  # [V, K]; this order is the fast one
        return grad, None, grad_costs, None
