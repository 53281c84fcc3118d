"""The study's stages as library functions: each builds (or reuses) one artefact under `data/<profile>/`.

Notebooks and `python -m metabolic run` call the same functions. A stage asks for its inputs by
calling the stages it depends on, so any notebook can run alone; an artefact made from the same
inputs (same fingerprint) is reused, a stale or corrupt one is rebuilt.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from metabolic.core import artefacts
from metabolic.core.assets import load_tokenizer
from metabolic.core.config import StudyConfig
from metabolic.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusData:
    """Tokenized WikiText-2: full splits (id lists), the tokenizer and the artefact's fingerprint."""

    train_ids: list[list[int]]
    valid_ids: list[list[int]]
    tokenizer: Any
    source: str
    location: str
    fingerprint: str
    folder: Path


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    return load_tokenizer(spec)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser)."""
    return artefacts.sha256_bytes(tokenizer.backend_tokenizer.to_str().encode("utf-8"))


def corpus(cfg: StudyConfig) -> CorpusData:
    """Stage `corpus`: WikiText-2 train/validation texts tokenized with GPT-2 (cached per source+tokenizer)."""
    from metabolic.data.corpus import load_corpus, pack_ids, tokenize, unpack_ids

    texts = load_corpus(cfg.assets)
    tok = _tokenizer(cfg.assets.tokenizer)
    description = {
        "stage": "corpus",
        "train_sha256": artefacts.sha256_bytes("\n".join(texts.train).encode("utf-8")),
        "valid_sha256": artefacts.sha256_bytes("\n".join(texts.validation).encode("utf-8")),
        "tokenizer": tokenizer_fingerprint(tok.value),
    }
    folder = artefacts.run_dir(cfg.profile) / "corpus"

    def build(work: Path) -> dict[str, Any]:
        train_flat, train_off = pack_ids(tokenize(tok.value, texts.train))
        valid_flat, valid_off = pack_ids(tokenize(tok.value, texts.validation))
        artefacts.atomic_torch_save(
            work / "tokens.pt",
            {"train_ids": train_flat, "train_offsets": train_off, "valid_ids": valid_flat, "valid_offsets": valid_off},
        )
        return {
            "n_train_texts": len(texts.train),
            "n_valid_texts": len(texts.validation),
            "n_train_tokens": int(train_flat.numel()),
            "n_valid_tokens": int(valid_flat.numel()),
            "source": texts.source,
        }

    artefacts.build_artefact(folder, description, build, cfg.to_json(), required=("tokens.pt",))
    data = torch.load(folder / "tokens.pt", weights_only=True)
    return CorpusData(
        train_ids=unpack_ids(data["train_ids"], data["train_offsets"]),
        valid_ids=unpack_ids(data["valid_ids"], data["valid_offsets"]),
        tokenizer=tok.value,
        source=texts.source,
        location=texts.location,
        fingerprint=artefacts.fingerprint(description),
        folder=folder,
    )


def train_sequences(cfg: StudyConfig, data: CorpusData) -> list[list[int]]:
    """The profile's training texts: seeded subsample, capped at `corpus.seq_len` tokens."""
    from metabolic.data.corpus import select_sequences

    c = cfg.corpus
    return select_sequences(data.train_ids, c.max_train_texts, c.seq_len, c.min_tokens, c.seed)


def valid_sequences(cfg: StudyConfig, data: CorpusData) -> list[list[int]]:
    from metabolic.data.corpus import select_sequences

    c = cfg.corpus
    return select_sequences(data.valid_ids, c.max_valid_texts, c.seq_len, c.min_tokens, c.seed + 1)


@dataclass(frozen=True)
class BackboneData:
    """Where the backbone loads from (`from_pretrained(path)`) and its pretraining log, if any."""

    path: str
    pretrained_here: bool
    metrics: list[dict[str, Any]]
    fingerprint: str


def pretrain_backbone(cfg: StudyConfig, progress: bool = True) -> BackboneData:
    """Stage `pretrain`: a Hub/folder backbone as configured, or a GPT-2 trained from scratch on the corpus."""
    from metabolic.model.backbone import METRICS, pretrain, read_metrics, scratch_model
    from metabolic.data.corpus import pack_blocks

    b = cfg.backbone
    if b.source != "pretrain":
        return BackboneData(path=b.source, pretrained_here=False, metrics=[], fingerprint=artefacts.fingerprint({"source": b.source}))
    data = corpus(cfg)
    description = {
        "stage": "pretrain",
        "backbone": cfg.backbone.__dict__,
        "corpus": cfg.corpus.__dict__,
        "corpus_fingerprint": data.fingerprint,
    }
    folder = artefacts.run_dir(cfg.profile) / "backbone"

    def build(work: Path) -> dict[str, Any]:
        eos = data.tokenizer.eos_token_id
        train_blocks = pack_blocks(train_sequences(cfg, data), b.block_size, eos)
        valid_blocks = pack_blocks(valid_sequences(cfg, data), b.block_size, eos)
        model = scratch_model(b, vocab_size=len(data.tokenizer), n_positions=max(b.block_size, cfg.corpus.seq_len), eos_id=eos)
        t0 = time.perf_counter()
        result = pretrain(model, train_blocks, valid_blocks, b, work, progress=progress)
        model.save_pretrained(work)
        data.tokenizer.save_pretrained(work)
        (work / "checkpoint.pt").unlink(missing_ok=True)  # the saved model supersedes it
        return {
            "steps": result.steps,
            "final_val_ppl": result.final_val_ppl,
            "train_blocks": int(train_blocks.shape[0]),
            "wall_s": time.perf_counter() - t0,
        }

    artefacts.build_artefact(folder, description, build, cfg.to_json(), required=("model.safetensors", METRICS))
    return BackboneData(
        path=str(folder), pretrained_here=True, metrics=read_metrics(folder / METRICS),
        fingerprint=artefacts.fingerprint({**description, "library_version": artefacts.__version__}),
    )


@dataclass(frozen=True)
class PriorData:
    prior: Any  # metabolic.data.prior.Prior
    folder: Path
    fingerprint: str


def energy_prior(cfg: StudyConfig) -> PriorData:
    """Stage `prior`: the synthetic energy prior from token counts over the whole training split."""
    from metabolic.data.prior import Prior, build_prior, decoded_tokens, token_counts

    data = corpus(cfg)
    description = {"stage": "prior", "prior": cfg.prior.__dict__, "corpus_fingerprint": data.fingerprint}
    folder = artefacts.run_dir(cfg.profile) / "prior"
    vocab_size = len(data.tokenizer)
    tokens = decoded_tokens(data.tokenizer, vocab_size)

    def build(work: Path) -> dict[str, Any]:
        prior = build_prior(token_counts(data.train_ids, vocab_size), tokens, cfg.prior)
        buffer = work / "prior.npz"
        with open(buffer, "wb") as fh:
            np.savez(fh, cost=prior.cost, counts=prior.counts, lengths=prior.lengths, heading=prior.heading)
        return {"vocab_size": vocab_size, "mean": float(prior.cost.mean()), "min": float(prior.cost.min())}

    artefacts.build_artefact(folder, description, build, cfg.to_json(), required=("prior.npz",))
    arrays = np.load(folder / "prior.npz")
    prior = Prior(cost=arrays["cost"], counts=arrays["counts"], lengths=arrays["lengths"], heading=arrays["heading"], tokens=tokens)
    return PriorData(prior=prior, folder=folder, fingerprint=artefacts.fingerprint(description))


def csc_labels(cfg: StudyConfig, progress: bool = True) -> Any:
    """Stage `csc`: exact CSC labels of the profile's sequences (`metabolic.csc.dataset.CSCData`)."""
    from metabolic.csc.dataset import csc_labels as build_csc_labels  # imported here: it imports this module

    return build_csc_labels(cfg, progress=progress)


def measure_etokens(cfg: StudyConfig, progress: bool = True):
    """Stage `etokens`: energy per query by phase, e-tokens, calibration (see metabolic.energy.measurement)."""
    from metabolic.energy.measurement import measure_etokens as run_etokens

    return run_etokens(cfg, progress=progress)


def train_variants(cfg: StudyConfig, progress: bool = True):
    """Stage `train`: MetabolicGPT-2, both variants (see `metabolic.train.loop.train_variants`)."""
    from metabolic.train.loop import train_variants as run_training  # imported here: it imports this module

    return run_training(cfg, progress=progress)


def evaluate_budgets(cfg: StudyConfig, progress: bool = True):
    """Stage `evaluate`: budgeted generation, Table I per variant and decoding (see `metabolic.evaluate.scoring`)."""
    from metabolic.evaluate.scoring import evaluate_budgets as run_evaluation  # imported here: it imports this module

    return run_evaluation(cfg, progress=progress)


# Registered in pipeline order; later issues add their stages here.
STAGES: dict[str, Callable[[StudyConfig], Any]] = {
    "corpus": corpus,
    "pretrain": pretrain_backbone,
    "prior": energy_prior,
    "csc": csc_labels,
    "train": train_variants,
    "evaluate": evaluate_budgets,
    "etokens": measure_etokens,  # last: it also measures the trained MetabolicGPT-2 when it exists
}


def run(cfg: StudyConfig, stages: list[str] | None = None) -> dict[str, float]:
    """Run `stages` (default: all, in order) and return each stage's wall time in seconds."""
    names = list(STAGES) if not stages else stages
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}: choose among {', '.join(STAGES)}")
    timings: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        STAGES[name](cfg)
        timings[name] = time.perf_counter() - t0
        log.info("stage %s done in %.1f s", name, timings[name])
    return timings
