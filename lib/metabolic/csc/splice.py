"""Encoder word pieces of every counterfactual from one tokenization of the full text (issue 13).

The counterfactual of GPT-2 position t is `decode(ids without t)`: the lossy UTF-8 decoding of the
text's bytes B with token t's bytes [s, e) cut out. Instead of decoding and word-piece tokenizing
each of the n counterfactuals of an n-token text (O(n^2) characters), the full text is tokenized once
with offsets and each counterfactual is spliced:

    L = just after the last ASCII whitespace byte before s (0 if none)
    R = the first ASCII whitespace byte at or after e (len(B) if none)
    pieces(counterfactual) = pieces of the full text that start before char(L)
                           + pieces(decode(B[L:s] + B[e:R]))          (the local span, tokenized alone)
                           + pieces of the full text that start at or after char(R)

The local span holds every word the deleted bytes touch, and the two words a deletion may join.

Why it is exact (id for id the full path), given the checks in `PieceSplicer`:
1. GPT-2's decode is the lossy UTF-8 decoding of the concatenated token bytes (byte-level decoder,
   `clean_up_tokenization_spaces` off, no added token such as <|endoftext|> in the sequence, and the
   full text's decode equals its bytes' decoding). An ASCII byte leaves the UTF-8 decoder with nothing
   pending and ends any pending sequence, so decoding splits at B[L-1] and at B[R].
2. The BERT normaliser works character by character (control and U+FFFD removal, whitespace to
   space, CJK padding, per-character lower-casing, accent stripping; NFD reorders only combining
   marks, never across a whitespace character), the pre-tokenizer splits words at whitespace,
   WordPiece (with its [UNK] for a word over max_input_chars_per_word) works per word, and no added
   token ([CLS], [UNK], ...) contains whitespace: tokenization splits at whitespace characters, so the
   pieces outside [char(L), char(R)) are those of the full text.
A sequence or a tokenizer where a condition does not hold takes the full path (decode, then
tokenize) for each of its counterfactuals; `SpliceCounts.fallback` counts those.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

log = logging.getLogger(__name__)

ASCII_WHITESPACE = b" \t\n\r"  # whitespace to both UTF-8 (ASCII) and the BERT normaliser (\v, \f are control)
_SUPPORTED = {"normalizer": ("BertNormalizer",), "pre_tokenizer": ("BertPreTokenizer",), "model": ("WordPiece",)}


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte table (the inverse of transformers' `bytes_to_unicode`)."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def counterfactual_ids(ids: np.ndarray, positions: np.ndarray) -> list[list[int]]:
    """Each row is `ids` with one position of `positions` removed (vectorised, no loop per token)."""
    n = ids.shape[0]
    if n == 0 or positions.size == 0:
        return []
    keep = np.ones((positions.size, n), dtype=bool)
    keep[np.arange(positions.size), positions] = False
    return np.broadcast_to(ids, (positions.size, n))[keep].reshape(positions.size, n - 1).tolist()


def counterfactual_texts(tokenizer, ids: np.ndarray, positions: np.ndarray) -> list[str]:
    """The counterfactual texts of CSC: `tokenizer.decode(ids without position t)` for each t of `positions`
    (the texts the encoder sees when splicing cannot build their pieces from the full text's)."""
    return tokenizer.batch_decode(counterfactual_ids(ids, positions))


@dataclass
class PieceRows:
    """Word-piece rows, each up to three slices of one buffer (no copy of the full text's pieces per row).

    Row j = buffer[s1:s1+n1] + buffer[s2:s2+n2] + buffer[s3:s3+n3], `segments[j] = (s1, n1, s2, n2, s3, n3)`.
    """

    buffer: np.ndarray  # int64 encoder ids
    segments: np.ndarray  # int64 [rows, 6]

    @property
    def lengths(self) -> np.ndarray:
        return self.segments[:, 1] + self.segments[:, 3] + self.segments[:, 5]

    def row(self, j: int) -> list[int]:
        s1, n1, s2, n2, s3, n3 = (int(v) for v in self.segments[j])
        return self.buffer[s1:s1 + n1].tolist() + self.buffer[s2:s2 + n2].tolist() + self.buffer[s3:s3 + n3].tolist()

    def flat(self) -> np.ndarray:
        """All rows' pieces concatenated in row order (vectorised: no loop per row)."""
        starts = self.segments[:, 0::2].reshape(-1)
        counts = self.segments[:, 1::2].reshape(-1)
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        offsets = np.cumsum(counts) - counts
        return self.buffer[np.repeat(starts - offsets, counts) + np.arange(total)]

    def gather(self, idx: np.ndarray, pad_id: int, buffer: torch.Tensor | None = None,
               device: torch.device | str = "cpu", use_torch: bool | None = None) -> dict[str, torch.Tensor]:
        """Rows `idx` as a padded batch (`input_ids`, `attention_mask`) by one gather: on a GPU with torch
        on the device (pass `buffer` already there so it is not copied per batch), on a CPU with numpy
        (torch's CPU indexing was ~20x slower here for these small batches); `use_torch` forces either."""
        device = torch.device(device)
        width = int(self.lengths[idx].max()) if idx.size else 0  # from the host copy: no device sync
        on_cpu = device.type == "cpu" if use_torch is None else not use_torch
        if on_cpu:
            buf, seg, k = self.buffer, self.segments[idx], np.arange(width)[None, :]
        else:
            buf = torch.from_numpy(self.buffer).to(device) if buffer is None else buffer
            seg = torch.from_numpy(np.ascontiguousarray(self.segments[idx])).to(device)
            k = torch.arange(width, device=device)[None, :]
        where = np.where if on_cpu else torch.where
        s1, n1, s2, n2, s3, n3 = (seg[:, c:c + 1] for c in range(6))
        a, b = n1, n1 + n2
        src = where(k < a, s1 + k, where(k < b, s2 + k - a, s3 + k - b))
        mask = k < b + n3
        # Padding slots index past their row: clip them into the buffer, then overwrite with pad_id.
        ids = where(mask, buf[src.clip(0, max(len(buf) - 1, 0))], pad_id) if len(buf) else src * 0 + pad_id
        if on_cpu:
            return {"input_ids": torch.from_numpy(ids.astype(np.int64)), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        return {"input_ids": ids, "attention_mask": mask.long()}


@dataclass
class SpliceCounts:
    spliced: int = 0
    fallback: int = 0
    reasons: dict = field(default_factory=dict)  # why counterfactuals fell back -> how many

    def fell_back(self, reason: str, n: int) -> None:
        self.fallback += n
        self.reasons[reason] = self.reasons.get(reason, 0) + n


class PieceSplicer:
    """Full texts and counterfactual word pieces for GPT-2 id sequences (see the module docstring).

    `splice=False` (or a tokenizer pair outside the proof) takes the full path for every counterfactual.
    """

    def __init__(self, tokenizer, enc_tokenizer, splice: bool = True):
        self.tokenizer = tokenizer
        self.enc_tokenizer = enc_tokenizer
        self.counts = SpliceCounts()
        byte_of = gpt2_byte_decoder()
        vocab = len(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(vocab)))
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._added = np.zeros(vocab, dtype=bool)
        self._added[[i for i in added if 0 <= i < vocab]] = True
        self._token_bytes: list[bytes] = []
        unmapped = 0
        for i, t in enumerate(tokens):
            if t is None or any(ch not in byte_of for ch in t):
                self._added[i] = True  # not a byte-level token: sequences holding it take the full path
                self._token_bytes.append(b"")
                unmapped += 1 if i not in added else 0
            else:
                self._token_bytes.append(bytes(byte_of[ch] for ch in t))
        self._token_len = np.fromiter((len(b) for b in self._token_bytes), dtype=np.int64, count=vocab)
        self._is_ws = np.zeros(256, dtype=bool)
        self._is_ws[list(ASCII_WHITESPACE)] = True
        self.n_prefix, self.n_suffix = self._special_layout()
        self.disabled = None if splice else "splice=False"
        if self.disabled is None:
            self.disabled = self._unsupported(unmapped)
        if self.disabled is None:
            # The Rust tokenizer itself for the spliced path (the transformers wrapper costs more than
            # tokenizing the short spans); never truncating nor padding, as the labeller asks.
            self._backend = Tokenizer.from_str(enc_tokenizer.backend_tokenizer.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
        if self.disabled is not None and splice:
            log.warning("counterfactual word pieces take the full path (decode + tokenize): %s", self.disabled)

    # --- checks -----------------------------------------------------------------------------

    def _special_layout(self) -> tuple[int, int]:
        enc = self.enc_tokenizer(["a"], add_special_tokens=True, return_special_tokens_mask=True, verbose=False)
        mask = list(enc["special_tokens_mask"][0])
        prefix = next((i for i, m in enumerate(mask) if not m), len(mask))
        suffix = next((i for i, m in enumerate(reversed(mask)) if not m), len(mask))
        return prefix, suffix

    def _unsupported(self, unmapped: int) -> str | None:
        """Why the proof does not cover this tokenizer pair, or None."""
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return "the GPT-2 tokenizer cleans up spaces when decoding (not local)"
        if unmapped:
            return f"{unmapped} GPT-2 tokens are not byte-level"
        backend = getattr(self.enc_tokenizer, "backend_tokenizer", None)
        if backend is None:
            return "the encoder's tokenizer is not a fast (Rust) tokenizer"
        spec = json.loads(backend.to_str())
        for part, allowed in _SUPPORTED.items():
            kind = (spec.get(part) or {}).get("type")
            if kind not in allowed:
                return f"the encoder's {part} is {kind}, not {'/'.join(allowed)}"
        if any(any(ch.isspace() for ch in tok["content"]) for tok in spec.get("added_tokens", [])):
            return "an added token of the encoder's tokenizer contains whitespace"
        if (self.n_prefix, self.n_suffix) != (1, 1):
            return f"the encoder adds {self.n_prefix} + {self.n_suffix} special tokens, not [CLS] text [SEP]"
        return None

    # --- building rows ----------------------------------------------------------------------

    def _encode(self, texts: list[str], special: bool):
        """The full path's tokenization: the encoder's tokenizer as the labeller always called it."""
        return self.enc_tokenizer(texts, add_special_tokens=special, truncation=False, padding=False,
                                  return_attention_mask=False, return_token_type_ids=False, verbose=False)

    def rows(self, seqs: Sequence[np.ndarray], positions: Sequence[np.ndarray], max_full_pieces: int | None = None,
             ) -> tuple[PieceRows, np.ndarray, np.ndarray]:
        """Rows for each sequence i with positions: its full text (position -1), then one counterfactual
        per position. Sequences whose full text has more than `max_full_pieces` pieces are left out.
        Returns (rows, owner index into `seqs`, position)."""
        keep = [i for i in range(len(seqs)) if positions[i].size]
        full_texts = self.tokenizer.batch_decode([seqs[i].tolist() for i in keep]) if keep else []
        if self.disabled is None:
            encodings = self._backend.encode_batch(full_texts, add_special_tokens=True)
            full_ids, full_offsets = [e.ids for e in encodings], [e.offsets for e in encodings]
        else:
            full_ids, full_offsets = self._encode(full_texts, special=True)["input_ids"] if keep else [], None
        parts: list[np.ndarray] = []  # pieces pushed into the buffer, in order
        n_buf = 0
        segs: list[np.ndarray] = []
        owner: list[np.ndarray] = []
        position: list[np.ndarray] = []
        mids: list[str] = []  # local spans to tokenize, one batched call
        mid_rows: list[int] = []  # row of each local span
        slow: list[tuple[int, np.ndarray, np.ndarray]] = []  # (first row, ids, positions) taking the full path
        n_rows = 0
        for k, i in enumerate(keep):
            full = np.asarray(full_ids[k], dtype=np.int64)
            if max_full_pieces is not None and full.size > max_full_pieces:
                log.debug("sequence %d has %d word pieces > %d: left out", i, full.size, max_full_pieces)
                continue
            pos = positions[i]
            p0 = n_buf
            parts.append(full)
            n_buf += full.size
            seg = np.zeros((pos.size + 1, 6), dtype=np.int64)
            seg[0, :2] = (p0, full.size)
            cuts = self._cuts(seqs[i], pos, full_texts[k], full_offsets[k]) if self.disabled is None else None
            if self.disabled is not None:
                self.counts.fell_back(self.disabled, int(pos.size))
            if cuts is None:
                slow.append((n_rows + 1, seqs[i], pos))
            else:
                left, span_texts, right = cuts
                seg[1:, 0] = p0
                seg[1:, 1] = left
                seg[1:, 4] = p0 + right
                seg[1:, 5] = full.size - right
                mids.extend(span_texts)
                mid_rows.extend(range(n_rows + 1, n_rows + 1 + pos.size))
                self.counts.spliced += int(pos.size)
            segs.append(seg)
            owner.append(np.full(pos.size + 1, i, dtype=np.int64))
            position.append(np.concatenate([[-1], pos]).astype(np.int64))
            n_rows += pos.size + 1
        if not segs:
            empty = np.zeros(0, np.int64)
            return PieceRows(empty, np.zeros((0, 6), np.int64)), empty, empty
        segments = np.concatenate(segs)
        if mids:
            mid_ids = [e.ids for e in self._backend.encode_batch_fast(mids, add_special_tokens=False)]
            lengths = np.fromiter((len(x) for x in mid_ids), dtype=np.int64, count=len(mid_ids))
            rows_ = np.asarray(mid_rows, dtype=np.int64)
            segments[rows_, 2] = n_buf + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            segments[rows_, 3] = lengths
            parts.append(np.fromiter(itertools.chain.from_iterable(mid_ids), dtype=np.int64, count=int(lengths.sum())))
            n_buf += int(lengths.sum())
        for first, ids, pos in slow:
            texts = counterfactual_texts(self.tokenizer, ids, pos)
            pieces = self._encode(texts, special=True)["input_ids"]
            for j, x in enumerate(pieces):
                segments[first + j, :2] = (n_buf, len(x))
                parts.append(np.asarray(x, dtype=np.int64))
                n_buf += len(x)
        buffer = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return PieceRows(buffer, segments), np.concatenate(owner), np.concatenate(position)

    def _cuts(self, ids: np.ndarray, pos: np.ndarray, text: str, offsets) -> tuple[np.ndarray, list[str], np.ndarray] | None:
        """For each position: full-text pieces kept on the left, the local span's text, and the index of
        the first full-text piece kept on the right; None (counted) where the proof does not apply."""
        if self._added[ids].any():
            self.counts.fell_back("an added token (e.g. <|endoftext|>) in the sequence", int(pos.size))
            return None
        lengths = self._token_len[ids]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        data = b"".join([self._token_bytes[t] for t in ids.tolist()])
        if data.decode("utf-8", "replace") != text:
            self.counts.fell_back("decode differs from the lossy UTF-8 decoding of the token bytes", int(pos.size))
            return None
        arr = np.frombuffer(data, dtype=np.uint8)
        ws = np.flatnonzero(self._is_ws[arr])
        s, e = starts[pos], ends[pos]
        if ws.size:
            before = np.searchsorted(ws, s, "left")  # whitespace bytes strictly before s
            left_cut = np.where(before > 0, ws[np.maximum(before - 1, 0)] + 1, 0)
            after = np.searchsorted(ws, e, "left")  # the first whitespace byte at or after e
            right_cut = np.where(after < ws.size, ws[np.minimum(after, ws.size - 1)], len(data))
        else:
            left_cut, right_cut = np.zeros_like(s), np.full_like(e, len(data))
        char_left, char_right = self._chars_before(data, arr, ws, left_cut), self._chars_before(data, arr, ws, right_cut)
        piece_starts = np.asarray([o[0] for o in offsets[self.n_prefix:len(offsets) - self.n_suffix]], dtype=np.int64)
        left = self.n_prefix + np.searchsorted(piece_starts, char_left, "left")
        right = self.n_prefix + np.searchsorted(piece_starts, char_right, "left")
        spans = [(data[a:b] + data[c:d]).decode("utf-8", "replace")
                 for a, b, c, d in zip(left_cut.tolist(), s.tolist(), e.tolist(), right_cut.tolist())]
        return left, spans, right

    @staticmethod
    def _chars_before(data: bytes, arr: np.ndarray, ws: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        """Characters of the decoded text before each byte cut (cuts at 0, len(data), a whitespace byte or
        just after one: the decoding splits there)."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            # Invalid bytes (e.g. a sequence cut inside a character): decode word by word.
            bounds = np.concatenate([[0], np.repeat(ws, 2) + np.tile([0, 1], ws.size), [len(data)]])
            chars = np.fromiter((len(data[a:b].decode("utf-8", "replace")) for a, b in zip(bounds[:-1], bounds[1:])),
                                dtype=np.int64, count=bounds.size - 1)
            at = np.concatenate([[0], np.cumsum(chars)])
            return at[np.searchsorted(bounds, cuts)]
        # Valid UTF-8: a character starts at every byte that is not a continuation byte (10xxxxxx).
        starts = np.concatenate([[0], np.cumsum((arr & 0xC0) != 0x80)])
        return starts[cuts]
