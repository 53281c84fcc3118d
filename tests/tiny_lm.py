"""A tiny randomly initialised GPT-2 on the real GPT-2 tokenizer, and a cost vector, for generation tests."""

from __future__ import annotations

import torch


def tiny_gpt2(tokenizer, n_positions: int = 48, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return GPT2LMHeadModel(config).eval()


def token_costs(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Costs in [0.02, 0.32): a fixed, seeded C_vocab."""
    gen = torch.Generator().manual_seed(seed)
    return 0.02 + 0.3 * torch.rand(vocab_size, generator=gen)
