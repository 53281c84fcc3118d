"""The study's GPU results in the repository, `results/<part>/<gpu>/`, as `scripts/gpu_results.sh` writes them.

One device call of at most 9 minutes measures four parts in order, each kept the moment it ends (a
call cut short keeps what it measured):

| part | folder | what |
| --- | --- | --- |
| `budgets` | `results/budgets/<gpu>/` | the `gpu` profile from the corpus to the evaluation: Table I, the verified controller for N = 1, 2, 4, 8, judge perplexity, labels and seconds per generation, the cost model's Spearman and R² |
| `csc_throughput` | `results/csc_throughput/<gpu>/` | the CSC labeller against naive `SentenceTransformer.encode` on the same texts |
| `etokens` | `results/etokens/<gpu>/` | a slice of the e-token grid (`rows.jsonl`); `scripts/gpu_etokens.sh` measures the rest in later calls |
| `overhead` | `results/overhead/<gpu>/` | the MetabolicGPT-2 training step and budgeted decoding against their plain baselines |

Every folder holds `summary.json`: the part's status (`complete`, `cut at its cap`, `failed (exit N)`),
its seconds and cap, the settings it ran with, and its numbers in named lists of rows (`summarise`
writes it from the part's files; the script calls `python -m metabolic.report.gpu_results summarise`).
Notebooks read them with `overview(part)` (a status line per GPU run, or `missing(part)` when there
is none) and `rows(part, key)`. Standard library and `core.artefacts` only: the script calls this between parts, quickly.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from metabolic.core.artefacts import atomic_write_json, atomic_write_text, project_root, read_json

PARTS = ("budgets", "csc_throughput", "etokens", "overhead")
SUMMARY = "summary.json"
COMMAND = "bash scripts/gpu_results.sh"
DEVICE_CALL = 'run(command="bash scripts/gpu_results.sh", carry=[".assets"], timeout_s=600)'
STAGE_DONE = re.compile(r"stage (\w+) done in ([0-9.]+) s")


def results_root(root: Optional[Path] = None) -> Path:
    """`results/` of the repository (or `root`)."""
    return Path(root) if root is not None else project_root() / "results"


def gpu_folders(part: str, root: Optional[Path] = None) -> list[Path]:
    """The `results/<part>/<gpu>/` folders that hold a `summary.json`, sorted by name."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}: choose among {', '.join(PARTS)}")
    base = results_root(root) / part
    return sorted(p.parent for p in base.glob(f"*/{SUMMARY}")) if base.is_dir() else []


def committed(part: str, root: Optional[Path] = None, profile: Optional[str] = None) -> list[dict[str, Any]]:
    """Each GPU folder's summary, with `gpu` (the folder's name) and `folder` added; with `profile`, only the
    runs of that profile (the `cpu` profile's committed CPU run, scripts/cpu_budgets.sh, sits beside them)."""
    found = [{**read_json(f / SUMMARY), "gpu": f.name, "folder": str(f)} for f in gpu_folders(part, root)]
    return [s for s in found if profile is None or s.get("profile") == profile]


LEAD = ("gpu", "table", "variant", "method", "model", "mode")  # a row's naming fields first, the numbers after


def rows(part: str, key: str, root: Optional[Path] = None, profile: Optional[str] = None) -> list[dict[str, Any]]:
    """The rows under `key` of every GPU folder's summary (e.g. `rows("budgets", "tables")`), each with its
    `gpu`, naming fields first (`LEAD`); `profile` as in `committed`."""
    out = [{"gpu": s["gpu"], **row} for s in committed(part, root, profile) for row in s.get(key, [])]
    return [{k: r[k] for k in LEAD if k in r} | {k: v for k, v in r.items() if k not in LEAD} for r in out]


CPU_COMMAND = "bash scripts/cpu_budgets.sh"  # the cpu profile's budget run, on any CPU


def missing(part: str, profile: Optional[str] = None) -> str:
    """What a notebook prints when no folder of `part` (of `profile`, if given) is committed."""
    if profile == "cpu":
        return f"no cpu-profile run committed yet under results/{part}/ (command: {CPU_COMMAND})"
    return (f"no GPU results committed yet under results/{part}/ (command: {COMMAND}; with the device tool "
            f"{DEVICE_CALL}; see results/{part}/README.md)")


def overview(part: str, root: Optional[Path] = None, profile: Optional[str] = None) -> str:
    """What a notebook prints first about a part: one status line per committed GPU run, or `missing(part)`."""
    found = committed(part, root, profile)
    return "\n".join(f"{part} on {status_line(s)}" for s in found) if found else missing(part, profile)


def status_line(summary: dict[str, Any]) -> str:
    """One line on a part's run: GPU, status, seconds against the cap, and the settings that differ."""
    cap = f" (cap {summary['cap_s']:.0f} s)" if summary["cap_s"] > 0 else ""
    line = (f"{summary.get('device_name') or summary['gpu']}: {summary['status']} after {summary['elapsed_s']:.0f} s"
            f"{cap}, profile {summary['profile']}")
    return line + (f" with {', '.join(summary['overrides'])}" if summary.get("overrides") else "")


# --- summaries, one per part (read from the files the script put in the part's folder) ---------------


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _maybe(path: Path) -> Optional[dict[str, Any]]:
    return read_json(path) if path.is_file() else None


def _stage_seconds(folder: Path) -> dict[str, float]:
    """Seconds per finished stage: `run_timings.json` of a whole run, else the log's 'stage X done' lines."""
    timings = _maybe(folder / "run_timings.json")
    if timings is not None:
        return dict(timings["stages_s"])
    log = folder / "log.txt"
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    return {name: float(s) for name, s in STAGE_DONE.findall(text)}


def budget_table_rows(tables: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per Table I table of the evaluation (`tables.json`'s `tables`): Hit@10 per level, the
    average MAE, the judge perplexity's change, labels and seconds per generation, whether the goal is met."""
    out = []
    for key, t in tables.items():
        row = {"table": key, "variant": t["variant"], "decoding": t["decoding"], "scale": t["csc_scale"],
               "n_candidates": t.get("n_candidates"), "n_prompts": t["n_prompts"]}
        row.update({f"hit10_{r['level']}": r["csc"]["Hit@10"] for r in t["rows"]})
        row.update(average_mae_csc=t["average_MAE_csc"], judge_ppl_rel_change=t["goal"]["judge_ppl_rel_change"],
                   labels_per_generation=t.get("labels_per_generation"),
                   seconds_per_generation=t.get("seconds_per_generation"), goal_met=t["goal"]["met"])
        out.append(row)
    return out


def _training_rows(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("train_*_metrics.jsonl")):
        variant = path.name[len("train_"):-len("_metrics.jsonl")]
        metrics = _jsonl(path)
        if not metrics:
            continue
        selection = _maybe(folder / f"train_{variant}_selection.json") or {}
        best = selection.get("best_epoch")
        chosen = metrics[best - 1] if best and 0 < best <= len(metrics) else metrics[-1]
        out.append({"variant": variant, "epochs": len(metrics), "finished": bool(selection), "best_epoch": best,
                    "reference_ppl": selection.get("reference_ppl"), "val_ppl": chosen.get("val_ppl"),
                    "val_level_rel_err": chosen.get("val_level_rel_err"), "lambda": chosen.get("lambda"),
                    "calib_b": metrics[-1].get("calib_b")})
    return out


def summarise_budgets(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"stages_s": _stage_seconds(folder)}
    pretrain = _jsonl(folder / "pretrain_metrics.jsonl")
    backbone = _maybe(folder / "backbone_manifest.json") or {}
    if pretrain:
        out["pretrain"] = {"steps": pretrain[-1].get("step"), "val_ppl": pretrain[-1].get("val_ppl"),
                           "finished": bool(backbone), "wall_s": backbone.get("wall_s")}
    csc = _maybe(folder / "csc_manifest.json")
    if csc is not None:
        out["csc_stage"] = {k: csc.get(k) for k in ("n_train", "n_valid", "n_labels", "token_mean", "raw_total_mean")}
        out["csc_stage"]["seconds"] = out["stages_s"].get("csc")
    out["training"] = _training_rows(folder)
    tables = _maybe(folder / "tables.json")
    if tables is not None:
        out["tables"] = budget_table_rows(tables["tables"])
        out["cost_model"] = [{"variant": t["variant"], **t["cost_model"]} for key, t in tables["tables"].items()
                             if "cost_model" in t and t["decoding"] == "plain"]
        ceiling = tables.get("cost_model_ceiling") or {}  # the simple predictors the learned costs are read against
        out["cost_model_ceiling"] = [{"variant": name, **{k: v for k, v in fit.items() if isinstance(v, (int, float))}}
                                     for name, fit in ceiling.items() if name != "ceiling"]
        out.update(budgets=tables["budgets"], verified_budgets=tables["verified_budgets"], n_prompts=len(tables["prompts"]))
    return out


def summarise_csc_throughput(folder: Path) -> dict[str, Any]:
    runs = sorted((read_json(p) for p in folder.glob("csc_throughput-*.json")), key=lambda r: r["n_sequences"])
    out: dict[str, Any] = {"runs": [{k: r[k] for k in ("n_sequences", "n_labels", "tokens", "batch_size")} | {"ratios": r["ratios"]}
                                    for r in runs]}
    if runs:
        largest = runs[-1]
        naive = largest["methods"].get("naive", {}).get("seconds")
        out["largest"] = {k: largest[k] for k in ("n_sequences", "n_labels", "tokens", "device_name")}
        out["methods"] = [{"method": name, **m, "ratio_vs_naive": naive / m["seconds"] if naive else None}
                          for name, m in largest["methods"].items()]
    return out


def summarise_etokens(folder: Path) -> dict[str, Any]:
    measured = _jsonl(folder / "rows.jsonl")
    cells = sorted({(r["model"], r["path"], r["task"], r["batch_size"]) for r in measured})
    machine = _maybe(folder / "machine.json")
    return {"n_rows": len(measured), "grid_complete": machine is not None,
            "cells": [{"model": m, "path": p, "task": t, "batch_size": b} for m, p, t, b in cells],
            "gpu_name": next((r.get("gpu_name") for r in measured if r.get("gpu_name")), None)}


def summarise_overhead(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    train = _maybe(folder / "train_overhead.json")
    if train is not None:
        out["train"] = [{"model": name, **m} for name, m in train["models"].items()]
        out["train_setup"] = {k: train[k] for k in ("device", "batch", "tokens", "steps", "precision", "target")}
    gen = _maybe(folder / "generation_overhead.json")
    if gen is not None:
        out["generation"] = [{"mode": name, **m} for name, m in gen["modes"].items()]
        out["generation_setup"] = {k: gen[k] for k in ("device", "batch", "new_tokens", "repeats", "target")}
        if "verified" in gen:
            out["verified"] = [gen["verified"]]
    return out


SUMMARISERS = {"budgets": summarise_budgets, "csc_throughput": summarise_csc_throughput,
               "etokens": summarise_etokens, "overhead": summarise_overhead}


def summarise(part: str, folder: Path, *, status: str, cap_s: float, elapsed_s: float, profile: str,
              overrides: Sequence[str] = (), device_name: Optional[str] = None, notes: Sequence[str] = (),
              command: str = COMMAND) -> dict[str, Any]:
    """Write `folder/summary.json` for one part from the files in `folder`, and return it (`cap_s` 0: no cap)."""
    folder = Path(folder)
    summary = {"part": part, "status": status, "cap_s": float(cap_s), "elapsed_s": float(elapsed_s), "profile": profile,
               "overrides": list(overrides), "device_name": device_name, "command": command, "notes": list(notes),
               **SUMMARISERS[part](folder)}
    atomic_write_json(folder / SUMMARY, summary)
    return summary


def describe(summary: dict[str, Any]) -> list[str]:
    """A few lines per part for the run's log (`summary.txt`): the numbers the part is run for."""
    part = summary["part"]
    lines = []
    if part == "budgets":
        lines.append("  stages finished (s): " + (", ".join(f"{k} {v:.0f}" for k, v in summary["stages_s"].items()) or "none"))
        for t in summary.get("tables", []):
            hits = "/".join(f"{v:.0f}" for k, v in t.items() if k.startswith("hit10_"))
            lines.append(f"  {t['table']:<24} Hit@10 {hits:<12} MAE {t['average_mae_csc']:.3f} judge ppl "
                         f"{_pct(t['judge_ppl_rel_change'])} labels/gen {_num(t['labels_per_generation'], 0)} "
                         f"s/gen {_num(t['seconds_per_generation'], 2)}")
        for c in summary.get("cost_model", []):
            lines.append(f"  cost model {c['variant']}: token Spearman {c['token_spearman']:.3f}, continuation R² "
                         f"{c['continuation_r2']:.3f}")
    elif part == "csc_throughput":
        for m in summary.get("methods", []):
            lines.append(f"  {m['method']:<28} {m['labels_per_s']:>12,.0f} labels/s  ratio to naive "
                         f"{_num(m['ratio_vs_naive'], 2)}")
        if "largest" in summary:
            lines.append(f"  on {summary['largest']['n_sequences']} texts of {summary['largest']['tokens']} tokens "
                         f"({summary['largest']['n_labels']:,} labels)")
    elif part == "etokens":
        lines.append(f"  {summary['n_rows']} rows of {len(summary['cells'])} cells; grid complete: {summary['grid_complete']}")
    elif part == "overhead":
        for key, name in (("train", "model"), ("generation", "mode")):
            for r in summary.get(key, []):
                lines.append(f"  {r[name]:<32} ratio {r['ratio']:.3f}")
    return [status_line({**summary, "gpu": summary.get("device_name") or "?"})] + lines


EXAMPLES = "examples.jsonl"
EXAMPLE_KEYS = ("table", "level", "prompt", "text", "budget_csc", "csc", "stopped_by", "status", "n_tokens")


def table_key(record: dict[str, Any]) -> str:
    """The Table I table a generation record belongs to: `<variant>_<decoding>` for the trained variants'
    decodings, the decoding itself (`verified_n8_length`, `baseline_token_count_raw`) for the others."""
    return record["decoding"] if record["variant"] in ("verified", "baseline") else f"{record['variant']}_{record['decoding']}"


def example_records(records: Sequence[dict[str, Any]], per_level: int = 5) -> list[dict[str, Any]]:
    """The first `per_level` generations of every table and level of an evaluation's `generations.jsonl`
    records, each cut to what a reader needs (`EXAMPLE_KEYS`): the texts behind a committed run's numbers."""
    out, seen = [], {}
    for r in records:
        table = table_key(r)
        key = (table, r["level"])
        if r["level"] == "none" or seen.get(key, 0) >= per_level:
            continue
        seen[key] = seen.get(key, 0) + 1
        row = {**r, "table": table, "n_tokens": len(r.get("generated_ids", []))}
        out.append({k: row[k] for k in EXAMPLE_KEYS if k in row})
    return out


def committed_examples(part: str = "budgets", root: Optional[Path] = None, profile: Optional[str] = None,
                       table: Optional[str] = None) -> list[dict[str, Any]]:
    """The example generations (`EXAMPLES`) of every committed run of `part` (of `profile`), each with its
    `gpu`; only `table`'s when given."""
    out = []
    for s in committed(part, root, profile):
        out += [{"gpu": s["gpu"], **r} for r in _jsonl(Path(s["folder"]) / EXAMPLES) if table in (None, r["table"])]
    return out


def _num(x: Any, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.0f}%"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metabolic.report.gpu_results", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarise", help="write FOLDER/summary.json for PART and print its lines")
    s.add_argument("part", choices=PARTS)
    s.add_argument("folder")
    s.add_argument("--status", required=True)
    s.add_argument("--cap", type=float, required=True)
    s.add_argument("--elapsed", type=float, required=True)
    s.add_argument("--profile", required=True)
    s.add_argument("--set", dest="overrides", action="append", default=[])
    s.add_argument("--device-name", default=None)
    s.add_argument("--note", dest="notes", action="append", default=[])
    s.add_argument("--command", default=COMMAND, help="the command that made the folder's files")
    e = sub.add_parser("examples", help=f"write {EXAMPLES}: the first generations per table and level of a run")
    e.add_argument("generations", help="the evaluation's generations.jsonl")
    e.add_argument("dest", help=f"where to write {EXAMPLES}")
    e.add_argument("--per-level", type=int, default=5)
    args = p.parse_args(argv)
    if args.command == "examples":
        rows = example_records(_jsonl(Path(args.generations)), args.per_level)
        atomic_write_text(Path(args.dest), "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{args.dest}: {len(rows)} example generations")
        return 0
    summary = summarise(args.part, Path(args.folder), status=args.status, cap_s=args.cap, elapsed_s=args.elapsed,
                        profile=args.profile, overrides=args.overrides, device_name=args.device_name, notes=args.notes,
                        command=args.command)
    print("\n".join(describe(summary)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
