"""CSC labelling throughput: this labeller against the naive baseline, on the same sequences.

Naive baseline (issue 3): `SentenceTransformer.encode` on the list of counterfactual strings (and the
full texts) with default settings in fp32, then cosine distances. Its window is raised to the
encoder's 512 positions like the labeller's, so both compute the same labels (the default 256 would
truncate 256-token texts). `--full-path` adds the labeller as it was before issue 13 (every
counterfactual decoded and tokenized, `splice=False`) on the same sequences.

Prints, per method: labels/s, CPU seconds per label (process CPU time: all threads, the tokenizers'
included), the ratio to naive (and to the full path), mean and max |label difference| against fp32,
and on CUDA the fraction of the GPU's fp16 tensor peak reached (encoder FLOPs counted from the
unpadded word-piece lengths, `metabolic.csc.labeller.flops_per_text`).

`--tokens 256`: the issue-13 mode, training texts of at least 256 GPT-2 tokens cut to exactly 256
(every position labelled) instead of the profile's selection.

    python benchmarks/csc_throughput.py --profile smoke --device cpu --full-path        # minutes here
    python benchmarks/csc_throughput.py --device cpu --tokens 256 --sequences 4 --full-path
    python benchmarks/csc_throughput.py --profile gpu --device cuda --tokens 256 --sequences 2000 --full-path
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--tokens", type=int, default=None,
                   help="texts of exactly this many GPT-2 tokens (training texts at least this long, cut) instead of the profile's")
    p.add_argument("--full-path", action="store_true",
                   help="also time the fp32 labeller without splicing (decode + tokenize every counterfactual, as before issue 13)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers printed here to PATH (JSON)")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def naive_labels(encoder, tokenizer, sequences) -> tuple[list[np.ndarray], float, float]:
    """The baseline: decode every counterfactual, `encode` them all (default settings), cosine distance."""
    texts, owner = [], []
    for i, ids in enumerate(sequences):
        texts.append(tokenizer.decode(ids))
        texts += [tokenizer.decode(ids[:t] + ids[t + 1:]) for t in range(len(ids))]
        owner.append(len(ids))
    _sync(str(encoder.device))
    t0, c0 = time.perf_counter(), time.process_time()
    emb = encoder.encode(texts, convert_to_numpy=True)
    _sync(str(encoder.device))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    out, start = [], 0
    for n in owner:
        full, cf = emb[start], emb[start + 1:start + 1 + n]
        out.append(np.maximum(1.0 - cf @ full, 0.0).astype(np.float32))
        start += 1 + n
    return out, elapsed, cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    logging.basicConfig(level=logging.WARNING)
    from metabolic.core.profiles import load_config
    from metabolic.csc.labeller import CSCLabeller, flops_per_text
    from metabolic.data.corpus import select_sequences
    from metabolic.pipeline import stage, stages

    cfg = load_config(args.profile)
    cuda = args.device.startswith("cuda")
    n_seq = args.sequences or (cfg.csc.max_sequences if cuda else 4)
    precisions = (args.precisions or ("fp32,tf32,fp16" if cuda else "fp32")).split(",")
    batch = args.batch_size or cfg.csc.batch_size
    data = stages.corpus(cfg)
    if args.tokens:
        sequences = select_sequences(data.train_ids, n_seq, args.tokens, args.tokens, cfg.corpus.seed)
    else:
        sequences, _ = stages.select_for_labelling(cfg, data)
    sequences = sequences[:n_seq]
    n_labels = sum(len(s) for s in sequences)
    encoder = stage.encoder(cfg.assets.encoder, args.device)
    tok = data.tokenizer
    print(f"device {args.device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} CPU threads'}), "
          f"profile {args.profile}{f', texts of {args.tokens} tokens' if args.tokens else ''}: {len(sequences)} sequences, "
          f"{n_labels} labels, mean {n_labels / len(sequences):.0f} tokens/sequence, labeller batch {batch}")

    labellers = {f"labeller {p}": CSCLabeller(encoder, tok, device=args.device, precision=p, batch_size=batch) for p in precisions}
    if args.full_path:
        labellers["labeller fp32 full path"] = CSCLabeller(encoder, tok, device=args.device, batch_size=batch, splice=False)
    first = next(iter(labellers.values()))
    if cuda:  # warm-up: kernels, allocator, cuBLAS handles
        for lab in labellers.values():
            lab.label(sequences[: max(1, len(sequences) // 20)], progress=False)
    # Alternate the methods and keep each one's fastest run: on a shared machine the load drifts.
    results: dict[str, tuple] = {}
    if not args.skip_naive:
        encoder.max_seq_length = first.window  # same window as the labeller: same labels
    for _ in range(max(1, args.repeats)):
        for name, lab in labellers.items():
            lab.stats.update(texts=0, labels=0, word_pieces=0, padded_word_pieces=0)
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            labels = lab.label(sequences, progress=False)
            _sync(args.device)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if name not in results or elapsed < results[name][1]:
                results[name] = (labels, elapsed, cpu, dict(lab.stats))
        if not args.skip_naive:
            labels, elapsed, cpu = naive_labels(encoder, tok, sequences)
            if "naive" not in results or elapsed < results["naive"][1]:
                results["naive"] = (labels, elapsed, cpu, None)

    ref = np.concatenate(results["labeller fp32"][0]) if "labeller fp32" in results else None
    cfg_model = encoder[0].auto_model.config
    rows, _, _ = first.splicer.rows([np.asarray(x, dtype=np.int64) for x in sequences],
                                    [np.arange(len(x)) for x in sequences])
    pieces = rows.lengths
    flops = float(flops_per_text(cfg_model.num_hidden_layers, cfg_model.hidden_size, cfg_model.intermediate_size, pieces).sum())
    print(f"encoder FLOPs for all texts (unpadded): {flops / 1e12:.3f} TFLOP, {flops / pieces.size / 1e9:.2f} GFLOP/text, "
          f"mean {pieces.mean():.0f} word pieces/text")
    counts = first.splicer.counts
    print(f"counterfactual word pieces: {counts.spliced} spliced, {counts.fallback} by the full path {counts.reasons or ''}")

    record = {"device": args.device, "device_name": torch.cuda.get_device_name() if cuda else "cpu", "profile": args.profile,
              "tokens": args.tokens, "n_sequences": len(sequences), "n_labels": n_labels, "batch_size": batch,
              "encoder_tflop": flops / 1e12, "methods": {}, "ratios": {}}
    for name, (labels, elapsed, cpu, st) in results.items():
        flat = np.concatenate(labels)
        row = record["methods"][name] = {"labels_per_s": n_labels / elapsed, "seconds": elapsed,
                                         "cpu_ms_per_label": cpu / n_labels * 1e3}
        line = (f"{name}: {n_labels / elapsed:,.1f} labels/s ({elapsed:.2f} s), "
                f"{cpu / n_labels * 1e3:.3f} CPU ms/label ({cpu:.1f} CPU s)")
        if st is not None:
            line += (f", {st['texts'] / elapsed:,.1f} texts/s, "
                     f"padding overhead {st['padded_word_pieces'] / max(st['word_pieces'], 1) - 1:.1%}")
        if ref is not None and name != "labeller fp32":
            d = np.abs(flat - ref)
            row.update(mean_abs_diff_vs_fp32=float(np.nanmean(d)), max_abs_diff_vs_fp32=float(np.nanmax(d)))
            line += f"; vs labeller fp32: mean |diff| {np.nanmean(d):.2e}, max |diff| {np.nanmax(d):.2e}"
        if cuda:
            row["tflop_per_s"] = flops / elapsed / 1e12
            line += f"; {flops / elapsed / 1e12:.1f} TFLOP/s = {flops / elapsed / (args.peak_tflops * 1e12):.1%} of the {args.peak_tflops:g} TFLOP/s fp16 peak"
        print(line)
    # The work around the encoder alone (decode, tokenize or splice, batch assembly): what issue 13 changes.
    for name, lab in labellers.items():
        if name in ("labeller fp32", "labeller fp32 full path"):
            best = min(_planning_cpu_s(lab, sequences) for _ in range(max(1, args.repeats)))
            print(f"{name}, without the encoder: {best / n_labels * 1e6:,.1f} CPU us/label ({best:.2f} CPU s)")
    for base in ("naive", "labeller fp32 full path"):
        if base in results:
            t_base = results[base][1]
            for name, (_, t, _, _) in results.items():
                if name != base and name.startswith("labeller") and not name.endswith("full path"):
                    record["ratios"][f"{name} / {base}"] = t_base / t
                    print(f"ratio {name} / {base}: {t_base / t:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
    return 0


def _planning_cpu_s(labeller, sequences) -> float:
    c0 = time.process_time()
    for _ in labeller.iter_batches(sequences):
        pass
    return time.process_time() - c0


if __name__ == "__main__":
    sys.exit(main())
