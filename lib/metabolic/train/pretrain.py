"""From-scratch pretraining of the GPT-2 backbone for the offline profiles (stage `pretrain`).

Pretraining packs texts into blocks, trains with AdamW under a warm-up + cosine schedule, logs
validation perplexity to `metrics.jsonl`, and writes a resumable checkpoint every `checkpoint_every`
steps: an interrupted run resumes with identical results.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metabolic.core import resume
from metabolic.core.artefacts import write_jsonl
from metabolic.core.config import BackboneConfig
from metabolic.model.backbone import decay_split, default_device

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr_ratio: float) -> float:
    """Linear warm-up to `peak_lr`, then cosine decay to `peak_lr * min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_order(n_blocks: int, batch_size: int, epoch: int, seed: int) -> list[torch.Tensor]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), so a resumed run sees the same data."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_blocks, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n_blocks, batch_size)]


@torch.inference_mode()
def evaluate_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` on `blocks` [n, block_size]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        x = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


@dataclass(frozen=True)
class PretrainResult:
    steps: int
    final_val_loss: float
    final_val_ppl: float
    metrics: list[dict[str, Any]]


@dataclass
class PretrainState:
    """What a pretraining checkpoint carries besides the weights, optimiser and RNG."""

    step: int = 0  # optimiser steps taken
    running: float = 0.0  # sum of the training losses since the last evaluation (nats/token)
    running_n: int = 0  # steps in `running`
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation


def backbone_optimizer(model, cfg: BackboneConfig) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95): matrices decay, biases and LayerNorm weights do not (`decay_split`)."""
    decay, no_decay = decay_split(model.named_parameters())
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def resume_state(model, optimizer, ckpt_path: Path, device, total_steps: int) -> PretrainState:
    """The state of `ckpt_path` with the weights, optimiser and RNG restored from it; a fresh state if there is none."""
    checkpoint = resume.load_checkpoint(ckpt_path)
    if checkpoint is None:
        return PretrainState()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    resume.set_rng_state(checkpoint["rng"], device)
    state = PretrainState(step=checkpoint["step"], running=checkpoint["running"], running_n=checkpoint["running_n"],
                          metrics=checkpoint["metrics"])
    log.info("resuming pretraining at step %d of %d", state.step, total_steps)
    return state


def lm_step(model, optimizer, batch: torch.Tensor, grad_clip: float, device) -> float:
    """One optimiser step of LM loss on `batch` [b, block_size]; returns the loss (nats/token)."""
    with resume.autocast(device):
        # an explicit all-ones mask: the blocks hold <|endoftext|> separators, which GPT-2 also uses as padding
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def record_evaluation(model, optimizer, state: PretrainState, eval_blocks: torch.Tensor, cfg: BackboneConfig, epoch: int,
                      block_size: int, work_dir: Path) -> None:
    """Validation loss, one `metrics.jsonl` row (with the mean training loss since the last row) and the log line."""
    val_loss = evaluate_loss(model, eval_blocks, cfg.batch_size)
    state.metrics.append(
        {
            "step": state.step,
            "epoch": epoch,
            "train_loss": state.running / state.running_n,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "lr": optimizer.param_groups[0]["lr"],
            "tokens_seen": state.step * cfg.batch_size * block_size,
        }
    )
    state.running, state.running_n = 0.0, 0
    write_jsonl(work_dir / METRICS, state.metrics)
    log.info("step %d: val loss %.4f, ppl %.1f", state.step, val_loss, state.metrics[-1]["val_ppl"])


def save_state(model, optimizer, state: PretrainState, ckpt_path: Path, device) -> None:
    """The checkpoint after `state.step` steps (atomic): weights, optimiser, RNG and `state`."""
    resume.save_checkpoint(
        ckpt_path,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": resume.rng_state(device),
            "step": state.step,
            "running": state.running,
            "running_n": state.running_n,
            "metrics": state.metrics,
        },
    )


def pretrain(
    model,
    train_blocks: torch.Tensor,
    valid_blocks: torch.Tensor,
    cfg: BackboneConfig,
    work_dir: Path,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> PretrainResult:
    """Train `model` on packed blocks with LM loss; resume from `work_dir/checkpoint.pt` if present.

    `stop_after_steps` ends the run early (as an interruption would) after that many optimiser steps
    in this call; tests use it to check that resuming reproduces an uninterrupted run exactly.
    """
    from tqdm.auto import tqdm

    device = default_device()
    model.to(device).train()
    steps_per_epoch = math.ceil(train_blocks.shape[0] / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = backbone_optimizer(model, cfg)
    eval_blocks = valid_blocks[: cfg.max_eval_blocks]
    torch.manual_seed(cfg.seed)
    ckpt_path = work_dir / CHECKPOINT
    state = resume_state(model, optimizer, ckpt_path, device, total_steps)
    diverged_fix = f"lower backbone.lr (now {cfg.lr:g}) or raise backbone.warmup_steps"
    start_time = time.perf_counter()
    steps_this_call = 0
    bar = tqdm(total=total_steps, initial=state.step, desc="pretrain", disable=not progress, unit="step")
    while state.step < total_steps:
        epoch, index = divmod(state.step, steps_per_epoch)
        batch = train_blocks[batch_order(train_blocks.shape[0], cfg.batch_size, epoch, cfg.seed)[index]].to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        loss_value = lm_step(model, optimizer, batch, cfg.grad_clip, device)
        state.step += 1
        steps_this_call += 1
        if not math.isfinite(loss_value):
            resume.stop_if_diverged(model, {"loss": loss_value}, f"pretraining at step {state.step}", diverged_fix)
        state.running += loss_value
        state.running_n += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if state.step % cfg.eval_every == 0 or state.step == total_steps:
            record_evaluation(model, optimizer, state, eval_blocks, cfg, epoch, train_blocks.shape[1], work_dir)
        if state.step % cfg.checkpoint_every == 0 or state.step == total_steps:
            resume.stop_if_diverged(model, {}, f"pretraining at step {state.step}", diverged_fix)
            save_state(model, optimizer, state, ckpt_path, device)
        if state.step < total_steps and stop_after_steps is not None and steps_this_call >= stop_after_steps:
            bar.close()
            resume.interrupt_if(stop_after_steps, steps_this_call, False, "steps")
    bar.close()
    log.info("pretraining took %.1f s", time.perf_counter() - start_time)
    model.eval()
    final = state.metrics[-1]
    return PretrainResult(steps=state.step, final_val_loss=final["val_loss"], final_val_ppl=final["val_ppl"],
                          metrics=state.metrics)
