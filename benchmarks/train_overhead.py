"""Training throughput of MetabolicGPT-2 against the same backbone trained with the plain LM loss.

Both run on the same device, with the same batch (real WikiText-2 texts of the profile's length),
the same optimiser (AdamW), gradient clipping and precision (bf16 autocast on CUDA, fp32 on CPU).
The MetabolicGPT-2 step is the full `metabolic.train.step.train_step`: all eq. (22) terms, dual ascent
and the online-calibration update. Token values do not change the speed, so the CSC targets here are
a constant 1/T per token (no encoder run) and the backbone keeps whatever weights it loads with.

    python benchmarks/train_overhead.py --profile smoke [--device cpu] [--steps 10] [--variant expected-cost]
        [--profile-trace DIR]

Prints one table row per model (median ms/step over steps taken round robin, one of each model per
round, so that load on a shared machine hits all alike; tokens/s; ratio to the plain LM step of the
same run; issue target on the GPU: <= 1.15x). The MetabolicGPT-2 steps run as in the training loop: with an
`EpochLedger`, so no step waits for the device (it is settled, one sync, after the timed steps).
`--profile-trace DIR` also profiles one step of each model with torch.profiler and writes
DIR/train_step_<model>.txt (the operator table by self time, CPU and CUDA) and a Chrome trace
DIR/train_step_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (round robin; the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--variant", default="both", choices=["faithful", "expected-cost", "both"])
    parser.add_argument("--backbone", default=None,
                        help="a backbone folder; default: the profile's (pretrained by the pipeline if needed)")
    parser.add_argument("--scratch", action="store_true",
                        help="use the profile's architecture with random weights instead (speed does not depend on them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--profile-trace", default=None, metavar="DIR",
                        help="also write torch.profiler tables and traces of one step per model to DIR")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table printed here to PATH (JSON)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from metabolic.core import resume
    from metabolic.core.profiling import write_profiles
    from metabolic.core.config import parse_override_strings
    from metabolic.core.errors import MetabolicError
    from metabolic.core.profiles import load_config
    from metabolic.model.backbone import default_device, load_backbone, scratch_model
    from metabolic.model.metabolic_gpt2 import MetabolicGPT2
    from metabolic.pipeline import stages
    from metabolic.train import loop as training
    from metabolic.train.data import make_batch, token_label_means
    from metabolic.train.step import EpochLedger, make_optimizer, step_budgets, train_step

    try:
        cfg = load_config(args.profile, parse_override_strings(args.overrides))
        device = torch.device(args.device) if args.device else default_device()
        data = stages.corpus(cfg)
        t = cfg.corpus.seq_len
        texts = [ids[:t] for ids in data.train_ids if len(ids) >= t][: cfg.train.batch_size]
        if len(texts) < cfg.train.batch_size:
            raise MetabolicError(f"fewer than train.batch_size={cfg.train.batch_size} texts have {t} tokens")
        labels = [np.full(t, 1.0 / t, dtype=np.float32) for _ in texts]
        totals = np.ones(len(texts))

        def fresh_backbone():
            torch.manual_seed(cfg.seed)
            if args.scratch:
                tok = data.tokenizer
                model = scratch_model(cfg.backbone, vocab_size=len(tok), n_positions=max(t, cfg.backbone.block_size),
                                      eos_id=tok.eos_token_id)
                return model.to(device)
            path = args.backbone or stages.pretrain_backbone(cfg).path
            return load_backbone(path, device=device)

        batch = make_batch(texts, labels, totals, device)
        n_tokens = int(batch.mask.sum())
        autocast = resume.autocast(device)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        plain = fresh_backbone().train()
        opt = torch.optim.AdamW(plain.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        def plain_step():
            with autocast:
                loss = plain(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
            opt.step()

        steps = {"plain": plain_step}
        ledgers = {}
        variants = ("faithful", "expected-cost") if args.variant == "both" else (args.variant,)
        targets = np.full(cfg.train.K, 1.0)
        vocab_ids, means = token_label_means(texts, labels)
        vocab_ids = torch.as_tensor(vocab_ids, device=device)
        means = torch.as_tensor(means, dtype=torch.float32, device=device)
        for variant in variants:
            model = MetabolicGPT2(fresh_backbone(), training.model_settings(cfg.train, variant, 1.0, mean_label=1.0 / t)).train()
            mopt = make_optimizer(model, cfg.train)
            budgets = step_budgets(model, batch, targets, 1.0)
            ledgers[variant] = (model, EpochLedger())

            def metabolic_step(model=model, mopt=mopt, budgets=budgets, ledger=ledgers[variant][1]):
                train_step(model, mopt, batch, budgets, cfg.train, vocab_ids, means, ledger=ledger)

            steps[variant] = metabolic_step

        # Round robin, one step of each model per round, medians: load on a shared machine hits all alike.
        for fn in steps.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.steps):
            for name, fn in steps.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        for model, ledger in ledgers.values():
            ledger.settle(model, cfg.train)  # what the loop does at a refit: the steps must have stayed finite
        if args.profile_trace:
            write_profiles(args.profile_trace, "train_step", steps, device.type)
        seconds = {name: statistics.median(t) for name, t in times.items()}
    except MetabolicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"profile={cfg.profile} device={name} batch={batch.ids.shape[0]}x{batch.ids.shape[1]} ({n_tokens} tokens) "
          f"steps={args.steps} (+{args.warmup} warm-up) precision={'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    plain_s = seconds["plain"]
    record = {"profile": cfg.profile, "device": name, "batch": list(batch.ids.shape), "tokens": n_tokens, "steps": args.steps,
              "warmup": args.warmup, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "scratch": args.scratch, "target": "MetabolicGPT-2 step / plain LM step <= 1.15", "models": {}}
    print(f"{'model':<28}{'step ms':>10}{'tokens/s':>12}{'ratio':>8}")
    for name, sec in seconds.items():
        label = "GPT-2 plain LM loss" if name == "plain" else "MetabolicGPT-2 " + name
        record["models"][label] = {"step_ms": sec * 1e3, "tokens_per_s": n_tokens / sec, "ratio": sec / plain_s}
        print(f"{label:<28}{sec * 1e3:>10.1f}{n_tokens / sec:>12.0f}{sec / plain_s:>8.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
    if args.profile_trace:
        print(f"torch.profiler tables and traces of one step per model: {args.profile_trace}/train_step_<model>.txt|.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
