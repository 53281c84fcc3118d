"""Seconds per slider move of the budget explorer (notebook 06) in its proxy mode, against plain sampling.

One "slider move" is `BudgetExplorer.render` at a budget level: budget-forced, steered generation on the
learned costs, then the shown text labelled once for its true CSC (a fresh label memo each time, as a
new budget gives a new text). The baseline is plain `generate()` of the same model and prompt for the
same number of tokens (no processor, no labels), measured in the same run. Prints the median of
`--repeats` renders per level (each a new seed) and the ratio to the baseline; the issue's target is a
render within 2 s on 2 CPU cores for the smoke profile.

    python benchmarks/explorer_render.py --profile smoke [--variant expected-cost] [--scale length] [--repeats 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--variant", default="expected-cost")
    parser.add_argument("--scale", default="length", choices=("raw", "length"), help="the budgets' CSC scale (notebook 06's)")
    parser.add_argument("--repeats", type=int, default=10, help="renders per budget level (one seed each)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table printed here to PATH (JSON)")
    args = parser.parse_args()

    from metabolic.core.config import parse_override_strings
    from metabolic.core.profiles import load_config
    from metabolic.generate.budgeted import plain_generate
    from metabolic.generate.verified import PrefixLabeller
    from metabolic.report.explorer import study_explorer

    cfg = load_config(args.profile, parse_override_strings(args.overrides))
    explorer = study_explorer(cfg, args.variant, scale=args.scale).explorer
    prompt = cfg.generation.prompts[0]
    explorer.render(prompt, explorer.budget, explorer.temperature, explorer.max_new_tokens)  # warm-up
    rows = []
    for level, budget in explorer.levels.items():
        render_s, plain_s, tokens = [], [], []
        for seed in range(args.repeats):
            explorer._prefixes = PrefixLabeller(explorer.labeller)  # a new text is labelled anew: no memo
            t0 = time.perf_counter()
            view = explorer.render(prompt, budget, explorer.temperature, explorer.max_new_tokens, seed=seed)
            render_s.append(time.perf_counter() - t0)
            n = max(view.n_tokens, 1)
            t0 = time.perf_counter()
            plain_generate(explorer.model, explorer.tokenizer, [prompt], max_new_tokens=n, seed=seed,
                           generate_kwargs={"min_new_tokens": n})
            plain_s.append(time.perf_counter() - t0)
            tokens.append(view.n_tokens)
        render, plain = statistics.median(render_s), statistics.median(plain_s)
        rows.append({"level": level, "budget_csc": budget, "median_tokens": statistics.median(tokens),
                     "render_s": render, "plain_generate_s": plain, "ratio": render / plain})
    print(f"explorer proxy-mode render ({args.profile} profile, {args.variant}, {args.scale} scale; median of "
          f"{args.repeats} seeds per level)")
    print(f"{'level':<8}{'budget':>9}{'tokens':>8}{'render s':>10}{'plain s':>9}{'ratio':>8}")
    for r in rows:
        print(f"{r['level']:<8}{r['budget_csc']:>9.4f}{r['median_tokens']:>8.1f}{r['render_s']:>10.3f}"
              f"{r['plain_generate_s']:>9.3f}{r['ratio']:>8.2f}")
    worst = max(r["render_s"] for r in rows)
    print(f"slowest level's median render: {worst:.2f} s ({'within' if worst <= 2.0 else 'OVER'} the 2 s target)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"profile": args.profile, "variant": args.variant, "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
