"""Stage `corpus`: WikiText-2's train/validation texts tokenized with GPT-2 (cached per source and tokenizer),
and the profile's seeded selections of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metabolic.core import artefacts
from metabolic.core.assets import candidates
from metabolic.core.config import AssetsConfig, StudyConfig
from metabolic.data.corpus import Corpus, load_corpus, pack_ids, select_sequences, tokenize, unpack_ids
from metabolic.pipeline.stage import read_once, realise, tokenizer, tokenizer_fingerprint


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


def corpus_texts(assets: AssetsConfig) -> tuple[Corpus, dict[str, str]]:
    """WikiText-2's texts and the SHA-256 of each split, read once per process while the local source folders
    are the same files (every stage that needs the corpus asks for it; reading and hashing take ~0.2 s)."""
    places = candidates("wikitext", assets.wikitext_dataset)
    local = [Path(c.location) for c in places if Path(c.location).is_dir()]  # a Hub dataset: `datasets` caches it
    return read_once(("corpus_texts", assets, tuple(places)), local, lambda: _read_texts(assets))


def _read_texts(assets: AssetsConfig) -> tuple[Corpus, dict[str, str]]:
    texts = load_corpus(assets)
    return texts, {"train_sha256": artefacts.sha256_bytes("\n".join(texts.train).encode("utf-8")),
                   "valid_sha256": artefacts.sha256_bytes("\n".join(texts.validation).encode("utf-8"))}


class CorpusStage:
    folder = "corpus"
    required = ("tokens.pt",)

    def __init__(self, cfg: StudyConfig) -> None:
        self.texts, hashes = corpus_texts(cfg.assets)
        self.tok = tokenizer(cfg.assets.tokenizer)
        self._description = {"stage": "corpus", **hashes, "tokenizer": tokenizer_fingerprint(self.tok.value)}

    def description(self) -> dict[str, Any]:
        return self._description

    def build(self, work: Path) -> dict[str, Any]:
        texts, tok = self.texts, self.tok
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

    def load(self, folder: Path, key: str) -> CorpusData:
        data = torch.load(folder / "tokens.pt", weights_only=True)
        return CorpusData(
            train_ids=unpack_ids(data["train_ids"], data["train_offsets"]),
            valid_ids=unpack_ids(data["valid_ids"], data["valid_offsets"]),
            tokenizer=self.tok.value,
            source=self.texts.source,
            location=self.texts.location,
            fingerprint=key,
            folder=folder,
        )


def corpus(cfg: StudyConfig) -> CorpusData:
    """Stage `corpus`: WikiText-2 train/validation texts tokenized with GPT-2 (cached per source+tokenizer)."""
    return realise(CorpusStage(cfg), cfg)


def train_sequences(cfg: StudyConfig, data: CorpusData) -> list[list[int]]:
    """The profile's training texts: seeded subsample, capped at `corpus.seq_len` tokens."""
    c = cfg.corpus
    return select_sequences(data.train_ids, c.max_train_texts, c.seq_len, c.min_tokens, c.seed)


def pretrain_sequences(cfg: StudyConfig, data: CorpusData) -> list[list[int]]:
    """What the backbone pretrains on: the profile's training texts, or every training text whole
    (`backbone.corpus = "all"`)."""
    if cfg.backbone.corpus == "all":
        return select_sequences(data.train_ids, None, max(len(x) for x in data.train_ids), cfg.corpus.min_tokens,
                                cfg.corpus.seed)
    return train_sequences(cfg, data)


def valid_sequences(cfg: StudyConfig, data: CorpusData) -> list[list[int]]:
    """The profile's validation texts: seeded subsample (seed + 1), capped at `corpus.seq_len` tokens."""
    c = cfg.corpus
    return select_sequences(data.valid_ids, c.max_valid_texts, c.seq_len, c.min_tokens, c.seed + 1)
