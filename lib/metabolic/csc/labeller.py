"""Exact counterfactual semantic cost (CSC, paper IV.C): `c_t = 1 - cos(f(x), f(x without token t))`.

`f` is the sentence encoder (all-MiniLM-L6-v2 by default) with normalised embeddings. The
counterfactual of position t is `tokenizer.decode(ids with position t removed)`: decoding the id
sequence, never joining per-token strings, because GPT-2's byte-level BPE splits multi-byte
characters across tokens (README, measured facts).

How it is fast without changing the maths:
- every text of a chunk of sequences (the full texts and all their counterfactuals) is encoded in
  large batches sorted by length, so padding is small; one `inference_mode` forward per batch;
- each full text is decoded and word-piece tokenized once; the word pieces of its counterfactuals
  are spliced from the full text's pieces and the re-tokenized words around the deleted token
  (`metabolic.csc.splice`, identical id for id to decoding and tokenizing each counterfactual, which
  remains the path where that proof does not apply, counted in `splicer.counts`); this planning runs
  in a background thread a chunk ahead of the encoder, and each batch is gathered on the device
  from the chunk's piece buffer;
- on CUDA only, `precision="tf32"` (TF32 matmuls) or `"fp16"` (transformer in fp16, pooling and
  the cosine in fp32). bf16 is refused: CSC is the difference of two nearly equal embeddings
  (mean ~0.0018 on 256-token texts) and bf16 errors are of that size (README, measured facts). On CPU the
  labeller always runs fp32.

Defined results for edge cases:
- empty sequence: an empty label array (there is no token to remove);
- one-token sequence: its label is `1 - cos(f(x), f(""))`, the encoder's embedding of the empty
  text being well defined ([CLS][SEP]); the corpus drops such texts anyway (corpus.min_tokens);
- a full text longer than the encoder's window (512 word pieces for MiniLM, including [CLS] and
  [SEP]): every position of that sequence is NaN, never a truncated label; a single counterfactual
  longer than the window (possible, rarely, when deletion re-tokenizes) is NaN;
- an id outside the GPT-2 vocabulary or a position outside the sequence: `DataError`;
- an encoder that cannot be resolved: `AssetError` from `metabolic.core.assets.load_encoder`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metabolic.core.errors import ConfigError, DataError
from metabolic.csc.splice import PieceRows, PieceSplicer

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "fp16")
# Negative labels can only come from rounding (1 - cos >= 0); anything below this is a bug.
NEGATIVE_TOLERANCE = 1e-4


def encoder_window(encoder) -> int:
    """Word pieces the encoder can see: its position table (not the tokenizer's shorter default).

    MiniLM's tokenizer says 256, its model has 512 positions; RoBERTa-style models (MPNet) reserve
    the first two of theirs for the padding offset.
    """
    config = encoder[0].auto_model.config
    positions = int(getattr(config, "max_position_embeddings", 512))
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "mpnet", "camembert"):
        positions -= 2
    return positions


@dataclass
class _Plan:
    """The rows of one chunk: row j belongs to sequence owner[j]; position -1 is the full text."""

    rows: PieceRows  # word pieces of each row ([CLS] and [SEP] included), spliced from the full texts'
    owner: np.ndarray
    position: np.ndarray

    @property
    def pieces(self) -> np.ndarray:
        return self.rows.lengths


class CSCLabeller:
    """Exact per-token CSC for batches of GPT-2 id sequences (see the module docstring)."""

    def __init__(self, encoder, tokenizer, device: str = "cpu", precision: str = "fp32", batch_size: int = 256,
                 chunk_texts: int | None = None, encoder_name: str | None = None, splice: bool = True):
        if precision not in PRECISIONS:
            raise ConfigError(f"csc.precision={precision!r} is invalid: choose one of {', '.join(PRECISIONS)} (bf16 is too coarse for CSC)")
        if batch_size <= 0:
            raise ConfigError(f"csc.batch_size={batch_size!r} is invalid: use a value > 0")
        self.device = torch.device(device)
        if precision != "fp32" and self.device.type != "cuda":
            log.warning("csc.precision=%s needs CUDA; labelling on %s in fp32", precision, self.device)
            precision = "fp32"
        self.precision = precision
        self.batch_size = int(batch_size)
        # Texts sorted together: large enough that length-sorting removes most padding, small enough
        # that a chunk's embeddings (texts x dim floats) stay small.
        self.chunk_texts = int(chunk_texts or max(16 * self.batch_size, 4096))
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.encoder = encoder.to(self.device).eval()
        self.encoder_name = encoder_name or "encoder"
        self.window = encoder_window(encoder)
        # No silent truncation: the encoder sees up to its full position table; longer texts are NaN.
        self.encoder.max_seq_length = self.window
        self.enc_tokenizer = encoder.tokenizer
        self._modules = list(self.encoder)
        self._transformer = self._modules[0]
        if precision == "fp16":
            # The transformer alone in fp16; pooling, normalisation and cosines stay fp32.
            self._transformer = copy.deepcopy(self._modules[0]).half()
        self._with_token_types = "token_type_ids" in getattr(self.enc_tokenizer, "model_input_names", [])
        # Counterfactual word pieces spliced from one tokenization of each full text (exact, see
        # metabolic.csc.splice); splice=False decodes and tokenizes every counterfactual (the reference).
        self.splicer = PieceSplicer(tokenizer, self.enc_tokenizer, splice=splice)
        self.stats = {"texts": 0, "labels": 0, "word_pieces": 0, "padded_word_pieces": 0}

    # --- public API ---------------------------------------------------------------------------

    def label(self, sequences: Sequence[Sequence[int]], positions: Sequence[np.ndarray | None] | None = None,
              progress: bool = True) -> list[np.ndarray]:
        """Per-token CSC (float32, NaN where not labelled) for each id sequence.

        `positions[i]` lists the positions of sequence i to label (None = all of them).
        """
        seqs, pos = self._validate(sequences, positions)
        out = [np.full(len(s), np.nan, dtype=np.float32) for s in seqs]
        groups = list(self._chunks(seqs, pos))
        for k, labels in self._label_groups(seqs, pos, groups, progress):
            for i, lab in zip(groups[k], labels):
                out[i] = lab
        return out

    def label_groups(self, sequences: Sequence[Sequence[int]], positions: Sequence[np.ndarray | None] | None,
                     groups: Sequence[Sequence[int]], progress: bool = True) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Label `groups` (lists of sequence indices) in order, yielding `(k, labels of group k)` as each
        finishes, so a caller can save it; decoding the next group overlaps the encoder."""
        seqs, pos = self._validate(sequences, positions)
        yield from self._label_groups(seqs, pos, [list(g) for g in groups], progress)

    def label_generated(self, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]],
                        progress: bool = False) -> list[np.ndarray]:
        """CSC of each generated token, computed on the full prompt + generation text (the tokens that
        count for a generation, see `metabolic.csc.dataset`); arrays of len(generation)."""
        if len(prompts) != len(generations):
            raise DataError(f"{len(prompts)} prompts for {len(generations)} generations: give one prompt per generation")
        full = [list(p) + list(g) for p, g in zip(prompts, generations)]
        positions = [np.arange(len(p), len(p) + len(g)) for p, g in zip(prompts, generations)]
        labels = self.label(full, positions, progress=progress)
        return [lab[len(p):] for lab, p in zip(labels, prompts)]

    def iter_batches(self, sequences: Sequence[Sequence[int]], positions: Sequence[np.ndarray | None] | None = None,
                     ) -> Iterator[dict[str, torch.Tensor]]:
        """The encoder batches `label` runs, without running the encoder (to measure the work around it)."""
        seqs, pos = self._validate(sequences, positions)
        for chunk in self._chunks(seqs, pos):
            for _, batch in self._batches(self._plan(chunk, seqs, pos)):
                yield batch

    def label_text(self, text: str) -> tuple[list[int], np.ndarray]:
        """GPT-2 ids of `text` and the CSC of each of its tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, self.label([ids], progress=False)[0]

    @property
    def dim(self) -> int:
        get = getattr(self.encoder, "get_embedding_dimension", None) or self.encoder.get_sentence_embedding_dimension
        return int(get())

    # --- internals ----------------------------------------------------------------------------

    def _validate(self, sequences, positions) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if positions is not None and len(positions) != len(sequences):
            raise DataError(f"positions has {len(positions)} entries for {len(sequences)} sequences: give one per sequence (None = all)")
        seqs: list[np.ndarray] = []
        pos: list[np.ndarray] = []
        for i, s in enumerate(sequences):
            arr = _integer_array(s, f"sequence {i}", "token ids")
            if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
                bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
                raise DataError(f"sequence {i} has token id {bad} outside the tokenizer's vocabulary [0, {self.vocab_size}): "
                                f"label ids made by the configured tokenizer (assets.tokenizer)")
            p = None if positions is None else positions[i]
            if p is None:
                p = np.arange(arr.size, dtype=np.int64)
            else:
                p = np.unique(_integer_array(p, f"positions[{i}]", "positions"))
                if p.size and (p[0] < 0 or p[-1] >= arr.size):
                    bad = int(p[0] if p[0] < 0 else p[-1])
                    raise DataError(f"position {bad} of sequence {i} is outside [0, {arr.size}): give positions within the sequence")
            seqs.append(arr)
            pos.append(p)
        return seqs, pos

    def _label_groups(self, seqs, pos, groups: list[list[int]], progress: bool) -> Iterator[tuple[int, list[np.ndarray]]]:
        n_labels = int(sum(pos[i].size for g in groups for i in g))
        bar = _progress(n_labels, progress and n_labels > 0)
        try:
            # Plans (decoding, tokenizing the full texts, splicing) are made a group ahead in a thread;
            # each batch is then one gather from the plan's piece buffer.
            plans = ((k, group, self._plan(group, seqs, pos)) for k, group in enumerate(groups))
            for k, group, plan in _background(plans, depth=1):
                out = {i: np.full(len(seqs[i]), np.nan, dtype=np.float32) for i in group}
                self._label_chunk(group, plan, pos, out, bar)
                yield k, [out[i] for i in group]
        finally:
            if bar is not None:
                bar.close()

    def _chunks(self, seqs: list[np.ndarray], pos: list[np.ndarray]) -> Iterator[list[int]]:
        chunk: list[int] = []
        size = 0
        for i in range(len(seqs)):
            if pos[i].size == 0:
                continue
            chunk.append(i)
            size += pos[i].size + 1
            if size >= self.chunk_texts:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def _plan(self, chunk: list[int], seqs, pos) -> _Plan:
        """Word pieces of the full texts that fit the window and of their counterfactuals."""
        rows, owner, position = self.splicer.rows([seqs[i] for i in chunk], [pos[i] for i in chunk], self.window)
        return _Plan(rows, np.asarray(chunk, dtype=np.int64)[owner] if owner.size else owner, position)

    def _batches(self, plan: _Plan) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Batches of rows sorted by word-piece length (little padding), gathered on the device from the
        plan's piece buffer; rows past the window are skipped."""
        lengths = plan.pieces
        fits = np.flatnonzero(lengths <= self.window)
        order = fits[np.argsort(lengths[fits], kind="stable")]
        pad_id = self.enc_tokenizer.pad_token_id or 0
        buffer = torch.from_numpy(plan.rows.buffer).to(self.device)
        for start in range(0, order.size, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield idx, plan.rows.gather(idx, pad_id, buffer, self.device)

    def _label_chunk(self, chunk, plan: _Plan, pos, out, bar) -> None:
        if not plan.owner.size:
            if bar is not None:
                bar.update(int(sum(pos[i].size for i in chunk)))
            return
        emb = torch.zeros((plan.owner.size, self.dim), dtype=torch.float32, device=self.device)
        # A counterfactual that re-tokenizes past the window (rare) is NaN, never truncated.
        valid = plan.pieces <= self.window
        with torch.inference_mode(), self._precision_context():
            for idx, batch in self._batches(plan):
                emb[torch.as_tensor(idx, device=self.device)] = self.embed_batch(batch)
                self.stats["texts"] += int(idx.size)
                self.stats["word_pieces"] += int(plan.pieces[idx].sum())
                self.stats["padded_word_pieces"] += int(batch["attention_mask"].numel())
                if bar is not None:
                    bar.update(int((plan.position[idx] >= 0).sum()))
            # Each counterfactual is compared with its own sequence's full text, whatever the order
            # of the sequences in the group (one full text per owner).
            full_rows = np.flatnonzero(plan.position < 0)
            by_owner = np.argsort(plan.owner[full_rows], kind="stable")
            cf = np.flatnonzero(plan.position >= 0)
            ref = full_rows[by_owner[np.searchsorted(plan.owner[full_rows][by_owner], plan.owner[cf])]]
            dots = (emb[torch.as_tensor(cf, device=self.device)] * emb[torch.as_tensor(ref, device=self.device)]).sum(-1)
            csc = (1.0 - dots).double().cpu().numpy()
        lowest = csc.min(initial=0.0)
        if lowest < -NEGATIVE_TOLERANCE:
            log.warning("CSC label %.2e < 0 beyond rounding: check that the encoder normalises embeddings", lowest)
        csc = np.maximum(csc, 0.0)  # 1 - cos >= 0; only rounding makes it negative
        csc[~valid[cf]] = np.nan
        n_labelled = 0
        for i in np.unique(plan.owner):
            sel = plan.owner[cf] == i
            out[int(i)][plan.position[cf][sel]] = csc[sel].astype(np.float32)
            n_labelled += int(sel.sum())
        skipped = int(sum(pos[i].size for i in chunk)) - n_labelled
        if bar is not None and skipped:
            bar.update(skipped)
        self.stats["labels"] += n_labelled

    def embed_batch(self, batch: dict[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Normalised fp32 sentence embeddings [n, dim] of one tokenized batch (`input_ids`, `attention_mask`
        as numpy arrays or tensors); the labeller's precision setting applies. Public for the CSC approximations."""
        non_blocking = self.device.type == "cuda"
        feats: dict[str, Any] = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
                                 .to(self.device, non_blocking=non_blocking) for k, v in batch.items()}
        if self._with_token_types:
            feats["token_type_ids"] = torch.zeros_like(feats["input_ids"])
        feats = self._transformer(feats)
        feats["token_embeddings"] = feats["token_embeddings"].float()
        for module in self._modules[1:]:
            feats = module(feats)
        return F.normalize(feats["sentence_embedding"].float(), dim=-1)

    @contextlib.contextmanager
    def _precision_context(self):
        if self.device.type != "cuda" or self.precision != "tf32":
            yield
            return
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # "high" = TF32 tensor-core matmuls for fp32 tensors
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)


def _integer_array(values, name: str, what: str) -> np.ndarray:
    """`values` as a flat int64 array; anything but integers (Python or numpy) is a one-line `DataError`
    (a float is never truncated: 464.5 is not token 464)."""
    if isinstance(values, (str, bytes)):
        raise DataError(f"{name} is the text {values!r}, not {what}: pass integer {what} "
                        f"(for text, label tokenizer(text)['input_ids'] or use label_text)")
    try:
        items = list(values)
        arr = np.asarray(items)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} is not a flat list of integer {what} ({type(exc).__name__}): pass list[list[int]]") from exc
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise DataError(f"{name} is not a flat list of integer {what}: pass list[list[int]]")
    if arr.dtype.kind not in "iu":
        bad = next((v for v in items if isinstance(v, bool) or not isinstance(v, (int, np.integer))), items[0])
        raise DataError(f"{name} holds {bad!r} ({type(bad).__name__}): integer {what} expected "
                        f"(ints or numpy integers, never floats or strings)")
    return arr.astype(np.int64, copy=False)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="label", desc="CSC labels", smoothing=0.1)


def _background(items: Iterator, depth: int = 2) -> Iterator:
    """Produce `items` in a thread (tokenisation overlaps the encoder); errors are re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def flops_per_text(n_layers: int, hidden: int, intermediate: int, n_pieces: np.ndarray | int) -> np.ndarray:
    """Forward FLOPs of a BERT-style encoder on texts of `n_pieces` word pieces (2 FLOPs per MAC).

    Per layer and word piece: QKV and output projections 4 d^2 MACs, feed-forward 2 d d_ff MACs,
    attention scores and their weighted sum 2 L d MACs. Embeddings and pooling are negligible.
    """
    L = np.asarray(n_pieces, dtype=np.float64)
    per_layer = L * (4 * hidden**2 + 2 * hidden * intermediate) + 2 * L**2 * hidden
    return 2.0 * n_layers * per_layer
