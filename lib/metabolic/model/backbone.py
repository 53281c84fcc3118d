"""The GPT-2 backbone: one loading path (`from_pretrained`) and a from-scratch architecture for offline profiles.

A from-scratch backbone (trained by `metabolic.train.pretrain`) is saved with `save_pretrained` (model
and tokenizer in one folder), so every later stage loads it exactly like the Hub's `gpt2`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metabolic.core.config import BackboneConfig
from metabolic.core.errors import AssetError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backbone(name_or_path: str | Path, device: str | torch.device | None = None):
    """`GPT2LMHeadModel.from_pretrained` on a Hub id or a folder, in fp32, in eval mode."""
    from transformers import GPT2LMHeadModel

    try:
        model = GPT2LMHeadModel.from_pretrained(str(name_or_path), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AssetError(
            f"cannot load backbone {str(name_or_path)!r} ({first[:200]}). Fix: run the pretrain stage "
            f"(python -m metabolic run --stages pretrain) or set backbone.source to a Hub id or model folder"
        ) from None
    return model.to(device or default_device()).eval()


def scratch_model(cfg: BackboneConfig, vocab_size: int, n_positions: int, eos_id: int):
    """A randomly initialised GPT-2 architecture, seeded by `cfg.seed`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


def decay_split(named_parameters) -> tuple[list, list]:
    """(decayed, not decayed) parameters: matrices decay; biases and LayerNorm weights (ndim < 2) do not."""
    decay, no_decay = [], []
    for _, p in named_parameters:
        (no_decay if p.ndim < 2 else decay).append(p)
    return decay, no_decay
