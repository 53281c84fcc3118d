"""Stage `evaluate`: Table I for both training variants x both decodings, and the verified controller's
rows (N x scale), from the trained models, the CSC cache and the budgets of `metabolic.evaluate.budgets`."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from metabolic.core import artefacts
from metabolic.core.budget import SCALES
from metabolic.core.config import StudyConfig
from metabolic.core.errors import DataError
from metabolic.core.resume import load_checkpoint, save_checkpoint
from metabolic.csc.dataset import CSCData
from metabolic.evaluate import budgets as budget_derivation
from metabolic.evaluate.budgets import BudgetLevels, decoding_calibration
from metabolic.evaluate.cost_fit import against_ceiling, cost_ceilings, cost_model_fit
from metabolic.evaluate.scoring import (
    EVALUATION_VERSION,
    GENERATIONS_FILE,
    PAPER_TABLE1,
    TABLES_FILE,
    Judge,
    evaluate_variant,
    select_prompts,
)
from metabolic.evaluate.stop_rules import judge_stop_rules, label_continuations
from metabolic.evaluate.verified_rows import SteeredRows, verified_tables
from metabolic.generate.budgeted import model_token_costs
from metabolic.generate.verified import PrefixLabeller
from metabolic.model.backbone import load_backbone
from metabolic.pipeline.corpus import corpus
from metabolic.pipeline.csc import csc_labeller, csc_labels
from metabolic.pipeline.pretrain import pretrain_backbone
from metabolic.pipeline.prior import energy_prior
from metabolic.pipeline.train import train_variants

log = logging.getLogger(__name__)
T = TypeVar("T")


def evaluate_budgets(cfg, progress: bool = True):
    """Stage `evaluate`: Table I for both training variants x both decodings, written to data/<profile>/.

    Writes the artefact `data/<profile>/evaluation/` (tables.json, generations.jsonl) and publishes
    `data/<profile>/table1_<variant>_<decoding>.json` plus the combined `data/<profile>/table1.json`.
    Returns the combined dict (tables, paper, profile, budgets, prompts).
    """
    tok = corpus(cfg).tokenizer
    csc = csc_labels(cfg, progress=progress)
    backbone = pretrain_backbone(cfg, progress=progress)
    results = train_variants(cfg, progress=progress)  # one load of the training inputs for both
    g = cfg.generation
    levels = budget_levels(cfg, csc)
    budgets, budget_range, cont = levels.budgets, levels.budget_range, levels.continuation
    # The stop rules on fixed text are judged on every scale (their labels are raw; the length scale is a
    # product), so the proxy decodings, on the evaluation's scale, always have their open-loop ceiling; the
    # verified rows use the configured scales of the same targets.
    rule_budgets, rule_rates = verified_targets(csc, cfg, budgets, SCALES)
    verified_budgets = {s: rule_budgets[s] for s in g.verified_scales}
    rate_hints = {s: rule_rates[s] for s in g.verified_scales}
    description = {
        "stage": "evaluate", "version": EVALUATION_VERSION, "generation": cfg.generation.__dict__, "csc": csc.fingerprint, "csc_scale": cfg.csc.scale,
        "backbone": backbone.fingerprint, "train": {v: r.fingerprint for v, r in results.items()},
        "encoder": cfg.assets.encoder, "budgets": budgets, "budget_range": budget_range,
        "verified_budgets": verified_budgets, "verified_model": cfg.train.variant, "stop_rule_budgets": rule_budgets,
    }
    folder = artefacts.run_dir(cfg.profile) / "evaluation"

    def build(work):
        torch.manual_seed(cfg.generation.seed)
        distinct = select_prompts(g, tok, csc.valid_ids)
        # samples_per_prompt independent rows per prompt: Table I's n per level is their product
        prompts = [p for p in distinct for _ in range(g.samples_per_prompt)]
        judge = Judge(load_backbone(backbone.path))  # one memo: texts several tables judge are scored once
        prefixes = PrefixLabeller(csc_labeller(cfg))  # one memo: texts several decodings produce are labelled once
        models = {variant: result.load_best() for variant, result in results.items()}
        # What simple predictors fitted on the same labels reach on the same held-out texts (cost_fit).
        ceilings = cost_ceilings(load_backbone(backbone.path), csc.train_ids, csc.train_csc, csc.valid_ids, csc.valid_csc,
                                 energy_prior(cfg).prior.cost, g.prompt_tokens, cfg.csc.scale)

        def variant_tables(variant):
            model, result = models[variant], results[variant]
            cal, note = decoding_calibration(model, g, cfg.csc.scale, cfg.train.calib_ridge, csc.train_ids, csc.train_csc,
                                             list(budgets.values()))
            t, r = evaluate_variant(model, tok, judge, prefixes, prompts, budgets, g, cfg.csc.scale, budget_range, variant,
                                    cal, note, progress)
            fit = cost_model_fit(model, csc.valid_ids, csc.valid_csc, g.prompt_tokens, cfg.csc.scale)
            best = result.metrics[result.best_epoch - 1] if 0 < result.best_epoch <= len(result.metrics) else {}
            for table in t.values():
                table.update(best_epoch=result.best_epoch, val_ppl=best.get("val_ppl"), backbone_val_ppl=result.reference_ppl,
                             cost_model=fit, cost_model_vs_ceiling=against_ceiling(fit, ceilings))
            return t, r

        tables, records = {}, []
        for variant in results:
            t, r = resumable(work, f"table1_{variant}", functools.partial(variant_tables, variant))
            tables.update(t)
            records.extend(r)
        sampler = models.get(cfg.train.variant) or next(iter(models.values()))
        scale_cal = {scale: decoding_calibration(sampler, g, scale, cfg.train.calib_ridge, csc.train_ids, csc.train_csc,
                                                 list(b.values()))[0] for scale, b in rule_budgets.items()}
        sampler_costs = model_token_costs(sampler)
        steered = None
        if g.verified_steered_candidates:
            steered = SteeredRows(g.verified_steered_candidates, sampler_costs, scale_cal, g.lambda_max)
        t, r = resumable(work, "verified", lambda: verified_tables(
            sampler, tok, judge, prefixes, prompts, verified_budgets, rate_hints, g.verified_candidates,
            max_new_tokens=g.verified_max_new_tokens, band=g.verified_band, max_probes=g.verified_max_probes,
            temperature=g.temperature, top_k=g.top_k, seed=g.seed, steered=steered))
        tables.update(t)
        records.extend(r)

        def stop_rules():  # the stop rules on fixed held-out text (labels every word-end prefix of each)
            if not g.stop_rule_texts:
                return {}
            fixed = {split: label_continuations(ids, tok, prefixes, g.prompt_tokens, g.max_new_tokens, g.stop_rule_texts)
                     for split, ids in (("train", csc.train_ids), ("held_out", csc.valid_ids))}
            return {scale: judge_stop_rules(fixed["train"], fixed["held_out"], b, scale, rule_rates[scale],
                                            sampler_costs.numpy(), scale_cal[scale], tok, g.verified_band,
                                            g.max_new_tokens, g.seed)
                    for scale, b in rule_budgets.items()}

        rules = resumable(work, "stop_rules", stop_rules)
        combined = {"profile": cfg.profile, "budgets": budgets, "budget_source": levels.source,
                    "budget_range": list(budget_range), "training_targets": levels.training_targets,
                    "continuation_csc": {"n": int(cont.size), "min": float(cont.min()), "median": float(np.median(cont)),
                                         "max": float(cont.max())},
                    "verified_budgets": verified_budgets, "verified_rate_hints": rate_hints,
                    "verified_model": f"{cfg.train.variant} (best checkpoint; budget pathway off)",
                    "cost_model_ceiling": ceilings,
                    "prompts": distinct, "samples_per_prompt": g.samples_per_prompt, "stop_rules": rules,
                    "tables": tables, "paper": PAPER_TABLE1}
        artefacts.atomic_write_json(work / TABLES_FILE, combined)
        artefacts.atomic_write_text(work / GENERATIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))
        shutil.rmtree(work / PARTS, ignore_errors=True)  # superseded by the two files above
        return {"n_generations": len(records)}

    artefacts.build_artefact(folder, description, build, cfg.to_json(), required=(TABLES_FILE, GENERATIONS_FILE))
    combined = artefacts.read_json(folder / TABLES_FILE)
    run = artefacts.run_dir(cfg.profile)
    for key, table in combined["tables"].items():
        artefacts.atomic_write_json(run / f"table1_{key}.json",
                                    {"profile": cfg.profile, **table, "paper": PAPER_TABLE1})
    artefacts.atomic_write_json(run / "table1.json", combined)
    return combined


PARTS = "parts"  # an unfinished evaluation's finished tables, in its .partial folder


def resumable(work: Path, name: str, compute: Callable[[], T]) -> T:
    """`compute()`, saved in `work/parts/<name>.pt` (SHA-256 checked, `core.resume`) as soon as it is done: a
    rerun after an interruption reuses every finished part (each is seeded on its own, so the result is the
    uninterrupted run's) and computes only the rest."""
    path = work / PARTS / f"{name}.pt"
    saved = load_checkpoint(path)
    if saved is not None:
        log.info("evaluate: %s finished before an interruption: reused (%s)", name, artefacts.shown(path))
        return saved["value"]
    value = compute()
    path.parent.mkdir(exist_ok=True)
    save_checkpoint(path, {"value": value})
    return value


def budget_levels(cfg: StudyConfig, csc: CSCData, scale: str | None = None) -> BudgetLevels:
    """The profile's generation budgets (`metabolic.evaluate.budgets.budget_levels` on its config), on `scale`
    (default `csc.scale`)."""
    return budget_derivation.budget_levels(csc, cfg.generation, cfg.train, scale or cfg.csc.scale,
                                           vocab_size=len(corpus(cfg).tokenizer))


def verified_targets(csc: CSCData, cfg: StudyConfig, budgets: dict[str, float],
                     scales: tuple[str, ...] | None = None) -> tuple[dict, dict[str, float]]:
    """The verified rows' budgets per scale and rate hints (`metabolic.evaluate.budgets.verified_targets`);
    `scales` defaults to `generation.verified_scales`."""
    return budget_derivation.verified_targets(csc, cfg.generation, cfg.train.budget_quantiles, cfg.csc.scale, budgets,
                                              scales)


def read_generations(cfg) -> list[dict[str, Any]]:
    """The per-generation records of the `evaluate` stage (run it first)."""
    path = artefacts.run_dir(cfg.profile) / "evaluation" / GENERATIONS_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: run the evaluate stage (python -m metabolic run --stages evaluate)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
