"""Synthetic energy prior over the vocabulary (paper IV.B, eq. 8): the "metabolic tokenizer".

    base(v) = alpha / (f(v) + eps) + beta * len(v)
    cost(v) = max(c_min, s * base(v) + penalty(v)),  s chosen so that the vocabulary mean is exactly 1

f(v) is v's relative frequency in the training corpus and len(v) the character length of v decoded
on its own. Two decisions the paper leaves open:

* Unseen tokens (count 0): counted as if seen `unseen_pseudo_count` (default 1) times. Their rarity
  term then equals that of the rarest observed tokens instead of alpha/eps, which would exceed every
  observed token by orders of magnitude and, through the mean-1 normalisation, push every observed
  token onto the floor.
* Floor and mean together: scaling to mean 1 and then flooring would break the mean, so the scale s
  is solved with the floor in place (`normalise_with_floor`): the mean is 1 and no cost is below c_min.

Heading/metadata penalty (`is_heading_like`, explicit and tested): a token is heading-like when its
decoded text, stripped of whitespace, is made only of "=" (WikiText's `= = Heading = =` markers), or
starts with a capital letter and, lower-cased, is one of `HEADING_WORDS`. Such tokens get
`heading_penalty` added after scaling, before the floor, so they always cost more than without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from metabolic.core.config import PriorConfig
from metabolic.core.errors import ConfigError, DataError

# Section titles and metadata words of encyclopaedic text that a model could "burn" budget on
# (paper IV.B: "Summary", "Biography"). Matched only in capitalised form: "notes" in running text is
# content, "Notes" as a token on its own is most often a section title.
HEADING_WORDS = frozenset(
    {
        "summary", "biography", "references", "notes", "bibliography", "contents", "sources",
        "footnotes", "citations", "appendix", "overview", "abstract", "introduction", "synopsis",
        "gallery", "category", "categories", "discography", "filmography", "infobox", "navigation",
    }
)


def is_heading_like(token_text: str) -> bool:
    """True for WikiText heading markers ("=", " = =") and capitalised metadata words ("Biography")."""
    text = token_text.strip()
    if not text:
        return False
    if set(text) == {"="}:
        return True
    return text[0].isupper() and text.lower() in HEADING_WORDS


def token_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Occurrences of each id in `sequences`: int64 [vocab_size]; an id outside the vocabulary is an error."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for seq in sequences:
        if len(seq) == 0:
            continue
        arr = np.asarray(seq, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise DataError(f"token id {int(arr.max() if arr.max() >= vocab_size else arr.min())} is outside "
                            f"the vocabulary of size {vocab_size}: the corpus was tokenized with another tokenizer")
        counts += np.bincount(arr, minlength=vocab_size)
    return counts


def decoded_tokens(tokenizer, vocab_size: int) -> list[str]:
    """Each id decoded on its own (partial UTF-8 bytes show as U+FFFD, one character each)."""
    return tokenizer.batch_decode([[i] for i in range(vocab_size)], clean_up_tokenization_spaces=False)


def base_cost(counts: np.ndarray, lengths: np.ndarray, cfg: PriorConfig) -> np.ndarray:
    """Eq. (8) before normalisation, float64 [V]; unseen tokens use `cfg.unseen_pseudo_count`."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise DataError("the corpus has no tokens: the prior needs token counts from a non-empty corpus")
    effective = np.where(counts > 0, counts, cfg.unseen_pseudo_count)
    freq = effective / total
    return cfg.alpha / (freq + cfg.eps) + cfg.beta * np.asarray(lengths, dtype=np.float64)


def normalise_with_floor(base: np.ndarray, penalty: np.ndarray, c_min: float) -> np.ndarray:
    """cost = max(c_min, s * base + penalty) with s > 0 solved so that mean(cost) == 1 exactly.

    mean(cost) is continuous and non-decreasing in s, so the active set (tokens above the floor) is
    found by fixed-point iteration from the unfloored solution, where s can only shrink.
    """
    base = np.asarray(base, dtype=np.float64)
    penalty = np.asarray(penalty, dtype=np.float64)
    n = base.size
    if np.any(base <= 0) or not np.all(np.isfinite(base)):
        raise DataError("base costs must be finite and > 0")
    if np.maximum(c_min, penalty).mean() >= 1.0:
        raise ConfigError(
            f"prior.heading_penalty={penalty.max()!r} with prior.c_min={c_min!r} leaves no room for a mean of 1: lower them"
        )
    active = np.ones(n, dtype=bool)
    s = (n - penalty.sum()) / base.sum()
    for _ in range(200):
        s = (n - c_min * (~active).sum() - penalty[active].sum()) / base[active].sum()
        new_active = s * base + penalty > c_min
        if np.array_equal(new_active, active):
            break
        active = new_active
    else:  # pragma: no cover - the iteration is monotone and ends in at most n steps in practice
        raise RuntimeError("prior normalisation did not converge")
    return np.maximum(c_min, s * base + penalty)


@dataclass(frozen=True)
class Prior:
    """The synthetic cost table and what it was made from (all arrays have length V)."""

    cost: np.ndarray  # float64, mean 1, >= c_min
    counts: np.ndarray  # int64 token counts in the training corpus
    lengths: np.ndarray  # int64 decoded character lengths
    heading: np.ndarray  # bool, heading-like tokens
    tokens: list[str]  # decoded text of each id


def build_prior(counts: np.ndarray, tokens: Sequence[str], cfg: PriorConfig) -> Prior:
    """The prior for a vocabulary given its corpus counts and decoded token texts."""
    if len(counts) != len(tokens):
        raise DataError(f"{len(counts)} counts for {len(tokens)} tokens: both must cover the same vocabulary")
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    heading = np.array([is_heading_like(t) for t in tokens], dtype=bool)
    penalty = np.where(heading & cfg.apply_heading_penalty, cfg.heading_penalty, 0.0)
    cost = normalise_with_floor(base_cost(counts, lengths, cfg), penalty, cfg.c_min)
    return Prior(cost=cost, counts=np.asarray(counts, dtype=np.int64), lengths=lengths, heading=heading, tokens=list(tokens))
