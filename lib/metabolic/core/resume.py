"""What resumable training loops share: the RNG state in a checkpoint, bf16 autocast on CUDA, and the
simulated interruption tests use to check that a resumed run reproduces an uninterrupted one.

Used by `metabolic.train.pretrain` (backbone) and `metabolic.train.loop` (MetabolicGPT-2).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def rng_state(device: torch.device) -> dict[str, Any]:
    """The CPU (and on CUDA the device) generator state, for a checkpoint."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` saved (the CUDA part only on CUDA)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])


def autocast(device: torch.device):
    """bf16 autocast on CUDA (losses are computed in fp32 from its outputs); nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def interrupt_if(limit: int | None, done_this_call: int, finished: bool, unit: str) -> None:
    """Raise KeyboardInterrupt (as a real interruption would) after `limit` units of work in this call,
    unless the run is finished; `limit=None` never interrupts."""
    if limit is not None and done_this_call >= limit and not finished:
        raise KeyboardInterrupt(f"stopped after {done_this_call} {unit} (simulated interruption)")
