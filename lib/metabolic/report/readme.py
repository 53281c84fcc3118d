"""The README's results block, written from committed result files so that no number in it can drift.

`python -m metabolic.report.readme` rewrites the text between `BEGIN` and `END` in README.md from the
`cpu` profile's committed run (`results/budgets/cpu-*/`: `tables.json`, `summary.json`); `--check` exits
1 when the README's block differs from what the files give (a test runs it). Every number in the block
is read from those files; the prose around it states none.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from metabolic.core.artefacts import atomic_write_text, project_root, read_json
from metabolic.report import gpu_results, table1

BEGIN = "<!-- results:begin (python -m metabolic.report.readme writes this block from results/; do not edit) -->"
END = "<!-- results:end -->"


def _markdown(rows: Sequence[dict[str, Any]], digits: int = 3) -> list[str]:
    """A markdown table of `rows` (their keys as columns); floats rounded to `digits`."""
    if not rows:
        return []
    cols = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - 2, 1)}f}"
        return str(v)

    return (["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
            + ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows])


def cpu_block(folder: Path) -> list[str]:
    """The block's lines for one committed cpu-profile run."""
    summary, combined = read_json(folder / gpu_results.SUMMARY), read_json(folder / "tables.json")
    pretrain = summary.get("pretrain", {})
    n = len(combined["prompts"]) * combined.get("samples_per_prompt", 1)
    out = [f"**The `cpu` profile's committed run** (`{folder.relative_to(folder.parents[2])}`, "
           f"{summary.get('device_name', folder.name)}, {summary['elapsed_s'] / 60:.0f} min, `{summary['command']}`):",
           "",
           f"- Backbone: {pretrain.get('steps')} pretraining steps, validation perplexity {pretrain.get('val_ppl', math.nan):.0f}.",
           f"- Budgets (CSC, {next(iter(table1.tables_of(combined, 'model').values()))['csc_scale']} scale): "
           + ", ".join(f"{k} {v:.4f}" for k, v in table1.in_level_order(combined["budgets"]).items())
           + f", from {combined['budget_source']}.",
           f"- {len(combined['prompts'])} prompts x {combined.get('samples_per_prompt', 1)} samples = {n} generations "
           "per level and table; Hit@10 in true CSC with [Wilson 95% intervals].", ""]
    out += ["Proxy decodings (budget forcing + budget stop on the learned C_vocab):", ""]
    out += _markdown([{"table": key, **{k: v for k, v in row.items() if k in ("level", "Hit@10 [95% CI]", "tokens", "on budget %")}}
                      for key, t in table1.tables_of(combined, "model").items() for row in table1.proxy_rows(t)])
    summary = table1.stop_summary(combined)
    out += ["", summary] if summary else []
    ceiling = table1.proxy_against_ceiling(combined)
    if ceiling:
        out += ["", "Against the open-loop ceiling (one stop length per level, fitted on training text, scored on held-out text):", ""]
        out += _markdown(ceiling)
    for scale in combined["verified_budgets"]:
        out += ["", f"The verified controller against label-free rules on its own candidates ({scale} scale; smallest N "
                f"with Hit@10 >= 95% at every level: {table1.smallest_hitting_n(combined, scale)}):", ""]
        out += _markdown([{k: v for k, v in r.items() if k != "same-length plain ppl"}
                          for r in table1.controller_rows(combined, scale)])
    for scale, rules in combined.get("stop_rules", {}).items():
        out += ["", f"Stop rules on fixed held-out text ({rules['n_held_out']} continuations, {scale} scale):", ""]
        out += _markdown([{k: v for k, v in r.items() if not k.startswith("tokens")} for r in table1.stop_rule_rows(rules)])
    beside = table1.rules_on_text_and_generations(combined)
    if beside:
        out += ["", "Each stop rule on fixed held-out text beside the same rule on generated text (Hit@10 [95% CI]):", ""]
        out += _markdown(beside)
    for paragraph in table1.cost_model_conclusion(combined):
        out += ["", paragraph]
    return out


def results_block(root: Optional[Path] = None) -> str:
    """The whole block, markers included, from the committed cpu-profile runs under `root/results`."""
    base = Path(root) if root is not None else project_root()
    folders = [Path(s["folder"]) for s in gpu_results.committed("budgets", base / "results", profile="cpu")]
    lines = [BEGIN, ""]
    for folder in folders:
        lines += cpu_block(folder) + [""]
    if not folders:
        lines += [gpu_results.missing("budgets", profile="cpu"), ""]
    return "\n".join(lines + [END])


def replace_block(text: str, block: str) -> str:
    """`text` with the block between the markers replaced; a README without the markers is an error."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no results block: add the lines {BEGIN!r} and {END!r} where it belongs")
    return text[:start] + block + text[end + len(END):]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's block is stale; write nothing")
    parser.add_argument("--root", type=Path, default=None, help="the repository (default: this checkout)")
    args = parser.parse_args(argv)
    root = args.root or project_root()
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = replace_block(text, results_block(root))
    if args.check:
        if new != text:
            print(f"{readme}: the results block is stale: run python -m metabolic.report.readme", file=sys.stderr)
            return 1
        return 0
    if new != text:
        atomic_write_text(readme, new)
        print(f"{readme}: results block rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
