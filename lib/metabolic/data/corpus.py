"""WikiText-2 as the paper uses it: texts = non-empty lines, GPT-2 tokenized, capped, subsampled.

Two sources give the same line structure (23,767 training and 2,461 validation texts): the Hub's
`Salesforce/wikitext` through `datasets` (default `wikitext-2-raw-v1`), and the tokenized release
in `$METABOLIC_ASSETS/wikitext-2/{train,valid,test}.txt` (`<unk>`, ` @-@ `).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from metabolic.core.artefacts import pack_ragged, unpack_ragged
from metabolic.core.assets import Candidate, candidates, resolve
from metabolic.core.config import AssetsConfig
from metabolic.core.errors import DataError

SPLITS = ("train", "validation")
_ASSET_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}


@dataclass(frozen=True)
class Corpus:
    """Texts of each split (non-empty lines, whitespace-stripped) and where they came from."""

    train: list[str]
    validation: list[str]
    source: str
    location: str


def non_empty_texts(lines: Iterable[str]) -> list[str]:
    """A text is a line with any non-whitespace character, stripped (the paper's "texts")."""
    return [line.strip() for line in lines if line.strip()]


def _load_from_assets(folder: Path) -> dict[str, list[str]]:
    out = {}
    for split in SPLITS:
        path = folder / _ASSET_FILES[split]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        out[split] = non_empty_texts(_text(path).splitlines())
    return out


def _text(path: Path) -> str:
    """The file's UTF-8 text; a `DataError` naming the file when it is not text (binary, another encoding)."""
    fix = "give WikiText-2's raw text files (train.txt, valid.txt, test.txt: one paragraph per line, UTF-8)"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}): {fix}") from None
    if "\x00" in text:  # decodes, but no text holds NUL: a binary file
        raise DataError(f"{path} holds a NUL byte at character {text.index(chr(0))}: it is binary, not text: {fix}")
    return text


def _load_from_datasets(dataset: str, config_name: str) -> dict[str, list[str]]:
    import datasets

    ds = datasets.load_dataset(dataset, config_name)
    return {split: non_empty_texts(ds[split]["text"]) for split in SPLITS}


def load_corpus(assets: AssetsConfig) -> Corpus:
    """Load both splits from the configured source; an empty split is a `DataError`."""
    cands = candidates("wikitext", assets.wikitext_dataset)
    if assets.wikitext_source == "hub":
        cands = [Candidate("hub", assets.wikitext_dataset)]
    elif assets.wikitext_source == "assets":
        cands = [c for c in cands if c.source == "assets"]

    def load(c: Candidate) -> dict[str, list[str]]:
        if c.source == "hub" or (c.source == "folder" and not (Path(c.location) / "train.txt").exists()):
            return _load_from_datasets(c.location, assets.wikitext_config)
        return _load_from_assets(Path(c.location))

    resolved = resolve("wikitext", assets.wikitext_dataset, load, cands)
    splits = resolved.value
    for split in SPLITS:
        if not splits[split]:
            raise DataError(
                f"WikiText-2 {split} split from {resolved.location} has no non-empty lines: "
                f"check the file or point METABOLIC_ASSETS at a complete copy"
            )
    return Corpus(train=splits["train"], validation=splits["validation"], source=resolved.source, location=resolved.location)


def tokenize(tokenizer, texts: Sequence[str], batch_size: int = 2048) -> list[list[int]]:
    """GPT-2 ids of each text, no truncation and no special tokens."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def pack_ids(ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists as (flat int32 ids, int64 offsets of length n+1) for compact storage."""
    flat, offsets = pack_ragged(ids, np.int32)
    return torch.from_numpy(flat), torch.from_numpy(offsets)


def unpack_ids(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    return [x.tolist() for x in unpack_ragged(flat.numpy(), offsets.numpy())]


def subsample_indices(n_total: int, n_keep: int | None, seed: int) -> list[int]:
    """A seeded, sorted choice of `n_keep` of `n_total` indices (all of them when n_keep is None)."""
    if n_keep is None or n_keep >= n_total:
        return list(range(n_total))
    order = list(range(n_total))
    random.Random(seed).shuffle(order)
    return sorted(order[:n_keep])


def select_sequences(
    ids: Sequence[Sequence[int]], max_texts: int | None, seq_len: int, min_tokens: int, seed: int
) -> list[list[int]]:
    """Texts with at least `min_tokens` tokens, seeded subsample of `max_texts`, each capped at `seq_len`."""
    usable = [i for i, x in enumerate(ids) if len(x) >= min_tokens]
    if not usable:
        raise DataError(f"no text has at least corpus.min_tokens={min_tokens} tokens: lower corpus.min_tokens")
    keep = subsample_indices(len(usable), max_texts, seed)
    return [list(ids[usable[i]][:seq_len]) for i in keep]


def pack_blocks(sequences: Sequence[Sequence[int]], block_size: int, eos_id: int) -> torch.Tensor:
    """Concatenate texts separated by `eos_id` and cut into full blocks: int64 [n_blocks, block_size]."""
    stream: list[int] = []
    for seq in sequences:
        stream.extend(seq)
        stream.append(eos_id)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(
            f"{len(stream)} tokens make no block of backbone.block_size={block_size}: "
            f"raise corpus.max_train_texts or lower backbone.block_size"
        )
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.int64).view(n_blocks, block_size)
