"""Lagrangian training of MetabolicGPT-2 (paper IV.E-IV.G, V.B, V.C, VI.D) for both variants.

One step: forward under the budgets -> the eq. (22) terms (`metabolic.train.losses`) -> AdamW step (cost
logits and the budget pathway in groups of their own without weight decay, which would pull the
token-cost logits towards a fixed Softplus value instead of the labels; the cost logits at `cost_lr`
under the scaled parameterisation, else at lr x `cost_lr_multiplier` as the budget pathway) -> gradient clipping -> dual
ascent on lambda (`metabolic.train.dual`) -> the step's (proxy total, CSC total) pairs into the online
calibration, refitted every `calib_refit_every` steps and at the end of every epoch.

What each variant constrains (see `metabolic.model.metabolic_gpt2` for the architecture side):

* faithful: C_hat = batch average of the realised proxy totals sum_t c_t (costs read on budget-biased
  states), against one constant budget vector B = the K targets x the curriculum factor of the epoch.
* expected-cost: per sequence, the expected total E_i = C_vocab(x_1) + sum_t <p(. | x_<=t, B_i), C_vocab>
  (the first token has no prediction and counts at its own cost), against a budget that varies per
  sequence: B_i = the sequence's own total CSC (hindsight budgets: the text the LM loss teaches is
  exactly a text that meets its budget, so the two losses agree; no curriculum, whose loose budgets
  would contradict that text). The squared term is the mean of the per-sequence squared gaps. C_vocab
  enters E_i without gradient: the constraint moves the distribution, not the cost estimates. B_i is
  compared with E_i in proxy units, through the online calibration (eq. 17, refitted as training goes):
  C_vocab's scale is not tied to CSC's (the vocab-aux loss is a correlation), and unmapped, a constant
  offset E > B drove lambda to its bound and the language model towards cheap tokens. Fitted on the
  same (E_i, B_i) pairs, the map leaves no average gap, so lambda stays near 0 by construction and the
  per-sequence squared gap teaches the budget pathway.

Before the first epoch (a fresh run only), the cost head's input standardisation is measured on the
training texts' states, and with `train.cost_warmup_epochs` the cost parameters are fitted to the CSC
labels alone on those fixed states (`warm_up_costs`): the joint training then moves them at the small
`train.cost_lr`. Both are part of the scaled parameterisation (metabolic.model.metabolic_gpt2).

What a budget counts (`TrainingData.counted_from`, `train.budget_span`): every token of the text (the
paper), or, as generation and Table I count, the continuation after the first `generation.prompt_tokens`
tokens: then totals, targets, the budget scale, the realised or expected totals and the calibration
points all count that span, and a text without a continuation is held to no budget.

The calibration maps what the variant constrains (faithful: realised proxy total; expected-cost:
expected total) to total CSC; both live in proxy units, which CSC supervision keeps close to CSC units.

Per epoch, one row of `metrics.jsonl` holds every quantity of paper V.C (train/val loss, aux, err,
lambda, shape, target and achieved budget, calib a and b) plus each loss term, validation perplexity
and the common budget-tracking check used to compare the variants: for each target level B_j, the
calibrated expected total on the validation texts under budget B_j (teacher forced). "shape" is not
defined in the paper; we log the curriculum factor of the epoch (budgets = shape x targets).

"Best balanced" checkpoint (paper VI.D): the epoch with the lowest
    score = ln(val_ppl / backbone_val_ppl) + mean_j |achieved_j - B_j| / B_j
i.e. the relative perplexity cost of training (log scale, ~ relative increase) plus the mean
relative budget error over the target levels, with equal weights; ties go to the later epoch. The
reference perplexity is the backbone's, measured before training, so the rule can be applied epoch by
epoch (a resumed run selects the same epoch).

After every epoch a checkpoint (model, optimiser, lambda, calibration, RNG, metrics, best so far) is
written atomically; a run interrupted at any point resumes from the last finished epoch with results
identical to an uninterrupted run on CPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from metabolic.core import artefacts, resume
from metabolic.core.artefacts import atomic_write_json, read_jsonl, write_jsonl
from metabolic.core.config import TrainConfig
from metabolic.core.errors import ConfigError, DataError, DivergedError
from metabolic.core.stats import spearman
from metabolic.csc.dataset import scale_labels, sequence_totals
from metabolic.model.backbone import decay_split, default_device, load_backbone
from metabolic.model.calibration import OnlineAffine
from metabolic.model.metabolic_gpt2 import VARIANTS, MetabolicGPT2, MetabolicSettings
from metabolic.train import losses
from metabolic.train.dual import curriculum_factor, dual_update
from metabolic.train.pretrain import batch_order

log = logging.getLogger(__name__)

read_metrics = read_jsonl  # a run's metrics log (one row per epoch)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SELECTION = "selection.json"
CALIBRATION_POINTS = "calibration_points.json"
BEST_DIR = "best"
LAST_DIR = "last"


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """Sequences with per-token targets and totals on one CSC scale, the K targets and the budget scale."""

    train_ids: list[list[int]]
    train_labels: list[np.ndarray]  # float32 per token on the CSC scale, NaN = unlabelled
    train_totals: np.ndarray  # float64 [n], NaN = no label
    valid_ids: list[list[int]]
    valid_labels: list[np.ndarray]
    valid_totals: np.ndarray
    targets: np.ndarray  # float64 [K] target budgets (CSC units)
    budget_scale: float  # median total CSC of the training texts (eq. 15)
    fingerprint: str
    # First token position a budget counts: 0 = the whole text (the paper); s = a generation's rule, the
    # continuation after an s-token prompt (totals, targets and constrained costs count positions >= s).
    counted_from: int = 0

    @property
    def budget_range(self) -> tuple[float, float]:
        """The budgets training conditions on (min, max): targets and the per-sequence totals."""
        values = np.concatenate([self.targets, self.train_totals[np.isfinite(self.train_totals) & (self.train_totals > 0)]])
        return float(values.min()), float(values.max())


def _check_ids(ids: Sequence[Sequence[int]], vocab_size: int, split: str) -> None:
    for seq in ids:
        if len(seq) and (min(seq) < 0 or max(seq) >= vocab_size):
            bad = max(seq) if max(seq) >= vocab_size else min(seq)
            raise DataError(f"CSC cache {split} token id {bad} is outside the backbone's vocabulary of {vocab_size}: "
                            f"the cache was made with another tokenizer; rebuild it (python -m metabolic run --stages csc)")


def target_budgets(train: TrainConfig, stats: dict[str, Any], totals: np.ndarray) -> np.ndarray:
    """The K targets, ascending (tier k = dimension k): `train.budgets`, else the CSC statistics'
    low/medium/high (K = 3), else the `budget_quantiles` of the training totals."""
    if train.budgets:
        return np.sort(np.asarray(train.budgets, dtype=np.float64))
    budgets = stats.get("budgets") or {}
    if len(budgets) == train.K:
        values = np.asarray(list(budgets.values()), dtype=np.float64)
    elif len(train.budget_quantiles) == train.K:
        finite = totals[np.isfinite(totals)]
        values = np.quantile(finite, train.budget_quantiles) if finite.size else np.zeros(0)
    else:
        raise ConfigError(f"train.K={train.K} but train.budget_quantiles has {len(train.budget_quantiles)} entries: "
                          f"give K quantiles or K train.budgets")
    if values.size != train.K or not np.all(np.isfinite(values) & (values > 0)):
        raise DataError(f"target budgets {values.tolist()} from the CSC statistics are not {train.K} values > 0: "
                        f"set train.budgets or label more sequences")
    return np.sort(values)


def counted_from(train: TrainConfig, prompt_tokens: int) -> int:
    """The first token position a training budget counts (`train.budget_span`): the generation prompt's length, or 0."""
    return prompt_tokens if train.budget_span == "continuation" else 0


def span_totals(csc_list: Sequence[np.ndarray], scale: str, counted_from: int) -> np.ndarray:
    """Total CSC per text of the tokens at positions >= `counted_from` on `scale` (T = the whole text's
    length, as for a generation); NaN for a text with no such token or no label there."""
    if counted_from == 0:
        return sequence_totals(csc_list, scale)
    return sequence_totals([np.asarray(c)[counted_from:] for c in csc_list], scale, lengths=[len(c) for c in csc_list])


def prepare_data(csc_data, train: TrainConfig, vocab_size: int, scale: str = "raw", counted_from: int = 0) -> TrainingData:
    """Check a CSC cache against the backbone and put its labels on `scale` (per token and per sequence).

    `counted_from` > 0 (`train.budget_span="continuation"`): totals count the tokens from that position
    on, and the targets and budget scale are quantiles and median of those totals."""
    _check_ids(csc_data.train_ids, vocab_size, "train")
    _check_ids(csc_data.valid_ids, vocab_size, "valid")
    for split, ids, labels in (("train", csc_data.train_ids, csc_data.train_csc), ("valid", csc_data.valid_ids, csc_data.valid_csc)):
        if len(ids) != len(labels) or any(len(a) != len(b) for a, b in zip(ids, labels)):
            raise DataError(f"CSC cache {split} split has labels that do not match its sequences: rebuild it")
        if not ids:
            raise DataError(f"CSC cache {split} split is empty: raise csc.max_sequences / csc.max_valid_sequences")
    train_totals = span_totals(csc_data.train_csc, scale, counted_from)
    valid_totals = span_totals(csc_data.valid_csc, scale, counted_from)
    stats = csc_data.stats if counted_from == 0 else {}  # the statistics describe whole texts
    known = train_totals[np.isfinite(train_totals)]
    median = float(stats.get("median", np.median(known) if known.size else math.nan))
    if not (math.isfinite(median) and median > 0):
        raise DataError(f"median total CSC {median!r} is not > 0: the budget encoder needs a positive scale"
                        + (f" (no training text is longer than {counted_from} tokens?)" if counted_from else ""))
    return TrainingData(
        train_ids=[list(x) for x in csc_data.train_ids], train_labels=scale_labels(csc_data.train_csc, scale),
        train_totals=train_totals, valid_ids=[list(x) for x in csc_data.valid_ids],
        valid_labels=scale_labels(csc_data.valid_csc, scale), valid_totals=valid_totals,
        targets=target_budgets(train, stats, train_totals), budget_scale=median,
        fingerprint=artefacts.fingerprint({"csc": csc_data.fingerprint, "scale": scale, "counted_from": counted_from}),
        counted_from=counted_from,
    )


def token_label_means(ids: Sequence[Sequence[int]], labels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The tokens that carry labels and their empirical mean label (for the vocab-aux loss)."""
    flat_ids = np.concatenate([np.asarray(x, np.int64) for x in ids])
    flat = np.concatenate([np.asarray(x, np.float64) for x in labels])
    ok = np.isfinite(flat)
    uniq, inverse = np.unique(flat_ids[ok], return_inverse=True)
    sums = np.bincount(inverse, weights=flat[ok])
    counts = np.bincount(inverse)
    return uniq, sums / counts


@dataclass
class Batch:
    ids: torch.Tensor  # [b, T] int64, padded with 0
    mask: torch.Tensor  # [b, T] 1 = real token
    labels: torch.Tensor  # [b, T] float32 CSC targets, NaN = unlabelled or padding
    totals: torch.Tensor  # [b] float64 CSC totals of the counted span, NaN = unknown
    counted_from: int = 0  # first position a budget counts (TrainingData.counted_from)

    @property
    def counted(self) -> torch.Tensor:
        """[b, T] 1 where a real token counts towards the budget."""
        keep = torch.arange(self.ids.shape[1], device=self.ids.device) >= self.counted_from
        return self.mask * keep[None, :].to(self.mask.dtype)

    @property
    def constrained(self) -> torch.Tensor:
        """[b] 1 for a text with at least one counted token (only these are held to a budget)."""
        return (self.counted.sum(1) > 0).to(torch.float32)


def make_batch(ids: Sequence[Sequence[int]], labels: Sequence[np.ndarray], totals: np.ndarray, device,
               counted_from: int = 0) -> Batch:
    t = max(len(x) for x in ids)
    b = len(ids)
    out_ids = torch.zeros(b, t, dtype=torch.int64)
    mask = torch.zeros(b, t, dtype=torch.int64)
    lab = torch.full((b, t), float("nan"), dtype=torch.float32)
    for i, (x, y) in enumerate(zip(ids, labels)):
        out_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.int64)
        mask[i, : len(x)] = 1
        lab[i, : len(x)] = torch.as_tensor(np.asarray(y, np.float32))
    return Batch(out_ids.to(device), mask.to(device), lab.to(device), torch.as_tensor(np.asarray(totals, np.float64)).to(device),
                 counted_from)


# --- one step ----------------------------------------------------------------------------------


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
        model.calibration.update(x[known], y[known])


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


# --- evaluation --------------------------------------------------------------------------------


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


@torch.no_grad()
def training_states(model: MetabolicGPT2, data: TrainingData, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Per training text: (token ids [T], the backbone's final hidden states [T, H], labels [T]), eval mode."""
    was = model.backbone.training
    model.backbone.eval()
    out = []
    for start in range(0, len(data.train_ids), batch_size):
        batch = make_batch(data.train_ids[start:start + batch_size], data.train_labels[start:start + batch_size],
                           data.train_totals[start:start + batch_size], model.device)
        h = model.backbone.transformer(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
        for row in range(batch.ids.shape[0]):
            real = batch.mask[row].bool()
            out.append((batch.ids[row][real], h[row][real], batch.labels[row][real]))
    model.backbone.train(was)
    return out


def head_input_statistics(states: Sequence[tuple[torch.Tensor, ...]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and sd [H] of the hidden states of `training_states` (float64 sums, then `dtype`)."""
    h = torch.cat([s[1] for s in states]).double()
    mean = h.mean(0)
    std = h.std(0, unbiased=False).clamp_min(1e-6)
    return mean.to(dtype), std.to(dtype)


def warm_up_costs(model: MetabolicGPT2, states: Sequence[tuple[torch.Tensor, ...]], cfg: TrainConfig) -> dict[str, Any]:
    """`train.cost_warmup_epochs` epochs of L_CSC alone on the cost head and token costs, the backbone frozen.

    The joint training gives the cost model a few steps only (smoke: 12) while it also moves the
    language model under it; fitted first on the fixed states, like a probe (linear probing before
    fine-tuning), it starts the Lagrangian training where a ridge probe ends (README, measured facts).
    The states are the backbone's before training and the budget bias is still 0, so these are the
    costs the first training step reads. Returns the warm-up's first and last epoch's mean loss.
    """
    params = [p for name, p in model.named_parameters() if name.startswith(COST_PREFIXES)]
    lr = cfg.cost_warmup_lr if cfg.cost_parameterisation == "scaled" else cfg.lr * cfg.cost_lr_multiplier
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = csc_loss_fn(cfg)
    epoch_loss = []
    for epoch in range(cfg.cost_warmup_epochs):
        total = 0.0
        batches = batch_order(len(states), cfg.batch_size, epoch, cfg.seed + 7919)
        for idx in batches:
            ids, h, labels = (torch.cat([states[i][k] for i in idx.tolist()]) for k in range(3))
            costs = model.costs_at(ids, h)
            loss = loss_fn(costs[None], labels[None], unit=model.settings.cost_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        epoch_loss.append(total / max(len(batches), 1))
    return {"epochs": cfg.cost_warmup_epochs, "loss_first_epoch": epoch_loss[0] if epoch_loss else None,
            "loss_last_epoch": epoch_loss[-1] if epoch_loss else None}


A_MIX_FOLDS = 4  # cross-validation folds over training texts for `choose_a_mix`


def contiguous_folds(n_texts: int, k: int) -> list[list[int]]:
    """`k` folds of consecutive text indices (sizes differ by at most one), so that texts next to each
    other in the corpus, mostly lines of one article, stay in one fold.

    >>> contiguous_folds(7, 3)
    [[0, 1], [2, 3, 4], [5, 6]]
    """
    k = min(k, n_texts)
    bounds = [round(i * n_texts / k) for i in range(k + 1)] if k else [0]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def choose_a_mix(model: MetabolicGPT2, states: Sequence[tuple[torch.Tensor, ...]], cfg: TrainConfig) -> dict[str, Any]:
    """Eq. (14)'s mix a_mix chosen from `train.a_mix_choices` by cross-validation over training texts.

    For each choice: the cost warm-up (`warm_up_costs`) on the texts outside a fold, then Spearman
    between the in-context costs and the labels of the fold's texts; the best mean over
    `A_MIX_FOLDS` folds wins (ties: the earlier choice), as a ridge probe's strength is chosen. Why:
    the per-token-id table holds one free cost per vocabulary entry, which few labelled texts cannot
    identify for the words of other articles, while the head reads the context; how much of each to
    use is a property of the data. The folds are contiguous (`contiguous_folds`): the held-out split
    holds out whole articles, and folds that interleave lines of one article would reward the table
    for words it saw in the same article. Only training texts are read; the cost parameters are left as
    found and `model.settings.a_mix` is set to the choice.
    Returns {"a_mix": choice, "cv_spearman": {choice: mean held-out Spearman}, "folds": n}.
    """
    params = {name: p for name, p in model.named_parameters() if name.startswith(COST_PREFIXES)}
    start = {name: p.detach().clone() for name, p in params.items()}
    folds = contiguous_folds(len(states), A_MIX_FOLDS)

    def restore() -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(start[name])

    scores: dict[float, float] = {}
    for a in cfg.a_mix_choices:
        model.settings = replace(model.settings, a_mix=float(a))
        per_fold = []
        for held in folds:
            restore()
            warm_up_costs(model, [st for i, st in enumerate(states) if not held[0] <= i <= held[-1]], cfg)
            with torch.no_grad():
                ids, h, labels = (torch.cat([states[i][k] for i in held]) for k in range(3))
                pred = model.proxy_total(model.costs_at(ids, h))
            ok = torch.isfinite(labels)
            per_fold.append(spearman(pred[ok].double().cpu().numpy(), labels[ok].double().cpu().numpy()))
        finite = [r for r in per_fold if math.isfinite(r)]
        scores[float(a)] = float(np.mean(finite)) if finite else math.nan
    restore()
    best = max(scores, key=lambda a: -math.inf if math.isnan(scores[a]) else scores[a])
    model.settings = replace(model.settings, a_mix=best)
    return {"a_mix": best, "cv_spearman": {str(a): r for a, r in scores.items()}, "folds": len(folds)}


def balanced_score(val_ppl: float, reference_ppl: float, level_rel_err: float) -> float:
    """The best-balanced rule (module doc): ln(ppl / reference) + mean relative budget error."""
    return math.log(val_ppl / reference_ppl) + level_rel_err


# --- the loop ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """A finished training run: where it is, its per-epoch metrics and the selected checkpoint."""

    variant: str
    folder: Path
    metrics: list[dict[str, Any]]
    best_epoch: int
    best_dir: Path
    last_dir: Path
    reference_ppl: float
    targets: list[float]
    fingerprint: str

    def load_best(self, device=None) -> MetabolicGPT2:
        return MetabolicGPT2.from_pretrained(self.best_dir, device=device)


def uses_mean_label(cfg: TrainConfig) -> bool:
    """Whether the model's settings need the mean per-token training label (`model_settings`)."""
    return cfg.cost_parameterisation == "scaled" or cfg.token_cost_init_from_csc


def model_settings(cfg: TrainConfig, variant: str, budget_scale: float, mean_label: float | None = None) -> MetabolicSettings:
    """The model's cost settings for `cfg`; `mean_label` (the mean per-token training label) is needed by
    the scaled parameterisation (it is s, and every cost starts there) and by `token_cost_init_from_csc`."""
    scaled = cfg.cost_parameterisation == "scaled"
    from_labels = uses_mean_label(cfg)
    if from_labels and mean_label is None:
        raise ConfigError(f"train.cost_parameterisation={cfg.cost_parameterisation!r} needs the mean per-token CSC label")
    return MetabolicSettings(variant=variant, K=cfg.K, a_mix=cfg.a_mix, vocab_cost_min=cfg.vocab_cost_min, budget_scale=budget_scale,
                             per_layer_budget=cfg.per_layer_budget,
                             token_cost_init=mean_label if from_labels else cfg.token_cost_init,
                             calib_ridge=cfg.calib_ridge, cost_scale=mean_label if scaled else 1.0, standardise_head=scaled,
                             cost_grad_to_backbone=not scaled)


def mean_token_label(data: TrainingData) -> float:
    """The mean per-token training label (on the training scale), > 0."""
    flat = np.concatenate([np.asarray(x, np.float64) for x in data.train_labels])
    mean = float(np.nanmean(flat)) if np.isfinite(flat).any() else float("nan")
    if not (math.isfinite(mean) and mean > 0):
        raise DataError(f"mean per-token CSC label {mean!r} is not > 0: set train.cost_parameterisation=paper and "
                        f"train.token_cost_init_from_csc=false, or label more texts")
    return mean


def train(
    backbone_path: str | Path,
    data: TrainingData,
    cfg: TrainConfig,
    variant: str,
    work_dir: Path,
    prior_cost: np.ndarray | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train one variant in `work_dir`, resuming from `work_dir/checkpoint.pt` when it matches.

    `stop_after_epochs` ends the call (as an interruption would, with KeyboardInterrupt) after that
    many epochs; tests use it to check that resuming reproduces an uninterrupted run.
    """
    from tqdm.auto import tqdm

    if variant not in VARIANTS:
        raise ConfigError(f"train.variant={variant!r} is invalid: choose one of {', '.join(VARIANTS)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    # the backbone by its artefact's fingerprint where it has one (not its path: a moved data folder resumes)
    backbone_key = (artefacts.read_manifest(Path(backbone_path)) or {}).get("fingerprint") or str(backbone_path)
    run_key = artefacts.fingerprint({"train": asdict(cfg), "variant": variant, "data": data.fingerprint,
                                     "backbone": backbone_key, "prior": prior_cost is not None})
    ckpt_path = work_dir / CHECKPOINT
    state = resume.load_checkpoint(ckpt_path)
    if state is not None and state.get("run_key") != run_key:
        raise DataError(f"checkpoint {ckpt_path} was made from another config or data: delete it (or its run "
                        f"folder) to train from scratch, or rerun with the config that made it")

    torch.manual_seed(cfg.seed)
    backbone = load_backbone(backbone_path, device=device)
    vocab_size = backbone.config.vocab_size
    _check_ids(data.train_ids, vocab_size, "train")
    _check_ids(data.valid_ids, vocab_size, "valid")
    if len(data.targets) != cfg.K:
        raise ConfigError(f"{len(data.targets)} target budgets for train.K={cfg.K}: give K budgets")
    settings = model_settings(cfg, variant, data.budget_scale, mean_label=mean_token_label(data) if uses_mean_label(cfg) else None)
    model = MetabolicGPT2(backbone, settings, prior_cost=prior_cost)
    model.training_info = {"budget_range": list(data.budget_range), "targets": data.targets.tolist(), "variant": variant}
    optimizer = make_optimizer(model, cfg)
    vocab_np_ids, vocab_np_means = token_label_means(data.train_ids, data.train_labels)
    vocab_ids = torch.as_tensor(vocab_np_ids, device=device)
    vocab_means = torch.as_tensor(vocab_np_means, dtype=torch.float32, device=device)

    metrics: list[dict[str, Any]] = []
    points: dict[str, Any] = {}
    best = {"epoch": -1, "score": math.inf}
    epoch0, step = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        model.calibration = OnlineAffine.from_state_dict(state["calibration"])
        optimizer.load_state_dict(state["optimizer"])
        resume.set_rng_state(state["rng"], device)
        metrics, points, best = state["metrics"], state["points"], state["best"]
        model.training_info = state.get("training_info", model.training_info)
        if "a_mix_cv" in model.training_info:  # the mix the interrupted run chose, not the config's
            model.settings = replace(model.settings, a_mix=model.training_info["a_mix_cv"]["a_mix"])
        epoch0, step, reference_ppl = state["epochs_done"], state["step"], state["reference_ppl"]
        log.info("resuming %s training after epoch %d of %d", variant, epoch0, cfg.epochs)
    else:
        reference_ppl = backbone_val_ppl(model, data, cfg.batch_size)
        if settings.standardise_head or cfg.cost_warmup_epochs:
            states = training_states(model, data, cfg.batch_size)
            if settings.standardise_head:
                model.set_head_standardisation(*head_input_statistics(states, model.head_in_mean.dtype))
            if cfg.cost_warmup_epochs:
                if cfg.a_mix_choices and len(states) >= 2:
                    model.training_info["a_mix_cv"] = choose_a_mix(model, states, cfg)
                    log.info("%s a_mix by cross-validation: %s", variant, model.training_info["a_mix_cv"])
                model.training_info["cost_warmup"] = warm_up_costs(model, states, cfg)
                log.info("%s cost warm-up: %s", variant, model.training_info["cost_warmup"])
        torch.manual_seed(cfg.seed)  # the reference evaluation must not shift the training RNG
    model.train()
    n_train = len(data.train_ids)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    epochs_this_call = 0
    for epoch in range(epoch0, cfg.epochs):
        factor = curriculum_factor(epoch, cfg.epochs, cfg.curriculum_start) if variant == "faithful" else 1.0
        epoch_t0 = time.perf_counter()  # timings go to the log only: metrics must be identical on resume
        ledger = EpochLedger()  # per-step metrics stay on the device until the host needs them
        bar = tqdm(batch_order(n_train, cfg.batch_size, epoch, cfg.seed), desc=f"{variant} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, unit="step", leave=False)
        for idx in bar:
            idx = idx.tolist()
            batch = make_batch([data.train_ids[i] for i in idx], [data.train_labels[i] for i in idx],
                               data.train_totals[idx], device, data.counted_from)
            budgets = step_budgets(model, batch, data.targets, factor)
            train_step(model, optimizer, batch, budgets, cfg, vocab_ids, vocab_means, step, ledger)
            step += 1
            if step % cfg.calib_refit_every == 0:
                ledger.settle(model, cfg)  # divergence check and calibration points, then the refit
                model.refit_calibration()
                bar.set_postfix(loss=f"{ledger.last_loss():.3f}", lam=f"{float(model.dual_lambda.mean()):.3f}")
        bar.close()
        ledger.settle(model, cfg)
        train_s = time.perf_counter() - epoch_t0
        model.refit_calibration()
        terms, gap_k, achieved_k, target_k = ledger.summary()
        val = evaluate(model, data, cfg, factor, vocab_ids, vocab_means)
        fit = model.calibration.fit()
        score = balanced_score(val["val_ppl"], reference_ppl, val["val_level_rel_err"])
        row = {
            "epoch": epoch + 1, "step": step, "variant": variant,
            "train_loss": terms["total"], "val_loss": val["val_loss"], "val_ppl": val["val_ppl"], "val_lm": val["val_lm"],
            "aux": cfg.beta_csc * terms["csc_mse"] + cfg.vocab_aux_weight * terms["vocab_aux"],
            "err": float(gap_k.mean()), "err_k": gap_k.tolist(),
            "lambda": float(model.dual_lambda.mean()), "lambda_k": model.dual_lambda.cpu().tolist(),
            "shape": factor,
            "target_budget": float(target_k.mean()), "target_k": target_k.tolist(),
            "achieved_budget": float(achieved_k.mean()), "achieved_k": achieved_k.tolist(),
            "achieved_budget_csc": float(np.mean(fit.a + fit.b * achieved_k)),
            "calib_a": float(fit.a.mean()), "calib_b": float(fit.b.mean()),
            "calib_a_k": fit.a.tolist(), "calib_b_k": fit.b.tolist(), "calib_n": fit.n,
            **{f"train_{k}": v for k, v in terms.items() if k != "total"},
            **{f"val_{k}": v for k, v in val["terms"].items() if k != "total"},
            "val_err": val["val_err"], "val_abs_err": val["val_abs_err"], "val_achieved": val["val_achieved"],
            "val_level_targets": data.targets.tolist(),
            "val_level_achieved": val["val_level_achieved"], "val_level_achieved_csc": val["val_level_achieved_csc"],
            "val_level_rel_err": val["val_level_rel_err"], "balanced_score": score,
            "lr": optimizer.param_groups[0]["lr"], "cost_lr": optimizer.param_groups[2]["lr"],
        }
        resume.stop_if_diverged(model, {"train loss": row["train_loss"], "val loss": row["val_loss"]},
                                f"{variant} training in epoch {epoch + 1}",
                                f"lower train.lr (now {cfg.lr:g}) or train.lambda_max (now {cfg.lambda_max:g})")
        metrics.append(row)
        points[str(epoch + 1)] = {"proxy": val["points_proxy"], "csc": val["points_csc"]}
        log.info("%s epoch %d: loss %.4f val ppl %.2f err %.4f lambda %.4f score %.4f", variant, epoch + 1,
                 row["train_loss"], row["val_ppl"], row["err"], row["lambda"], score)
        if score <= best["score"]:
            best = {"epoch": epoch + 1, "score": score}
            model.save_pretrained(work_dir / BEST_DIR)
        write_jsonl(work_dir / METRICS, metrics)
        atomic_write_json(work_dir / CALIBRATION_POINTS, points)
        resume.save_checkpoint(ckpt_path, {
            "run_key": run_key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "calibration": model.calibration.state_dict(), "rng": resume.rng_state(device), "metrics": metrics,
            "points": points, "best": best, "epochs_done": epoch + 1, "step": step, "reference_ppl": reference_ppl,
            "training_info": model.training_info,
        })
        epochs_this_call += 1
        log.info("%s epoch %d: %.1f s training, %.1f s evaluating and saving", variant, epoch + 1, train_s,
                 time.perf_counter() - epoch_t0 - train_s)
        resume.interrupt_if(stop_after_epochs, epochs_this_call, epoch + 1 >= cfg.epochs, "epochs")
    model.save_pretrained(work_dir / LAST_DIR)
    atomic_write_json(work_dir / SELECTION, {
        "rule": "min ln(val_ppl / backbone_val_ppl) + mean_j |achieved_j - B_j| / B_j; ties -> later epoch",
        "best_epoch": best["epoch"], "best_score": best["score"], "reference_ppl": reference_ppl,
        "scores": {str(r["epoch"]): r["balanced_score"] for r in metrics}, "targets": data.targets.tolist(),
        "budget_range": list(data.budget_range), "steps_per_epoch": steps_per_epoch,
    })
    return TrainResult(variant=variant, folder=work_dir, metrics=metrics, best_epoch=best["epoch"],
                       best_dir=work_dir / BEST_DIR, last_dir=work_dir / LAST_DIR, reference_ppl=reference_ppl,
                       targets=data.targets.tolist(), fingerprint=run_key)


# --- stage ------------------------------------------------------------------------------------



