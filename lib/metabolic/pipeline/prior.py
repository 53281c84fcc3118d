"""Stage `prior`: the synthetic energy prior (eq. 8) from token counts over the whole training split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metabolic.core.config import StudyConfig
from metabolic.data.prior import Prior, build_prior, decoded_tokens, token_counts
from metabolic.pipeline.corpus import CorpusData, corpus
from metabolic.pipeline.stage import realise


@dataclass(frozen=True)
class PriorData:
    prior: Prior
    folder: Path
    fingerprint: str


class PriorStage:
    folder = "prior"
    required = ("prior.npz",)

    def __init__(self, cfg: StudyConfig, data: CorpusData) -> None:
        self.cfg, self.data = cfg, data
        self.vocab_size = len(data.tokenizer)
        self.tokens = decoded_tokens(data.tokenizer, self.vocab_size)
        self._description = {"stage": "prior", "prior": cfg.prior.__dict__, "corpus_fingerprint": data.fingerprint}

    def description(self) -> dict[str, Any]:
        return self._description

    def build(self, work: Path) -> dict[str, Any]:
        prior = build_prior(token_counts(self.data.train_ids, self.vocab_size), self.tokens, self.cfg.prior)
        with open(work / "prior.npz", "wb") as fh:
            np.savez(fh, cost=prior.cost, counts=prior.counts, lengths=prior.lengths, heading=prior.heading)
        return {"vocab_size": self.vocab_size, "mean": float(prior.cost.mean()), "min": float(prior.cost.min())}

    def load(self, folder: Path, key: str) -> PriorData:
        arrays = np.load(folder / "prior.npz")
        prior = Prior(cost=arrays["cost"], counts=arrays["counts"], lengths=arrays["lengths"], heading=arrays["heading"],
                      tokens=self.tokens)
        return PriorData(prior=prior, folder=folder, fingerprint=key)


def energy_prior(cfg: StudyConfig) -> PriorData:
    """Stage `prior`: the synthetic energy prior from token counts over the whole training split."""
    return realise(PriorStage(cfg, corpus(cfg)), cfg)
