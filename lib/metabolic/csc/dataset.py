"""Stage `csc`: the cached, resumable CSC-labelled dataset, its statistics and the budget scale.

What counts (used by every stage that sums CSC):
- for a corpus text, every token of the text counts; its CSC is computed on the text itself;
- for a generation, the generated tokens count, and their CSC is computed on the full
  prompt + generation text (`CSCLabeller.label_generated(prompts, generations)` labels the generated
  positions of `prompt_ids + generated_ids`; total them with `sequence_totals(labels, scale,
  lengths=[len(prompt) + len(generated), ...])`).

Totals of a sequence (`sequence_totals`):
- `scale="raw"`: the sum of the per-token CSC of the tokens that count. A partially labelled
  sequence (positions="subset": NaN = not labelled) is extrapolated as mean(labelled) x n_counted,
  the unbiased estimate of the full sum under the seeded uniform subset; a sequence with no label
  has total NaN and is left out of the statistics.
- `scale="length"`: raw total x T, T = length of the text the labels were computed on (the scale
  and why it exists: `metabolic.core.budget`).

The artefact `data/<profile>/csc/` holds `csc.npz` (ids and labels of both splits, ragged arrays as
flat + offsets). It is built chunk by chunk into `csc.partial/chunks/` (each chunk written
atomically), so an interrupted run resumes at the first missing chunk and gives the same labels.
Under torchrun the ranks share the chunks (`label_shard`: chunk k on rank k % world, all writing into
the one partial) and rank 0 alone merges and commits (the rank protocol: `metabolic.csc.sharding`);
labels are byte-identical to one process's.
Its fingerprint covers the encoder (name and weights hash), the tokenizer, the corpus and its
selection, the position policy, the precision and device type, and the library version.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from metabolic.core import artefacts
from metabolic.core.artefacts import pack_ragged, unpack_ragged
from metabolic.core.budget import check_scale, length_factor, level_names
from metabolic.core.config import CSCConfig
from metabolic.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DATA_FILE = "csc.npz"
STAT_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


@dataclass(frozen=True)
class CSCData:
    """Labelled sequences of both splits, statistics of total CSC on `stats["scale"]`, provenance."""

    train_ids: list[list[int]]
    train_csc: list[np.ndarray]  # float32, same length as the ids, NaN = not labelled
    valid_ids: list[list[int]]
    valid_csc: list[np.ndarray]
    stats: dict
    fingerprint: str
    folder: Path


# --- totals and statistics -----------------------------------------------------------------


def sequence_totals(csc_list: Sequence[np.ndarray], scale: str = "raw", lengths: Sequence[int] | None = None) -> np.ndarray:
    """Total CSC per sequence on `scale` (see the module docstring); NaN when nothing is labelled.

    `lengths[i]` is T for the length scale (default: `len(csc_list[i])`), e.g. prompt + generation.
    """
    check_scale(scale)
    if lengths is not None and len(lengths) != len(csc_list):
        raise DataError(f"lengths has {len(lengths)} entries for {len(csc_list)} sequences: give one per sequence")
    totals = np.full(len(csc_list), np.nan, dtype=np.float64)
    for i, c in enumerate(csc_list):
        c = np.asarray(c, dtype=np.float64)
        labelled = np.isfinite(c)
        n = int(labelled.sum())
        if n == 0:
            continue
        totals[i] = c[labelled].mean() * c.size  # = the plain sum when every token is labelled
        totals[i] *= length_factor(scale, c.size if lengths is None else lengths[i])
    return totals


def scale_labels(csc_list: Sequence[np.ndarray], scale: str = "raw") -> list[np.ndarray]:
    """Per-token labels on `scale`: raw CSC_t, or T x CSC_t (their sum is `sequence_totals`)."""
    check_scale(scale)
    return [np.asarray(c, np.float32) * length_factor(scale, c.size) for c in csc_list]


def csc_stats(csc_list: Sequence[np.ndarray], scale: str, budget_quantiles: Sequence[float]) -> dict[str, Any]:
    """Mean, variance, quantiles of total CSC per sequence, budget targets (paper V.B), per-token moments."""
    totals = sequence_totals(csc_list, scale)
    totals = totals[np.isfinite(totals)]
    if totals.size == 0:
        raise DataError("no sequence has a CSC label: raise csc.max_sequences or check the encoder window")
    tokens = np.concatenate([np.asarray(c, np.float64) for c in csc_list]) if csc_list else np.zeros(0)
    tokens = tokens[np.isfinite(tokens)]
    qs = sorted(set(STAT_QUANTILES) | set(float(q) for q in budget_quantiles))
    quantiles = {q: float(np.quantile(totals, q)) for q in qs}
    budgets = {name: quantiles[float(q)] for name, q in zip(level_names(len(budget_quantiles)), budget_quantiles)}
    return {
        "scale": scale,
        "n_sequences": int(totals.size),
        "mean": float(totals.mean()),
        "var": float(totals.var(ddof=1)) if totals.size > 1 else 0.0,
        "std": float(totals.std(ddof=1)) if totals.size > 1 else 0.0,
        "median": float(np.median(totals)),
        "min": float(totals.min()),
        "max": float(totals.max()),
        "quantiles": quantiles,
        "budgets": budgets,
        "budget_quantiles": [float(q) for q in budget_quantiles],
        "token_mean": float(tokens.mean()),
        "token_std": float(tokens.std(ddof=1)) if tokens.size > 1 else 0.0,
        "n_labels": int(tokens.size),
    }


# --- what gets labelled ---------------------------------------------------------------------


def label_positions(lengths: Sequence[int], policy: str, per_sequence: int, seed: int, split: int) -> list[np.ndarray | None]:
    """None (all positions) per sequence, or a seeded sorted subset of `per_sequence` positions."""
    if policy == "all":
        return [None] * len(lengths)
    out: list[np.ndarray | None] = []
    for i, n in enumerate(lengths):
        rng = np.random.default_rng([seed, split, i])  # per-sequence stream: independent of chunking
        out.append(np.sort(rng.choice(n, size=min(per_sequence, n), replace=False)))
    return out


def encoder_weights_sha256(encoder) -> str:
    """A hash of the encoder's parameters and buffers (independent of where they were loaded from)."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


# --- the artefact ----------------------------------------------------------------------------


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_chunk(path: Path, expected: list[int]) -> list[np.ndarray] | None:
    """A finished chunk's labels, or None when missing, without its recorded SHA-256 or not matching it
    (`artefacts.write_hashed`): a damaged chunk is relabelled, never loaded."""
    if not path.exists():
        return None
    try:
        data, why = artefacts.read_hashed(path)
        if data is None:
            log.warning("chunk %s: %s: relabelling it", path.name, why)
            return None
        with np.load(io.BytesIO(data)) as z:
            labels = unpack_ragged(z["csc"], z["offsets"])
    except Exception as exc:  # noqa: BLE001 - a damaged chunk is relabelled, not trusted
        log.warning("chunk %s is unreadable (%s): relabelling it", path.name, exc)
        return None
    if [len(x) for x in labels] != expected:
        log.warning("chunk %s does not match its sequences: relabelling it", path.name)
        return None
    return labels


def _chunk_layout(name: str, split: int, sequences: list[list[int]], csc: CSCConfig, work: Path):
    """Positions to label, the chunks' sequence indices and their files `work/chunks/<name>-<k>.npz`."""
    chunks_dir = work / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    positions = label_positions([len(s) for s in sequences], csc.positions, csc.positions_per_sequence, csc.seed, split)
    size = csc.chunk_sequences  # fingerprinted: chunk boundaries must not move on resume
    groups = [list(range(start, min(start + size, len(sequences)))) for start in range(0, len(sequences), size)]
    paths = [chunks_dir / f"{name}-{k:05d}.npz" for k in range(len(groups))]
    return positions, groups, paths


def _label_chunks(labeller, name: str, split: int, sequences: list[list[int]], csc: CSCConfig, work: Path,
                  shard: tuple[int, int], progress: bool) -> tuple[dict[int, list[np.ndarray] | None], list[int]]:
    """Label the missing chunks `k` with `k % world == rank`, saving each as it finishes; return every
    chunk's labels (None: missing, another rank's) and the chunks labelled here. Each chunk is planned
    and batched on its own, so its labels do not depend on which others are labelled with it."""
    rank, world = shard
    positions, groups, paths = _chunk_layout(name, split, sequences, csc, work)
    done = {k: _load_chunk(paths[k], [len(sequences[i]) for i in g]) for k, g in enumerate(groups)}
    missing = [k for k in range(len(groups)) if done[k] is None]
    if len(missing) < len(groups):
        log.info("CSC %s: resuming, %d of %d chunks already labelled", name, len(groups) - len(missing), len(groups))
    todo = [k for k in missing if k % world == rank]  # static by chunk index: no two ranks label one chunk
    for j, labels in labeller.label_groups(sequences, positions, [groups[k] for k in todo], progress=progress):
        k = todo[j]
        flat, offsets = pack_ragged(labels, np.float32)
        artefacts.write_hashed(paths[k], _npz_bytes(csc=flat, offsets=offsets))
        done[k] = labels
    return done, todo


def label_split(labeller, name: str, split: int, sequences: list[list[int]], csc: CSCConfig, work: Path,
                progress: bool = True) -> list[np.ndarray]:
    """Label one split in chunks of `csc.chunk_sequences`, each saved as it finishes; chunks already in
    `work/chunks/` are reused (resume: also those other ranks wrote, read where they are). One labeller
    call covers all missing chunks, so decoding the next chunk overlaps the encoder."""
    done, _ = _label_chunks(labeller, name, split, sequences, csc, work, (0, 1), progress)
    return [lab for k in range(len(done)) for lab in done[k]]


def label_shard(labeller, name: str, split: int, sequences: list[list[int]], csc: CSCConfig, work: Path,
                shard: tuple[int, int], progress: bool = True) -> list[int]:
    """Label rank's share of one split's missing chunks into `work/chunks/` (`shard` = (rank, world size));
    return the chunk indices labelled. `label_split` afterwards merges every rank's chunks."""
    rank, world = shard
    if not (world >= 1 and 0 <= rank < world):
        raise ConfigError(f"shard={shard!r} is invalid: give (rank, world size) with 0 <= rank < world size")
    labelled = _label_chunks(labeller, name, split, sequences, csc, work, (rank, world), progress)[1]
    log.info("CSC %s: rank %d of %d labelled chunks %s", name, rank, world, labelled)
    return labelled


def save_data(path: Path, train: Sequence[Sequence[int]], train_csc: Sequence[np.ndarray],
              valid: Sequence[Sequence[int]], valid_csc: Sequence[np.ndarray]) -> None:
    """`csc.npz`: ids and labels of both splits (ragged arrays as flat + offsets)."""
    arrays = {}
    for name, ids, labels in (("train", train, train_csc), ("valid", valid, valid_csc)):
        arrays[f"{name}_ids"], arrays[f"{name}_offsets"] = pack_ragged(ids, np.int32)
        arrays[f"{name}_csc"], _ = pack_ragged(labels, np.float32)
    artefacts.atomic_write_bytes(path, _npz_bytes(**arrays))


def load_data(folder: Path, train: list[list[int]], valid: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Labels from `csc.npz`, checked against the sequences they must belong to (else DataError)."""
    try:
        with np.load(folder / DATA_FILE) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{folder / DATA_FILE} is unreadable ({type(exc).__name__})") from exc
    out = []
    for name, ids in (("train", train), ("valid", valid)):
        try:
            stored = unpack_ragged(arrays[f"{name}_ids"], arrays[f"{name}_offsets"])
            labels = unpack_ragged(arrays[f"{name}_csc"], arrays[f"{name}_offsets"])
        except KeyError as exc:
            raise DataError(f"{folder / DATA_FILE} lacks {exc}") from exc
        if len(stored) != len(ids) or any(len(a) != len(b) or a.tolist() != b for a, b in zip(stored, ids)):
            raise DataError(f"{folder / DATA_FILE} holds other {name} sequences than the config selects")
        out.append([np.asarray(x, np.float32) for x in labels])
    return out[0], out[1]
