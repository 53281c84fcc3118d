"""Cheaper estimates of CSC beside the exact labeller (issue 3, item 6); exact stays the default.

- `masked_csc`: instead of deleting token t and re-encoding a new string, the full text is
  tokenized once and, for each t, the encoder word pieces that overlap token t's characters are
  masked out of attention and out of the mean pooling (positions do not shift, nothing re-tokenizes).
  Same number of encoder passes as exact, but one tokenisation, one length, no decoding.
- `gradient_csc`: one forward and one backward per text. Each word piece's input embedding gets a
  gate g (1 = present); deleting token t is g -> 0 on its pieces (delta_t). Since 1 - cos(e, e') ~
  1/2 ||J delta_t||^2 to second order (e normalised), CSC_t is estimated by a Johnson-Lindenstrauss
  sketch: for k random Gaussian probes r_j, the gradient of r_j . e(g) gives r_j^T J, and
  CSC_t ~ 1/2 mean_j (r_j^T J delta_t)^2. The k probes run as one batch of k copies.
`fidelity` compares any estimate with exact labels on the same tokens: Spearman per sequence, MAE.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metabolic.core.errors import DataError
from metabolic.core.stats import spearman

log = logging.getLogger(__name__)


def token_char_spans(tokenizer, ids: Sequence[int]) -> np.ndarray:
    """[start, end) characters of each GPT-2 token in `decode(ids)`, from the decoded prefixes."""
    prefixes = tokenizer.batch_decode([list(ids[:k]) for k in range(len(ids) + 1)])
    ends = np.array([len(p) for p in prefixes], dtype=np.int64)
    ends = np.maximum.accumulate(ends)  # a split multi-byte character can shorten a prefix: keep spans ordered
    return np.stack([ends[:-1], ends[1:]], axis=1)


def pieces_of_tokens(labeller, ids: Sequence[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The full text's encoder batch (1 row) and a [T, n_pieces] bool map: piece i overlaps token t."""
    text = labeller.tokenizer.decode(list(ids))
    enc = labeller.enc_tokenizer([text], add_special_tokens=True, truncation=False, return_offsets_mapping=True,
                                 return_token_type_ids=False, return_tensors="np", verbose=False)
    offsets = enc.pop("offset_mapping")[0]  # (0, 0) for [CLS] / [SEP]
    spans = token_char_spans(labeller.tokenizer, ids)
    real = offsets[:, 1] > offsets[:, 0]
    overlap = (offsets[None, :, 0] < spans[:, 1:2]) & (offsets[None, :, 1] > spans[:, 0:1]) & real[None, :]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, overlap


def _labels_and_pieces(labeller, ids: Sequence[int]):
    """A NaN label array for `ids` (filled in place by the caller) and its word pieces, or None when
    there is nothing to label: an empty text, or one beyond the encoder's window (labels stay NaN)."""
    labels = np.full(len(ids), np.nan, dtype=np.float32)
    if len(ids) == 0:
        return labels, None
    batch, overlap = pieces_of_tokens(labeller, ids)
    if batch["input_ids"].shape[1] > labeller.window:
        return labels, None
    return labels, (batch, overlap)


def masked_csc(labeller, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """CSC with token t's word pieces masked out of attention and pooling (NaN past the window)."""
    out = []
    with torch.inference_mode():
        for ids in sequences:
            labels, pieces = _labels_and_pieces(labeller, ids)
            out.append(labels)
            if pieces is None:
                continue
            batch, overlap = pieces
            full = labeller.embed_batch(batch)[0]
            embs = []
            for start in range(0, len(ids), labeller.batch_size):
                rows = overlap[start:start + labeller.batch_size]
                mask = np.repeat(batch["attention_mask"], rows.shape[0], axis=0) * (~rows)
                ids_rep = np.repeat(batch["input_ids"], rows.shape[0], axis=0)
                embs.append(labeller.embed_batch({"input_ids": ids_rep, "attention_mask": mask.astype(np.int64)}))
            cos = torch.cat(embs) @ full
            labels[:] = np.maximum(1.0 - cos.double().cpu().numpy(), 0.0)
            labels[~overlap.any(axis=1)] = 0.0  # no word piece (e.g. a lone space): nothing masked
    return out


def gradient_csc(labeller, sequences: Sequence[Sequence[int]], probes: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Second-order gradient sketch of CSC: one forward + backward per text on a batch of `probes` copies."""
    modules = list(labeller.encoder)
    model = modules[0].auto_model
    embed_tokens = model.get_input_embeddings()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for ids in sequences:
        labels, pieces = _labels_and_pieces(labeller, ids)
        out.append(labels)
        if pieces is None:
            continue
        batch, overlap = pieces
        n = batch["input_ids"].shape[1]
        input_ids = torch.from_numpy(batch["input_ids"]).to(labeller.device).repeat(probes, 1)
        mask = torch.from_numpy(batch["attention_mask"]).to(labeller.device).repeat(probes, 1)
        gates = torch.ones((probes, n), dtype=torch.float32, device=labeller.device, requires_grad=True)
        with torch.enable_grad():
            embeds = embed_tokens(input_ids) * gates[..., None]
            hidden = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            feats = {"token_embeddings": hidden, "attention_mask": mask, "input_ids": input_ids}
            for module in modules[1:]:
                feats = module(feats)
            emb = F.normalize(feats["sentence_embedding"], dim=-1)
            r = torch.randn(emb.shape, generator=gen).to(labeller.device)
            (grad,) = torch.autograd.grad((emb * r).sum(), gates)
        # r_j^T J delta_t = -sum of the gradient over token t's pieces
        proj = grad.double().cpu().numpy() @ overlap.T.astype(np.float64)  # [probes, T]
        labels[:] = 0.5 * (proj**2).mean(axis=0)
    return out


def fidelity(exact: Sequence[np.ndarray], approx: Sequence[np.ndarray]) -> dict[str, float]:
    """Spearman rank correlation per sequence (mean, median) and MAE, on tokens labelled by both."""
    if len(exact) != len(approx):
        raise DataError(f"{len(exact)} exact and {len(approx)} approximate sequences: compare the same sequences")
    rhos, errors = [], []
    for e, a in zip(exact, approx):
        ok = np.isfinite(e) & np.isfinite(a)
        if math.isfinite(rho := spearman(e[ok], a[ok])):  # NaN: < 3 tokens or a constant side
            rhos.append(rho)
        errors.append(np.abs(e[ok].astype(np.float64) - a[ok]))
    err = np.concatenate(errors) if errors else np.zeros(0)
    return {
        "spearman_mean": float(np.mean(rhos)) if rhos else float("nan"),
        "spearman_median": float(np.median(rhos)) if rhos else float("nan"),
        "mae": float(err.mean()) if err.size else float("nan"),
        "n_sequences": len(rhos),
        "n_tokens": int(err.size),
    }


def timed(fn, *args, **kwargs) -> tuple[list[np.ndarray], float]:
    """`fn(*args)` and its wall time in seconds."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0
