"""Tokens/s of budgeted generation vs plain `generate()` on the same model, prompts and token count.

Both runs generate exactly `--new-tokens` tokens per prompt (`min_new_tokens` = `max_new_tokens`, and a
budget far above what that many tokens can spend, so the budget criterion is evaluated every step but
never ends a row): the difference is the cost of the steering processor, the stopping criterion and the
budget pathway hook. Plain = the backbone's `generate()` with no processor; budgeted =
`generate_with_budget(steer=True, stop=True)`. The issue's target is a ratio <= 1.10 per token.

    python benchmarks/generation_overhead.py --profile smoke [--device cpu] [--variant expected-cost]
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()

    from metabolic.core.profiles import load_config
    from metabolic.evaluate.scoring import select_prompts
    from metabolic.generate.budgeted import generate_with_budget, plain_generate
    from metabolic.model.calibration import ProxyCalibration
    from metabolic.model.metabolic_gpt2 import MetabolicGPT2
    from metabolic.pipeline import stages

    cfg = load_config(args.profile)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = stages.corpus(cfg).tokenizer
    result = stages.train_metabolic(cfg, args.variant, progress=False)
    model = MetabolicGPT2.from_pretrained(result.best_dir, device=device)
    valid = stages.valid_sequences(cfg, stages.corpus(cfg))
    prompts = (select_prompts(cfg.generation, tok, valid) * args.batch)[: args.batch]
    n = args.new_tokens or cfg.generation.max_new_tokens
    huge = 1e6  # CSC: never reached by n tokens, so every row generates exactly n tokens
    extra = {"min_new_tokens": n}

    def plain():
        return plain_generate(model, tok, prompts, max_new_tokens=n, seed=0, temperature=cfg.generation.temperature,
                              top_k=cfg.generation.top_k, generate_kwargs=extra)

    def budgeted(two_sided: bool = False):
        # Timing does not depend on the calibration; the identity keeps a smoke model with a slope <= 0 usable.
        return generate_with_budget(model, tok, prompts, huge, max_new_tokens=n, steer=True, stop=True, seed=0,
                                    calibration=ProxyCalibration(0.0, 1.0), two_sided=two_sided,
                                    temperature=cfg.generation.temperature, top_k=cfg.generation.top_k,
                                    generate_kwargs=extra)

    gens = budgeted()
    assert all(len(g.generated_ids) == n for g in gens), "budgeted rows ended early: raise the budget"
    # Interleave the two so that load on a shared machine hits both alike.
    # Two budgeted cases: the default one-sided brake, which under budget needs no softmax (exact
    # shortcut), and two-sided steering, which solves lambda_t with a softmax over V at every step
    # (the worst case of the processor's cost).
    plain_t, budget_t, full_t = [], [], []
    plain(), budgeted(), budgeted(True)
    for _ in range(args.repeats):
        plain_t.append(_once(plain, device))
        budget_t.append(_once(budgeted, device))
        full_t.append(_once(lambda: budgeted(True), device))
    tokens = n * len(prompts)
    p, b, f = statistics.median(plain_t), statistics.median(budget_t), statistics.median(full_t)
    print(f"profile={args.profile} device={device} variant={args.variant} batch={len(prompts)} new_tokens={n} "
          f"repeats={args.repeats} torch_threads={torch.get_num_threads()}")
    print(f"plain generate():      {tokens / p:10.1f} tokens/s  (median {p * 1000:.1f} ms per call)")
    print(f"budgeted generation:   {tokens / b:10.1f} tokens/s  (median {b * 1000:.1f} ms per call)")
    print(f"budgeted, two-sided:   {tokens / f:10.1f} tokens/s  (median {f * 1000:.1f} ms per call)")
    print(f"per-token cost ratio budgeted/plain = {b / p:.3f} (default), {f / p:.3f} (two-sided)  (target <= 1.10)")


def _once(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
