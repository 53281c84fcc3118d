"""One Lagrangian training step (eq. 22 terms, backward, AdamW, dual ascent), its ledger, and the optimiser.

What each variant constrains is described in `metabolic.train.loop`'s module doc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from metabolic.core import resume
from metabolic.core.config import TrainConfig
from metabolic.core.errors import DivergedError
from metabolic.model.backbone import decay_split
from metabolic.model.metabolic_gpt2 import MetabolicGPT2
from metabolic.train import losses
from metabolic.train.data import Batch
from metabolic.train.dual import dual_update


@dataclass
class StepResult:
    terms: losses.LossTerms
    totals: torch.Tensor  # [b, K] constrained proxy totals (detached)
    budgets: torch.Tensor  # [b, K] the budgets the totals were held to (expected-cost: in proxy units)
    gap: torch.Tensor  # [K] mean C - B over the constrained texts (detached)
    constrained: torch.Tensor  # [b] 1 = held to its budget (has a counted token)


def step_budgets(model: MetabolicGPT2, batch: Batch, targets: np.ndarray, factor: float) -> torch.Tensor:
    """[b, K] budgets: faithful = the constant curriculum vector; expected-cost = each text's own total."""
    b, k = batch.ids.shape[0], model.settings.K
    if model.settings.variant == "faithful":
        vec = torch.as_tensor(targets * factor, dtype=torch.float32, device=batch.ids.device)
        return vec[None, :].expand(b, k)
    totals = batch.totals
    fallback = float(np.median(targets))  # a text without labels conditions on the medium target
    own = torch.where(torch.isfinite(totals) & (totals > 0), totals, torch.full_like(totals, fallback))
    return own.float()[:, None].expand(b, k)


def csc_loss_fn(cfg: TrainConfig):
    """L_CSC as `train.csc_loss` names it: `losses.csc_log_mse` ("log-mse") or `losses.csc_mse`."""
    return losses.csc_log_mse if cfg.csc_loss == "log-mse" else losses.csc_mse


def compute_step(model: MetabolicGPT2, batch: Batch, budgets: torch.Tensor, cfg: TrainConfig,
                 vocab_ids: torch.Tensor, vocab_means: torch.Tensor) -> StepResult:
    """Forward and every eq. (22) term for one batch (no backward)."""
    at = losses.Positions.of(batch.ids, batch.mask)
    with resume.autocast(batch.ids.device):
        h, token_costs, _ = model.hidden_and_costs(batch.ids, budget=budgets, attention_mask=batch.mask)
        logits = model.backbone.lm_head(h[at.seq, at.pos])  # [N, V]: real prediction positions only
    token_costs = token_costs.float()
    c_vocab = model.vocab_costs().float()  # once per step: the expected costs and the vocab-aux loss share it
    expected = model.settings.variant == "expected-cost"
    # One softmax over the packed positions serves the LM loss, entropy, repetition and expected cost.
    # The expected cost reads C_vocab without gradient: the constraint must be met by what the model
    # writes (its next-token distribution), never by lowering its cost estimates, which only CSC
    # supervision and the vocab-aux loss move. With gradient, Adam turned the constraint's tiny pull on
    # every likely token into full-size steps on tokens no label ever reached (held-out Spearman 0.12).
    nt = losses.next_token_terms(logits.float(), at, batch.ids, batch.mask, c_vocab.detach() if expected else None)
    mse = csc_loss_fn(cfg)(token_costs, batch.labels, unit=model.settings.cost_scale)
    if expected:
        totals = losses.sequence_expected_totals(nt.per_pos_cost, at, batch.ids, batch.mask, c_vocab, batch.counted_from)
    else:
        totals = (token_costs * batch.counted[..., None]).sum(1)
    constrained = batch.constrained
    # expected-cost: each text's CSC budget in proxy units through the online calibration (eq. 17), the map
    # generation steers with; the faithful variant compares proxy totals with CSC budgets, as the paper.
    targets = model.budget_in_proxy(budgets) if expected else budgets
    lagr, sq, gap = losses.constraint_terms(totals, targets, model.dual_lambda.float(), per_sequence=expected,
                                            weights=constrained)
    lm, entropy, rep = nt.lm, nt.entropy, nt.repetition
    aux = losses.vocab_aux_loss(c_vocab, vocab_ids, vocab_means)
    total = (lm + cfg.beta_csc * mse + lagr + cfg.beta_constr * sq - cfg.entropy_reg * entropy
             + cfg.repetition_penalty * rep + cfg.vocab_aux_weight * aux)
    terms = losses.LossTerms(lm=lm, csc_mse=mse, lagrangian=lagr, constraint_sq=sq, entropy=entropy,
                             repetition=rep, vocab_aux=aux, total=total)
    return StepResult(terms=terms, totals=totals.detach(), budgets=targets.detach(), gap=gap.detach(), constrained=constrained)

def train_step(model: MetabolicGPT2, optimizer, batch: Batch, budgets: torch.Tensor, cfg: TrainConfig,
               vocab_ids: torch.Tensor, vocab_means: torch.Tensor, step: int = 0,
               ledger: "EpochLedger | None" = None) -> StepResult:
    """One full training step: eq. (22) terms, backward, clipping, AdamW, dual ascent (eq. 23), and the
    batch's (proxy total, CSC total) pairs for the online calibration (refits are the caller's).

    Without a `ledger` the step is self-contained: a non-finite loss raises DivergedError before the
    optimiser step, and the calibration is updated at once (two host syncs). With one (the training
    loop), nothing waits for the device: the divergence check and the calibration points go to the
    ledger, which the loop reads at calibration refits and at the epoch's end (`EpochLedger.settle`),
    always before anything is saved.
    """
    res = compute_step(model, batch, budgets, cfg, vocab_ids, vocab_means)
    if ledger is None:
        _raise_if_diverged(res.terms.total.detach(), step, cfg)
    optimizer.zero_grad(set_to_none=True)
    res.terms.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    w = res.constrained.double()[:, None]
    n = w.sum().clamp_min(1)
    c_hat = (res.totals.double() * w).sum(0) / n  # eq. (23)'s batch-average cost vector (constrained texts)
    b_bar = (res.budgets.double() * w).sum(0) / n
    model.dual_lambda.copy_(dual_update(model.dual_lambda, c_hat, b_bar, cfg.mu, cfg.lambda_max))
    if ledger is None:
        _update_calibration(model, res.totals, batch.totals)
    else:
        ledger.record(step, res, batch.totals, c_hat, b_bar)
    return res


def _raise_if_diverged(loss: torch.Tensor | float, step: int, cfg: TrainConfig) -> None:
    if not math.isfinite(float(loss)):
        raise DivergedError(f"training diverged at step {step} (loss {float(loss)}): lower train.lr "
                            f"(now {cfg.lr:g}) or train.cost_lr_multiplier (now {cfg.cost_lr_multiplier:g}); "
                            "nothing of this run was kept")


def _update_calibration(model: MetabolicGPT2, totals: torch.Tensor, csc_totals: torch.Tensor) -> None:
    """The batch's (proxy total, CSC total) pairs of the sequences with a known CSC total."""
    x, y = totals.double().cpu().numpy(), csc_totals.cpu().numpy()
    known = np.isfinite(y)
    if known.any():
        model.calibration_stats.update(x[known], y[known])


class EpochLedger:
    """What an epoch's steps leave on the device, read back only when the host needs it.

    Per step it keeps (as device tensors, no sync): the loss terms, the gap C - B, C_hat and the mean
    budget, the calibration points, and the first step whose loss was not finite. `settle` (one
    sync) raises DivergedError for such a step and feeds the calibration the pending points in step
    order (the same updates, in the same order, as a per-step update: identical statistics);
    `summary` gives the epoch's batch-size-weighted means with the same float64 arithmetic as a
    per-step accumulation on the host.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.terms: list[torch.Tensor] = []  # [8] per step, `LossTerms.names()` order
        self.gaps: list[torch.Tensor] = []  # [K]
        self.achieved: list[torch.Tensor] = []  # [K] C_hat
        self.budgets: list[torch.Tensor] = []  # [K] mean budget
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (proxy totals [b, K], CSC totals [b])
        self._bad: tuple[torch.Tensor, torch.Tensor] | None = None  # (first non-finite step or -1, its loss)

    def record(self, step: int, res: StepResult, csc_totals: torch.Tensor, c_hat: torch.Tensor, b_bar: torch.Tensor) -> None:
        total = res.terms.total.detach()
        step_t = torch.full((), step, dtype=torch.int64, device=total.device)
        if self._bad is None:
            self._bad = (torch.full_like(step_t, -1), torch.zeros_like(total))
        first, loss = self._bad
        new = (first < 0) & ~torch.isfinite(total)
        self._bad = (torch.where(new, step_t, first), torch.where(new, total, loss))
        self.sizes.append(res.totals.shape[0])
        self.terms.append(res.terms.stacked())
        self.gaps.append(res.gap)
        self.achieved.append(c_hat)
        self.budgets.append(b_bar)
        self._pending.append((res.totals, csc_totals))

    def settle(self, model: MetabolicGPT2, cfg: TrainConfig) -> None:
        """Raise DivergedError if a step's loss was not finite; else apply the pending calibration points."""
        if self._bad is not None:
            first, loss = (float(v) for v in torch.stack([self._bad[0].double(), self._bad[1].double()]).cpu())
            if first >= 0:
                _raise_if_diverged(loss, int(first), cfg)
        if self._pending:  # one transfer for all pending steps, then one update per step, in order
            sizes = [t.shape[0] for t, _ in self._pending]
            xs = torch.cat([t.double() for t, _ in self._pending]).cpu().split(sizes)
            ys = torch.cat([y for _, y in self._pending]).cpu().split(sizes)
            for x, y in zip(xs, ys):
                _update_calibration(model, x, y)
        self._pending.clear()

    def last_loss(self) -> float:
        return float(self.terms[-1][-1]) if self.terms else float("nan")

    def summary(self) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
        """Per-sequence means over the epoch: loss terms, gap [K], achieved C_hat [K], budget [K]."""
        n = sum(self.sizes)
        acc: dict[str, float] = {}
        for row, b in zip(torch.stack(self.terms).cpu().tolist(), self.sizes):
            for key, value in zip(losses.LossTerms.names(), row):
                acc[key] = acc.get(key, 0.0) + value * b

        def weighted(rows: list[torch.Tensor]) -> np.ndarray:
            arrays = torch.stack(rows).double().cpu().numpy()
            return np.sum([a * b for a, b in zip(arrays, self.sizes)], axis=0) / n

        return ({k: v / n for k, v in acc.items()}, weighted(self.gaps), weighted(self.achieved), weighted(self.budgets))


# --- optimiser ---------------------------------------------------------------------------------

COST_PREFIXES = ("cost_head.", "token_cost_logits")
BUDGET_PREFIXES = ("budget_proj.", "layer_budget_proj.")


def make_optimizer(model: MetabolicGPT2, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: backbone (decay / no decay for biases and LayerNorms), the cost logits (at `cost_lr` under
    the scaled parameterisation, else lr x multiplier) and the budget pathway (lr x multiplier)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # tied weights once
    cost = [p for name, p in named if name.startswith(COST_PREFIXES)]
    budget = [p for name, p in named if name.startswith(BUDGET_PREFIXES)]
    decay, no_decay = decay_split((name, p) for name, p in named if not name.startswith(COST_PREFIXES + BUDGET_PREFIXES))
    fast = cfg.lr * cfg.cost_lr_multiplier
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "backbone"},
            {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "name": "backbone_no_decay"},
            {"params": cost, "weight_decay": 0.0, "lr": cfg.cost_lr if cfg.cost_parameterisation == "scaled" else fast,
             "name": "cost"},
            {"params": budget, "weight_decay": 0.0, "lr": fast, "name": "budget"},
        ],
        lr=cfg.lr,
    )
