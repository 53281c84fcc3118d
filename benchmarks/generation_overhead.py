"""Tokens/s of budgeted generation vs plain `generate()` on the same model, prompts and token count.

Both runs generate exactly `--new-tokens` tokens per prompt (`min_new_tokens` = `max_new_tokens`, and a
budget far above what that many tokens can spend, so the budget criterion is evaluated every step but
never ends a row): the difference is the cost of the steering processor, the stopping criterion and the
budget pathway hook. Plain = the backbone's `generate()` with no processor; budgeted =
`generate_with_budget(steer=True, stop=True)`, with the default one-sided steering and with two-sided
steering. The issue's target is a ratio <= 1.10 per token (default steering).

A second table times the verified controller (`metabolic.generate.verified.generate_verified`, the
labeller in the loop) at the evaluation's settings (`generation.verified_*`, the configured CSC scale,
a fresh label memo per call) for a budget every prompt can reach: the median true CSC of the plain
continuations at half of `verified_max_new_tokens`. It prints seconds per generation beside plain
`generate()` of the same length (`verified_max_new_tokens`, one sample per prompt), and the labels
(encoder texts) the controller needed per generation.

    python benchmarks/generation_overhead.py --profile smoke [--device cpu] [--variant expected-cost]
        [--batch 8] [--candidates 4] [--scratch] [--profile-trace DIR] [--set section.key=value] [--json PATH]

The model is the profile's trained `--variant` (trained by the pipeline if needed), or with `--scratch`
an untrained MetabolicGPT-2 on a randomly initialised backbone of the profile's architecture (speed
does not depend on the weights; nothing but the corpus's tokenizer and the CSC encoder is needed).

`--profile-trace DIR` writes torch.profiler tables (by self time) and Chrome traces of one plain and
one budgeted call to DIR/generate_<mode>.txt|.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--variant", default="expected-cost")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: generation.max_new_tokens")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate() call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=4, help="verified controller: candidates per prompt (0: skip)")
    parser.add_argument("--verified-repeats", type=int, default=1)
    parser.add_argument("--scratch", action="store_true",
                        help="an untrained MetabolicGPT-2 on a random backbone of the profile's architecture")
    parser.add_argument("--profile-trace", default=None, metavar="DIR",
                        help="also write torch.profiler tables and traces of one call per mode to DIR")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the tables printed here to PATH (JSON)")
    args = parser.parse_args()

    from metabolic.core.config import parse_override_strings
    from metabolic.core.profiles import load_config
    from metabolic.core.profiling import write_profiles
    from metabolic.evaluate.scoring import select_prompts
    from metabolic.generate.budgeted import generate_with_budget, plain_generate
    from metabolic.generate.verified import PrefixLabeller, generate_verified
    from metabolic.model.backbone import scratch_model
    from metabolic.core.budget import ProxyCalibration
    from metabolic.model.metabolic_gpt2 import MetabolicGPT2
    from metabolic.pipeline import stages
    from metabolic.train.loop import model_settings

    cfg = load_config(args.profile, parse_override_strings(args.overrides))
    g = cfg.generation
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = stages.corpus(cfg)
    tok = data.tokenizer
    if args.scratch:
        # Scratch weights have no labels: the cost scale s (mean_label) only scales the costs, not the work.
        backbone = scratch_model(cfg.backbone, vocab_size=len(tok), n_positions=_context(cfg), eos_id=tok.eos_token_id)
        model = MetabolicGPT2(backbone.to(device), model_settings(cfg.train, args.variant, 1.0, mean_label=1.0)).eval()
    else:
        model = MetabolicGPT2.from_pretrained(stages.train_metabolic(cfg, args.variant, progress=False).best_dir,
                                              device=device)
    valid = stages.valid_sequences(cfg, data)
    prompts = (select_prompts(g, tok, valid) * args.batch)[: args.batch]
    n = args.new_tokens or g.max_new_tokens
    huge = 1e6  # CSC: never reached by n tokens, so every row generates exactly n tokens

    def plain(length: int = n):
        return plain_generate(model, tok, prompts, max_new_tokens=length, seed=0, temperature=g.temperature,
                              top_k=g.top_k, generate_kwargs={"min_new_tokens": length})

    def budgeted(two_sided: bool = False):
        # Timing does not depend on the calibration; the identity keeps a smoke model with a slope <= 0 usable.
        return generate_with_budget(model, tok, prompts, huge, max_new_tokens=n, steer=True, stop=True, seed=0,
                                    calibration=ProxyCalibration(0.0, 1.0), two_sided=two_sided,
                                    temperature=g.temperature, top_k=g.top_k, generate_kwargs={"min_new_tokens": n})

    gens = budgeted()
    assert all(len(x.generated_ids) == n for x in gens), "budgeted rows ended early: raise the budget"
    # Interleave the modes so that load on a shared machine hits them alike. Default steering is the
    # one-sided brake, which under budget needs no softmax on the CPU (exact shortcut); two-sided
    # steering solves lambda_t with a softmax over V at every step (the processor's worst case).
    modes = {"plain generate()": plain, "budgeted (default steering)": budgeted,
             "budgeted (two-sided steering)": lambda: budgeted(True)}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for fn in modes.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in modes.items():
            times[name].append(_once(fn, device))
    tokens = n * len(prompts)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["plain generate()"]
    record = {"profile": args.profile, "device": _device_name(device), "variant": args.variant, "batch": len(prompts),
              "new_tokens": n, "repeats": args.repeats, "scratch": args.scratch,
              "target": "budgeted (default steering) / plain <= 1.10 per token", "modes": {}}
    print(f"profile={args.profile} device={_device_name(device)} variant={args.variant} batch={len(prompts)} "
          f"new_tokens={n} repeats={args.repeats} (median) torch_threads={torch.get_num_threads()}")
    print(f"{'decoding':<32}{'ms/call':>10}{'tokens/s':>11}{'ratio':>8}")
    for name, seconds in medians.items():
        record["modes"][name] = {"ms_per_call": seconds * 1e3, "tokens_per_s": tokens / seconds, "ratio": seconds / base}
        print(f"{name:<32}{seconds * 1e3:>10.1f}{tokens / seconds:>11.1f}{seconds / base:>8.3f}")
    print("target: budgeted (default steering) / plain <= 1.10 per token")
    _write_json(args.json, record)  # now, so a cut run keeps this table; again below with the verified rows

    if args.profile_trace:
        write_profiles(args.profile_trace, "generate", {"plain": plain, "budgeted": budgeted, "two_sided": lambda: budgeted(True)},
                       device)
        print(f"torch.profiler tables and traces of one call per mode: {args.profile_trace}/generate_<mode>.txt|.json")

    if args.candidates > 0:
        scale = cfg.csc.scale
        labeller = stages.csc_labeller(cfg, device=device)
        length = g.verified_max_new_tokens
        half = length // 2
        out = plain(half)
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = out.shape[1] - half  # left-padded prompts: the continuation starts at the same column
        totals, _ = PrefixLabeller(labeller).totals([(p, row[width:].tolist()) for p, row in zip(prompt_ids, out)], scale)
        budget = statistics.median(totals)
        rate_hint = budget / half

        def verified():
            return generate_verified(model, tok, labeller, prompts, budget, n_candidates=args.candidates,
                                     band=g.verified_band, max_new_tokens=length, scale=scale, rate_hint=rate_hint,
                                     max_probes=g.verified_max_probes, temperature=g.temperature, top_k=g.top_k, seed=0,
                                     prefixes=PrefixLabeller(labeller))  # a fresh memo: every label is paid for

        verified(), plain(length)  # warm-up
        v_t, p_t, labels = [], [], []
        for _ in range(args.verified_repeats):
            p_t.append(_once(lambda: plain(length), device))
            t0 = time.perf_counter()
            out = verified()
            _sync(device)
            v_t.append(time.perf_counter() - t0)
            labels.extend(x.labels for x in out)
        v, p = statistics.median(v_t), statistics.median(p_t)
        per = len(prompts)
        print(f"\nverified controller: {args.candidates} candidates/prompt, scale={scale}, budget={budget:.4g} CSC, "
              f"max_new_tokens={length}, band={g.verified_band}, batch={per}, repeats={args.verified_repeats}")
        print(f"{'decoding':<32}{'s/generation':>13}{'ratio':>8}{'labels/gen':>12}")
        print(f"{'plain generate() (same length)':<32}{p / per:>13.3f}{1.0:>8.2f}{'-':>12}")
        print(f"{'verified controller':<32}{v / per:>13.3f}{v / p:>8.2f}{statistics.mean(labels):>12.1f}")
        record["verified"] = {"candidates": args.candidates, "scale": scale, "budget_csc": budget, "max_new_tokens": length,
                              "band": g.verified_band, "batch": per, "repeats": args.verified_repeats,
                              "plain_s_per_generation": p / per, "verified_s_per_generation": v / per, "ratio": v / p,
                              "labels_per_generation": statistics.mean(labels)}
        _write_json(args.json, record)


def _write_json(path, record) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)


def _context(cfg) -> int:
    """Positions a scratch backbone needs: the profile's block, or a prompt plus the longest generation."""
    return max(cfg.backbone.block_size, cfg.generation.prompt_tokens + cfg.generation.verified_max_new_tokens)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
