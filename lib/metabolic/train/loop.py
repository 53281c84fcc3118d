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

The parts live in their own modules: `metabolic.train.data` (sequences, targets, batches),
`metabolic.train.step` (one step, its ledger, the optimiser) and `metabolic.train.validation` (the
per-epoch validation and the selection score); this module fits the cost head before the first epoch
and runs the epochs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from metabolic.core import artefacts, resume
from metabolic.core.artefacts import atomic_write_json, read_jsonl, write_jsonl
from metabolic.core.config import TrainConfig
from metabolic.core.errors import ConfigError, DataError
from metabolic.core.stats import spearman
from metabolic.model.backbone import default_device, load_backbone
from metabolic.model.calibration import OnlineAffine
from metabolic.model.metabolic_gpt2 import VARIANTS, MetabolicGPT2, MetabolicSettings
from metabolic.train.data import TrainingData, check_token_ids, make_batch, token_label_means
from metabolic.train.dual import curriculum_factor
from metabolic.train.pretrain import batch_order
from metabolic.train.step import COST_PREFIXES, EpochLedger, csc_loss_fn, make_optimizer, step_budgets, train_step
from metabolic.train.validation import backbone_val_ppl, balanced_score, evaluate

log = logging.getLogger(__name__)

read_metrics = read_jsonl  # a run's metrics log (one row per epoch)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SELECTION = "selection.json"
CALIBRATION_POINTS = "calibration_points.json"
BEST_DIR = "best"
LAST_DIR = "last"


# --- before the first epoch -------------------------------------------------------------------


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
    # The key of the committed `train` artefact (set by `metabolic.pipeline.train`, which later stages cite);
    # None for a run outside the pipeline. Not the checkpoint's resume key (`run_fingerprint`).
    fingerprint: str | None = None

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


def run_fingerprint(backbone_path: str | Path, data: TrainingData, cfg: TrainConfig, variant: str,
                    prior_cost: np.ndarray | None) -> str:
    """The key a checkpoint must carry to be resumed: config, variant, data, backbone and prior."""
    # the backbone by its artefact's fingerprint where it has one (not its path: a moved data folder resumes)
    backbone_key = (artefacts.read_manifest(Path(backbone_path)) or {}).get("fingerprint") or str(backbone_path)
    return artefacts.fingerprint({"train": asdict(cfg), "variant": variant, "data": data.fingerprint,
                                  "backbone": backbone_key, "prior": prior_cost is not None})


def build_model(backbone_path: str | Path, data: TrainingData, cfg: TrainConfig, variant: str,
                prior_cost: np.ndarray | None, device: torch.device) -> MetabolicGPT2:
    """A MetabolicGPT-2 on the backbone, seeded by `train.seed`, with the data checked against its vocabulary."""
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(backbone_path, device=device)
    vocab_size = backbone.config.vocab_size
    check_token_ids(data.train_ids, vocab_size, "train")
    check_token_ids(data.valid_ids, vocab_size, "valid")
    if len(data.targets) != cfg.K:
        raise ConfigError(f"{len(data.targets)} target budgets for train.K={cfg.K}: give K budgets")
    settings = model_settings(cfg, variant, data.budget_scale, mean_label=mean_token_label(data) if uses_mean_label(cfg) else None)
    model = MetabolicGPT2(backbone, settings, prior_cost=prior_cost)
    model.training_info = {"budget_range": list(data.budget_range), "targets": data.targets.tolist(), "variant": variant}
    return model


@dataclass
class RunState:
    """What a checkpoint carries besides the weights, optimiser, calibration and RNG."""

    metrics: list[dict[str, Any]] = field(default_factory=list)  # one `metrics.jsonl` row per finished epoch
    points: dict[str, Any] = field(default_factory=dict)  # per epoch: validation (proxy, CSC) totals
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": -1, "score": math.inf})  # best-balanced so far
    epochs_done: int = 0
    step: int = 0  # optimiser steps taken
    reference_ppl: float = math.nan  # the backbone's validation perplexity (the selection rule's reference)


@dataclass
class TrainingRun:
    """One variant's training in `work_dir`: the model, its optimiser, the fixed inputs of every step, the state."""

    variant: str
    cfg: TrainConfig
    data: TrainingData
    work_dir: Path
    run_key: str
    device: torch.device
    model: MetabolicGPT2
    optimizer: torch.optim.Optimizer
    vocab_ids: torch.Tensor  # [n] the token ids that carry labels (vocab-aux loss)
    vocab_means: torch.Tensor  # [n] float32 their mean label
    state: RunState = field(default_factory=RunState)

    @classmethod
    def create(cls, model: MetabolicGPT2, data: TrainingData, cfg: TrainConfig, variant: str, work_dir: Path,
               run_key: str, device: torch.device) -> "TrainingRun":
        optimizer = make_optimizer(model, cfg)
        vocab_np_ids, vocab_np_means = token_label_means(data.train_ids, data.train_labels)
        return cls(variant=variant, cfg=cfg, data=data, work_dir=work_dir, run_key=run_key, device=device, model=model,
                   optimizer=optimizer, vocab_ids=torch.as_tensor(vocab_np_ids, device=device),
                   vocab_means=torch.as_tensor(vocab_np_means, dtype=torch.float32, device=device))

    def resume_from(self, checkpoint: dict[str, Any]) -> None:
        """Weights, calibration, optimiser, RNG and state of the last finished epoch."""
        model = self.model
        model.load_state_dict(checkpoint["model"])
        model.calibration_stats = OnlineAffine.from_state_dict(checkpoint["calibration_stats"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        resume.set_rng_state(checkpoint["rng"], self.device)
        self.state = RunState(metrics=checkpoint["metrics"], points=checkpoint["points"], best=checkpoint["best"],
                              epochs_done=checkpoint["epochs_done"], step=checkpoint["step"],
                              reference_ppl=checkpoint["reference_ppl"])
        model.training_info = checkpoint.get("training_info", model.training_info)
        if "a_mix_cv" in model.training_info:  # the mix the interrupted run chose, not the config's
            model.settings = replace(model.settings, a_mix=model.training_info["a_mix_cv"]["a_mix"])
        log.info("resuming %s training after epoch %d of %d", self.variant, self.state.epochs_done, self.cfg.epochs)

    def start(self) -> None:
        """A fresh run: the reference perplexity, then the cost head's standardisation, a_mix and warm-up."""
        model, cfg, variant = self.model, self.cfg, self.variant
        self.state = RunState(reference_ppl=backbone_val_ppl(model, self.data, cfg.batch_size))
        if model.settings.standardise_head or cfg.cost_warmup_epochs:
            states = training_states(model, self.data, cfg.batch_size)
            if model.settings.standardise_head:
                model.set_head_standardisation(*head_input_statistics(states, model.head_in_mean.dtype))
            if cfg.cost_warmup_epochs:
                if cfg.a_mix_choices and len(states) >= 2:
                    model.training_info["a_mix_cv"] = choose_a_mix(model, states, cfg)
                    log.info("%s a_mix by cross-validation: %s", variant, model.training_info["a_mix_cv"])
                model.training_info["cost_warmup"] = warm_up_costs(model, states, cfg)
                log.info("%s cost warm-up: %s", variant, model.training_info["cost_warmup"])
        torch.manual_seed(cfg.seed)  # the reference evaluation must not shift the training RNG

    def factor(self, epoch: int) -> float:
        """The epoch's curriculum factor (budgets = factor x targets; faithful only, else 1)."""
        cfg = self.cfg
        return curriculum_factor(epoch, cfg.epochs, cfg.curriculum_start) if self.variant == "faithful" else 1.0

    def train_epoch(self, epoch: int, factor: float, progress: bool) -> EpochLedger:
        """The epoch's optimiser steps, with calibration refits every `calib_refit_every` steps; the ledger settled."""
        from tqdm.auto import tqdm

        model, cfg, data = self.model, self.cfg, self.data
        ledger = EpochLedger()  # per-step metrics stay on the device until the host needs them
        bar = tqdm(batch_order(len(data.train_ids), cfg.batch_size, epoch, cfg.seed),
                   desc=f"{self.variant} epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="step", leave=False)
        for idx in bar:
            idx = idx.tolist()
            batch = make_batch([data.train_ids[i] for i in idx], [data.train_labels[i] for i in idx],
                               data.train_totals[idx], self.device, data.counted_from)
            budgets = step_budgets(model, batch, data.targets, factor)
            train_step(model, self.optimizer, batch, budgets, cfg, self.vocab_ids, self.vocab_means, self.state.step, ledger)
            self.state.step += 1
            if self.state.step % cfg.calib_refit_every == 0:
                ledger.settle(model, cfg)  # divergence check and calibration points, then the refit
                model.refit_calibration()
                bar.set_postfix(loss=f"{ledger.last_loss():.3f}", lam=f"{float(model.dual_lambda.mean()):.3f}")
        bar.close()
        ledger.settle(model, cfg)
        return ledger

    def close_epoch(self, epoch: int, factor: float, ledger: EpochLedger) -> None:
        """Refit, validate, record the epoch's metrics row and calibration points, save; the best epoch's model too."""
        model, cfg, state = self.model, self.cfg, self.state
        model.refit_calibration()
        summary = ledger.summary()
        val = evaluate(model, self.data, cfg, factor, self.vocab_ids, self.vocab_means)
        row = self.epoch_metrics(epoch, factor, summary, val)
        resume.stop_if_diverged(model, {"train loss": row["train_loss"], "val loss": row["val_loss"]},
                                f"{self.variant} training in epoch {epoch + 1}",
                                f"lower train.lr (now {cfg.lr:g}) or train.lambda_max (now {cfg.lambda_max:g})")
        state.metrics.append(row)
        state.points[str(epoch + 1)] = {"proxy": val["points_proxy"], "csc": val["points_csc"]}
        score = row["balanced_score"]
        log.info("%s epoch %d: loss %.4f val ppl %.2f err %.4f lambda %.4f score %.4f", self.variant, epoch + 1,
                 row["train_loss"], row["val_ppl"], row["err"], row["lambda"], score)
        if score <= state.best["score"]:
            state.best = {"epoch": epoch + 1, "score": score}
            model.save_pretrained(self.work_dir / BEST_DIR)
        state.epochs_done = epoch + 1
        self.save()

    def epoch_metrics(self, epoch: int, factor: float, summary: tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray],
                      val: dict[str, Any]) -> dict[str, Any]:
        """One `metrics.jsonl` row (module doc): training means from the ledger's `summary`, validation `val`."""
        model, cfg, targets = self.model, self.cfg, self.data.targets
        terms, gap_k, achieved_k, target_k = summary  # loss terms, then [K] gap, achieved C_hat and budget
        fit = model.calibration_stats.fit()
        return {
            "epoch": epoch + 1, "step": self.state.step, "variant": self.variant,
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
            "val_level_targets": targets.tolist(),
            "val_level_achieved": val["val_level_achieved"], "val_level_achieved_csc": val["val_level_achieved_csc"],
            "val_level_rel_err": val["val_level_rel_err"],
            "balanced_score": balanced_score(val["val_ppl"], self.state.reference_ppl, val["val_level_rel_err"]),
            "lr": self.optimizer.param_groups[0]["lr"], "cost_lr": self.optimizer.param_groups[2]["lr"],
        }

    def save(self) -> None:
        """The metrics log, the calibration points and the checkpoint of the finished epochs (each atomic)."""
        model, state = self.model, self.state
        write_jsonl(self.work_dir / METRICS, state.metrics)
        atomic_write_json(self.work_dir / CALIBRATION_POINTS, state.points)
        resume.save_checkpoint(self.work_dir / CHECKPOINT, {
            "run_key": self.run_key, "model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "calibration_stats": model.calibration_stats.state_dict(), "rng": resume.rng_state(self.device), "metrics": state.metrics,
            "points": state.points, "best": state.best, "epochs_done": state.epochs_done, "step": state.step,
            "reference_ppl": state.reference_ppl, "training_info": model.training_info,
        })

    def finish(self) -> TrainResult:
        """The last epoch's model and `selection.json` (the best-balanced epoch and every epoch's score)."""
        state, data, work_dir = self.state, self.data, self.work_dir
        self.model.save_pretrained(work_dir / LAST_DIR)
        atomic_write_json(work_dir / SELECTION, {
            "rule": "min ln(val_ppl / backbone_val_ppl) + mean_j |achieved_j - B_j| / B_j; ties -> later epoch",
            "best_epoch": state.best["epoch"], "best_score": state.best["score"], "reference_ppl": state.reference_ppl,
            "scores": {str(r["epoch"]): r["balanced_score"] for r in state.metrics}, "targets": data.targets.tolist(),
            "budget_range": list(data.budget_range), "steps_per_epoch": math.ceil(len(data.train_ids) / self.cfg.batch_size),
        })
        return TrainResult(variant=self.variant, folder=work_dir, metrics=state.metrics, best_epoch=state.best["epoch"],
                           best_dir=work_dir / BEST_DIR, last_dir=work_dir / LAST_DIR, reference_ppl=state.reference_ppl,
                           targets=data.targets.tolist())


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
    if variant not in VARIANTS:
        raise ConfigError(f"train.variant={variant!r} is invalid: choose one of {', '.join(VARIANTS)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    run_key = run_fingerprint(backbone_path, data, cfg, variant, prior_cost)
    ckpt_path = work_dir / CHECKPOINT
    checkpoint = resume.load_checkpoint(ckpt_path)
    if checkpoint is not None and checkpoint.get("run_key") != run_key:
        raise DataError(f"checkpoint {ckpt_path} was made from another config or data: delete it (or its run "
                        f"folder) to train from scratch, or rerun with the config that made it")
    model = build_model(backbone_path, data, cfg, variant, prior_cost, device)
    run = TrainingRun.create(model, data, cfg, variant, work_dir, run_key, device)
    if checkpoint is not None:
        run.resume_from(checkpoint)
    else:
        run.start()
    model.train()
    epochs_this_call = 0
    for epoch in range(run.state.epochs_done, cfg.epochs):
        factor = run.factor(epoch)
        epoch_t0 = time.perf_counter()  # timings go to the log only: metrics must be identical on resume
        ledger = run.train_epoch(epoch, factor, progress)
        train_s = time.perf_counter() - epoch_t0
        run.close_epoch(epoch, factor, ledger)
        epochs_this_call += 1
        log.info("%s epoch %d: %.1f s training, %.1f s evaluating and saving", variant, epoch + 1, train_s,
                 time.perf_counter() - epoch_t0 - train_s)
        resume.interrupt_if(stop_after_epochs, epochs_this_call, epoch + 1 >= cfg.epochs, "epochs")
    return run.finish()
