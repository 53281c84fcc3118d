"""Training throughput of MetabolicGPT-2 against the same backbone trained with the plain LM loss.

Both run on the same device, with the same batch (real WikiText-2 texts of the profile's length),
the same optimiser (AdamW), gradient clipping and precision (bf16 autocast on CUDA, fp32 on CPU).
The MetabolicGPT-2 step is the full `metabolic.train.loop.train_step`: all eq. (22) terms, dual ascent
and the online-calibration update. Token values do not change the speed, so the CSC targets here are
a constant 1/T per token (no encoder run) and the backbone keeps whatever weights it loads with.

    python benchmarks/train_overhead.py --profile smoke [--device cpu] [--steps 10] [--variant expected-cost]
        [--profile-trace DIR]

Prints one table row per model (ms/step, tokens/s, ratio to the plain LM step of the same run; issue
target on the GPU: <= 1.15x). The MetabolicGPT-2 steps run as in the training loop: with an
`EpochLedger`, so no step waits for the device (it is settled, one sync, after the timed steps).
`--profile-trace DIR` also profiles one step of each model with torch.profiler and writes
DIR/train_step_<model>.txt (the operator table by self time, CPU and CUDA) and a Chrome trace
DIR/train_step_<model>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--variant", default="both", choices=["faithful", "expected-cost", "both"])
    parser.add_argument("--backbone", default=None,
                        help="a backbone folder; default: the profile's (pretrained by the pipeline if needed)")
    parser.add_argument("--scratch", action="store_true",
                        help="use the profile's architecture with random weights instead (speed does not depend on them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--profile-trace", default=None, metavar="DIR",
                        help="also write torch.profiler tables and traces of one step per model to DIR")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from metabolic.core import resume
    from metabolic.core.config import parse_override_strings
    from metabolic.core.errors import MetabolicError
    from metabolic.core.profiles import load_config
    from metabolic.model.backbone import default_device, load_backbone, scratch_model
    from metabolic.model.metabolic_gpt2 import MetabolicGPT2
    from metabolic.pipeline import stages
    from metabolic.train import loop as training

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

        batch = training.make_batch(texts, labels, totals, device)
        n_tokens = int(batch.mask.sum())
        autocast = resume.autocast(device)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        def timed(step_fn, name: str) -> float:
            for _ in range(args.warmup):
                step_fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step_fn()
            sync()
            seconds = (time.perf_counter() - t0) / args.steps
            if args.profile_trace:
                profile_step(step_fn, name)
            return seconds

        def profile_step(step_fn, name: str) -> None:
            from torch.profiler import ProfilerActivity, profile

            folder = Path(args.profile_trace)
            folder.mkdir(parents=True, exist_ok=True)
            cuda = device.type == "cuda"
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities, record_shapes=True) as prof:
                step_fn()
                sync()
            table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                              row_limit=40)
            (folder / f"train_step_{name}.txt").write_text(table + "\n", encoding="utf-8")
            prof.export_chrome_trace(str(folder / f"train_step_{name}.json"))

        plain = fresh_backbone().train()
        opt = torch.optim.AdamW(plain.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        def plain_step():
            with autocast:
                loss = plain(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
            opt.step()

        plain_s = timed(plain_step, "plain")
        plain = opt = None  # free the plain model before the variants (the closure above is done)
        results = {}
        variants = ("faithful", "expected-cost") if args.variant == "both" else (args.variant,)
        targets = np.full(cfg.train.K, 1.0)
        for variant in variants:
            model = MetabolicGPT2(fresh_backbone(), training.model_settings(cfg.train, variant, 1.0)).train()
            mopt = training.make_optimizer(model, cfg.train)
            vocab_ids, means = training.token_label_means(texts, labels)
            vocab_ids = torch.as_tensor(vocab_ids, device=device)
            means = torch.as_tensor(means, dtype=torch.float32, device=device)
            budgets = training.step_budgets(model, batch, targets, 1.0)
            ledger = training.EpochLedger()

            def metabolic_step(model=model, mopt=mopt, vocab_ids=vocab_ids, means=means, budgets=budgets, ledger=ledger):
                training.train_step(model, mopt, batch, budgets, cfg.train, vocab_ids, means, ledger=ledger)

            results[variant] = timed(metabolic_step, variant)
            ledger.settle(model, cfg.train)  # what the loop does at a refit: the steps must have stayed finite
            del model, mopt
    except MetabolicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"profile={cfg.profile} device={name} batch={batch.ids.shape[0]}x{batch.ids.shape[1]} ({n_tokens} tokens) "
          f"steps={args.steps} (+{args.warmup} warm-up) precision={'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    print(f"{'model':<28}{'step ms':>10}{'tokens/s':>12}{'ratio':>8}")
    print(f"{'GPT-2 plain LM loss':<28}{plain_s * 1e3:>10.1f}{n_tokens / plain_s:>12.0f}{1.0:>8.2f}")
    for variant, seconds in results.items():
        print(f"{'MetabolicGPT-2 ' + variant:<28}{seconds * 1e3:>10.1f}{n_tokens / seconds:>12.0f}{seconds / plain_s:>8.2f}")
    if args.profile_trace:
        print(f"torch.profiler tables and traces of one step per model: {args.profile_trace}/train_step_<model>.txt|.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
