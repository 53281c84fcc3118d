"""Exactness sweep of the spliced counterfactual word pieces (issue 13) over a whole WikiText-2 split.

Every counterfactual (every GPT-2 position of every text, texts cut as the corpus stage cuts them:
non-empty lines, GPT-2 tokenized, no cap unless --seq-len) is tokenized twice: spliced from the full
text's pieces (`metabolic.csc.splice`) and the full path (`decode(ids without t)`, then the encoder's
tokenizer). Exit 0 when every row is identical id for id and no counterfactual fell back; the
speed of both paths is printed beside.

    PYTHONPATH=lib METABOLIC_ASSETS=../shared/data HF_HUB_OFFLINE=1 python scripts/csc_splice_sweep.py --split validation
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from metabolic.core.assets import load_encoder, load_tokenizer
from metabolic.core.config import AssetsConfig
from metabolic.csc.splice import PieceSplicer
from metabolic.data.corpus import load_corpus, tokenize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="validation", choices=("train", "validation"))
    p.add_argument("--encoder", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--seq-len", type=int, default=None, help="cap each text at this many GPT-2 tokens (default: none)")
    p.add_argument("--texts", type=int, default=None, help="only the first N texts")
    p.add_argument("--chunk", type=int, default=64, help="texts per call")
    args = p.parse_args(argv)

    tok = load_tokenizer(AssetsConfig().tokenizer).value
    enc_tok = load_encoder(args.encoder).value.tokenizer
    corpus = load_corpus(AssetsConfig())
    texts = getattr(corpus, "train" if args.split == "train" else "validation")[: args.texts]
    seqs = [np.asarray(x[: args.seq_len], dtype=np.int64) for x in tokenize(tok, texts)]
    spliced, full = PieceSplicer(tok, enc_tok), PieceSplicer(tok, enc_tok, splice=False)
    rows = mismatched = pieces = 0
    t_splice = t_full = 0.0
    for start in range(0, len(seqs), args.chunk):
        chunk = seqs[start:start + args.chunk]
        positions = [np.arange(s.size) for s in chunk]
        t0 = time.process_time()
        a, owner_a, pos_a = spliced.rows(chunk, positions)
        flat_a = a.flat()
        t1 = time.process_time()
        b, owner_b, pos_b = full.rows(chunk, positions)
        flat_b = b.flat()
        t2 = time.process_time()
        t_splice += t1 - t0
        t_full += t2 - t1
        assert np.array_equal(owner_a, owner_b) and np.array_equal(pos_a, pos_b)
        len_a, len_b = a.lengths, b.lengths
        same = np.array_equal(len_a, len_b) and np.array_equal(flat_a, flat_b)
        if not same:
            bad = [j for j in range(len(owner_a)) if a.row(j) != b.row(j)]
            mismatched += len(bad)
            for j in bad[:3]:
                print(f"MISMATCH text {start + owner_a[j]} position {pos_a[j]}: spliced {a.row(j)} full {b.row(j)}")
        rows += int((pos_a >= 0).sum())
        pieces += int(len_b[pos_b >= 0].sum())
        print(f"\r{start + len(chunk)}/{len(seqs)} texts, {rows:,} counterfactuals, {mismatched} mismatched", end="", file=sys.stderr)
    print(file=sys.stderr)
    c = spliced.counts
    print(f"{args.split}: {len(seqs)} texts, {sum(s.size for s in seqs):,} GPT-2 tokens, {rows:,} counterfactuals "
          f"({pieces:,} word pieces): {mismatched} mismatched, {c.spliced:,} spliced, {c.fallback} fell back {c.reasons or ''}")
    print(f"CPU seconds: spliced {t_splice:.1f} s, full path {t_full:.1f} s (x{t_full / max(t_splice, 1e-9):.1f})")
    return 0 if mismatched == 0 and c.fallback == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
