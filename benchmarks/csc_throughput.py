"""CSC labelling throughput: this labeller against the naive baseline, on the same sequences.

Naive baseline (issue 3): `SentenceTransformer.encode` on the list of counterfactual strings (and the
full texts) with default settings in fp32, then cosine distances. Its window is raised to the
encoder's 512 positions like the labeller's, so both compute the same labels (the default 256 would
truncate 256-token texts). Prints labels/s of both, their ratio, mean and max |label difference|
against fp32, and on CUDA the fraction of the GPU's fp16 tensor peak reached (encoder FLOPs counted
from the unpadded word-piece lengths, `metabolic.csc.labeller.flops_per_text`).

    python benchmarks/csc_throughput.py --profile smoke --device cpu            # about a minute here
    python benchmarks/csc_throughput.py --profile gpu --device cuda --sequences 2000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

# H100 SXM dense fp16 tensor peak as quoted in issue 3 (~790 TFLOP/s); pass --peak-tflops for another GPU.
DEFAULT_PEAK_TFLOPS = 790.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="smoke")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sequences", type=int, default=None,
                   help="sequences to label (default: the profile's csc.max_sequences on CUDA, 4 on CPU)")
    p.add_argument("--precisions", default=None, help="comma list (default: fp32,tf32,fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="labeller batch (default: the profile's csc.batch_size)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="fp16 dense tensor peak of the GPU")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each method, alternating; the fastest counts")
    p.add_argument("--skip-naive", action="store_true", help="labeller only (e.g. when the baseline takes too long)")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def naive_labels(encoder, tokenizer, sequences) -> tuple[list[np.ndarray], float]:
    """The baseline: decode every counterfactual, `encode` them all (default settings), cosine distance."""
    texts, owner = [], []
    for i, ids in enumerate(sequences):
        texts.append(tokenizer.decode(ids))
        texts += [tokenizer.decode(ids[:t] + ids[t + 1:]) for t in range(len(ids))]
        owner.append(len(ids))
    _sync(str(encoder.device))
    t0 = time.perf_counter()
    emb = encoder.encode(texts, convert_to_numpy=True)
    _sync(str(encoder.device))
    elapsed = time.perf_counter() - t0
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    out, start = [], 0
    for n in owner:
        full, cf = emb[start], emb[start + 1:start + 1 + n]
        out.append(np.maximum(1.0 - cf @ full, 0.0).astype(np.float32))
        start += 1 + n
    return out, elapsed


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    logging.basicConfig(level=logging.WARNING)
    from metabolic.core.profiles import load_config
    from metabolic.csc.labeller import CSCLabeller, flops_per_text
    from metabolic.pipeline import stages

    cfg = load_config(args.profile)
    cuda = args.device.startswith("cuda")
    n_seq = args.sequences or (cfg.csc.max_sequences if cuda else 4)
    precisions = (args.precisions or ("fp32,tf32,fp16" if cuda else "fp32")).split(",")
    batch = args.batch_size or cfg.csc.batch_size
    data = stages.corpus(cfg)
    sequences, _ = stages.select_for_labelling(cfg, data)
    sequences = sequences[:n_seq]
    n_labels = sum(len(s) for s in sequences)
    encoder = stages._encoder(cfg.assets.encoder, args.device)
    tok = data.tokenizer
    print(f"device {args.device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} CPU threads'}), "
          f"profile {args.profile}: {len(sequences)} sequences, {n_labels} labels, "
          f"mean {n_labels / len(sequences):.0f} tokens/sequence, labeller batch {batch}")

    labellers = {p: CSCLabeller(encoder, tok, device=args.device, precision=p, batch_size=batch) for p in precisions}
    if cuda:  # warm-up: kernels, allocator, cuBLAS handles
        for lab in labellers.values():
            lab.label(sequences[: max(1, len(sequences) // 20)], progress=False)
    # Alternate the methods and keep each one's fastest run: on a shared machine the load drifts.
    results: dict[str, tuple] = {}
    naive = None
    if not args.skip_naive:
        encoder.max_seq_length = labellers[precisions[0]].window  # same window as the labeller: same labels
    for _ in range(max(1, args.repeats)):
        for p, lab in labellers.items():
            lab.stats.update(texts=0, labels=0, word_pieces=0, padded_word_pieces=0)
            _sync(args.device)
            t0 = time.perf_counter()
            labels = lab.label(sequences, progress=False)
            _sync(args.device)
            elapsed = time.perf_counter() - t0
            if p not in results or elapsed < results[p][1]:
                results[p] = (labels, elapsed, dict(lab.stats))
        if not args.skip_naive:
            run = naive_labels(encoder, tok, sequences)
            if naive is None or run[1] < naive[1]:
                naive = run

    ref = np.concatenate(results["fp32"][0]) if "fp32" in results else None
    cfg_model = encoder[0].auto_model.config
    pieces = _piece_lengths(labellers[precisions[0]], tok, sequences)
    flops = float(flops_per_text(cfg_model.num_hidden_layers, cfg_model.hidden_size, cfg_model.intermediate_size, pieces).sum())
    print(f"encoder FLOPs for all texts (unpadded): {flops / 1e12:.3f} TFLOP, {flops / pieces.size / 1e9:.2f} GFLOP/text, "
          f"mean {pieces.mean():.0f} word pieces/text")

    for p, (labels, elapsed, st) in results.items():
        flat = np.concatenate(labels)
        line = (f"labeller {p}: {n_labels / elapsed:,.1f} labels/s ({st['texts'] / elapsed:,.1f} texts/s, {elapsed:.2f} s), "
                f"padding overhead {st['padded_word_pieces'] / max(st['word_pieces'], 1) - 1:.1%}")
        if ref is not None and p != "fp32":
            d = np.abs(flat - ref)
            line += f"; vs fp32: mean |diff| {np.nanmean(d):.2e}, max |diff| {np.nanmax(d):.2e}"
        if cuda:
            line += f"; {flops / elapsed / 1e12:.1f} TFLOP/s = {flops / elapsed / (args.peak_tflops * 1e12):.1%} of the {args.peak_tflops:g} TFLOP/s fp16 peak"
        print(line)

    if naive is not None:
        labels, elapsed = naive
        flat = np.concatenate(labels)
        print(f"naive SentenceTransformer.encode fp32: {n_labels / elapsed:,.1f} labels/s ({elapsed:.2f} s)")
        if ref is not None:
            d = np.abs(flat - ref)
            print(f"naive vs labeller fp32: mean |diff| {d.mean():.2e}, max |diff| {d.max():.2e}")
        for p, (_, t_lab, _) in results.items():
            print(f"ratio labeller {p} / naive: {elapsed / t_lab:.2f}x")
    return 0


def _piece_lengths(labeller, tok, sequences) -> np.ndarray:
    lengths = []
    for ids in sequences:
        texts = [tok.decode(ids)] + labeller.counterfactual_texts(ids)
        lengths += labeller.piece_lengths(texts)
    return np.asarray(lengths)


if __name__ == "__main__":
    sys.exit(main())
