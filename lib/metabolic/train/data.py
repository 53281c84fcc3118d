"""Training data: CSC-labelled sequences on one scale, the K target budgets, and padded batches.

What a budget counts (`TrainingData.counted_from`, `train.budget_span`) is described in
`metabolic.train.loop`'s module doc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from metabolic.core import artefacts
from metabolic.core.config import TrainConfig
from metabolic.core.errors import ConfigError, DataError
from metabolic.csc.dataset import scale_labels, sequence_totals


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


def check_token_ids(ids: Sequence[Sequence[int]], vocab_size: int, split: str) -> None:
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
    check_token_ids(csc_data.train_ids, vocab_size, "train")
    check_token_ids(csc_data.valid_ids, vocab_size, "valid")
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
