"""What resumable training loops share: the RNG state in a checkpoint, bf16 autocast on CUDA, and the
simulated interruption tests use to check that a resumed run reproduces an uninterrupted one.

Used by `metabolic.train.pretrain` (backbone) and `metabolic.train.loop` (MetabolicGPT-2).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from pathlib import Path
from typing import Any

import torch

from metabolic.core.errors import DivergedError

log = logging.getLogger(__name__)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none or it cannot be read.

    An unreadable checkpoint (damaged on disk: every write here is atomic) is deleted with one
    warning, and the run starts again from the beginning rather than trusting or crashing on it.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any damage (truncation, flipped bytes) means "not usable"
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EIO):
            raise  # the disk or its permissions failed, not the file: keep it
        path.unlink(missing_ok=True)
        log.warning("checkpoint %s is unreadable (%s): deleted it, starting again from the beginning", path,
                    type(exc).__name__)
        return None


def stop_if_diverged(model: torch.nn.Module, losses: dict[str, float], where: str, fix: str) -> None:
    """Raise DivergedError when a loss or a weight of `model` is non-finite (NaN weights must never be saved)."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if not bad and all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return
    what = ", ".join(f"{k} {v}" for k, v in bad.items()) or "non-finite weights"
    raise DivergedError(f"{where} diverged ({what}): {fix}; nothing of this run was kept")


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
