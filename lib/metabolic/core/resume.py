"""What resumable training loops share: the RNG state in a checkpoint, bf16 autocast on CUDA, and the
simulated interruption tests use to check that a resumed run reproduces an uninterrupted one.

Used by `metabolic.train.pretrain` (backbone) and `metabolic.train.loop` (MetabolicGPT-2).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from metabolic.core.artefacts import hash_path, read_hashed, shown, write_hashed
from metabolic.core.errors import DivergedError

log = logging.getLogger(__name__)


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` with its SHA-256 beside it (`artefacts.write_hashed`), keeping the checkpoint it
    replaces as `<stem>.prev<suffix>`: a damaged newest checkpoint falls back to the one before, not to the beginning."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if path.exists():
        os.replace(path, _previous(path))
        if hash_path(path).exists():
            os.replace(hash_path(path), hash_path(_previous(path)))
    write_hashed(path, buffer.getvalue())


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint at `path`, the one before it and their hashes (a finished run supersedes them)."""
    for p in (Path(path), _previous(Path(path))):
        p.unlink(missing_ok=True)
        hash_path(p).unlink(missing_ok=True)


def _verified(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path` when its bytes match its recorded SHA-256 and load; else None, after deleting it."""
    try:
        data, why = read_hashed(path)
        if data is not None:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any damage (truncation, flipped bytes) means "not usable"
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EIO):
            raise  # the disk or its permissions failed, not the file: keep it
        why = f"it cannot be read ({type(exc).__name__})"
    path.unlink(missing_ok=True)
    hash_path(path).unlink(missing_ok=True)
    log.warning("checkpoint %s is damaged (%s): discarded, never loaded", shown(path), why)
    return None


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The newest checkpoint at `path` whose bytes match their SHA-256 (`save_checkpoint`), else the one
    before it, else None (start from the beginning).

    A damaged checkpoint (flipped bytes, a truncation, a missing hash) is deleted with one warning and
    never loaded: the run resumes from the last good state instead of trusting it.
    """
    path = Path(path)
    for candidate in (path, _previous(path)):
        if candidate.exists():
            state = _verified(candidate)
            if state is not None:
                if candidate != path:
                    log.warning("resuming from the checkpoint before it (%s)", shown(candidate))
                return state
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
