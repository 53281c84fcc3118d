"""Stage `evaluate`: Table I for both training variants x both decodings, and the verified controller's
rows (N x scale), from the trained models, the CSC cache and the budgets of `metabolic.evaluate.budgets`."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import dataclass
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
from metabolic.evaluate.budgets import BudgetLevels, TrainedBudgets, decoding_calibration
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
from metabolic.pipeline.stage import realise, stage_folder
from metabolic.pipeline.train import train_metabolic, train_variants
from metabolic.train.loop import SELECTION, TrainResult

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Evaluation:
    """The `evaluate` artefact: `tables` is its tables.json (Table I, the verified rows, the stop rules, the
    budgets and prompts they used); the per-generation records are in `folder`/generations.jsonl."""

    tables: dict[str, Any]
    folder: Path
    fingerprint: str


class EvaluateStage:
    """Table I for both variants x both decodings, the verified rows and the stop rules, from the trained
    models, the CSC cache and the budgets of `metabolic.evaluate.budgets`; each part resumable (`resumable`)."""

    folder = "evaluation"
    required = (TABLES_FILE, GENERATIONS_FILE)

    def __init__(self, cfg: StudyConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.tok = corpus(cfg).tokenizer
        self.csc = csc_labels(cfg, progress=progress)
        self.backbone = pretrain_backbone(cfg, progress=progress)
        self.results = train_variants(cfg, progress=progress)  # one load of the training inputs for both
        self.levels = budget_levels(cfg, self.csc, trained=self.results[cfg.train.variant])
        # The stop rules on fixed text are judged on every scale (their labels are raw; the length scale is a
        # product), so the proxy decodings, on the evaluation's scale, always have their open-loop ceiling; the
        # verified rows use the configured scales of the same targets.
        self.rule_budgets, self.rule_rates = verified_targets(self.csc, cfg, self.levels.budgets, SCALES)
        self.verified_budgets = {s: self.rule_budgets[s] for s in cfg.generation.verified_scales}
        self.rate_hints = {s: self.rule_rates[s] for s in cfg.generation.verified_scales}

    def description(self) -> dict[str, Any]:
        cfg, levels = self.cfg, self.levels
        return {
            "stage": "evaluate", "version": EVALUATION_VERSION, "generation": cfg.generation.__dict__,
            "csc": self.csc.fingerprint, "csc_scale": cfg.csc.scale, "backbone": self.backbone.fingerprint,
            "train": {v: r.fingerprint for v, r in self.results.items()}, "encoder": cfg.assets.encoder,
            "budgets": levels.budgets, "budget_range": levels.budget_range, "verified_budgets": self.verified_budgets,
            "verified_model": cfg.train.variant, "stop_rule_budgets": self.rule_budgets,
        }

    def build(self, work: Path) -> dict[str, Any]:
        cfg, g, csc = self.cfg, self.cfg.generation, self.csc
        torch.manual_seed(g.seed)
        distinct = select_prompts(g, self.tok, csc.valid_ids)
        # samples_per_prompt independent rows per prompt: Table I's n per level is their product
        prompts = [p for p in distinct for _ in range(g.samples_per_prompt)]
        backbone = load_backbone(self.backbone.path)  # the judge and the cost ceilings' features (read-only)
        judge = Judge(backbone)  # one memo: texts several tables judge are scored once
        prefixes = PrefixLabeller(csc_labeller(cfg))  # one memo: texts several decodings produce are labelled once
        models = {variant: result.load_best() for variant, result in self.results.items()}
        # What simple predictors fitted on the same labels reach on the same held-out texts (cost_fit).
        ceilings = cost_ceilings(backbone, csc.train_ids, csc.train_csc, csc.valid_ids,
                                 csc.valid_csc, energy_prior(cfg).prior.cost, g.prompt_tokens, cfg.csc.scale)
        tables, records = {}, []
        for variant, model in models.items():
            t, r = resumable(work, f"table1_{variant}", functools.partial(
                self._variant_tables, variant, model, judge, prefixes, prompts, ceilings))
            tables.update(t)
            records.extend(r)
        sampler = models.get(cfg.train.variant) or next(iter(models.values()))
        scale_cal = {scale: decoding_calibration(sampler, g, scale, cfg.train.calib_ridge, csc.train_ids, csc.train_csc,
                                                 list(b.values()))[0] for scale, b in self.rule_budgets.items()}
        sampler_costs = model_token_costs(sampler)
        t, r = resumable(work, "verified", lambda: self._verified_rows(sampler, sampler_costs, scale_cal, judge,
                                                                        prefixes, prompts))
        tables.update(t)
        records.extend(r)
        rules = resumable(work, "stop_rules", lambda: self._stop_rules(judge, prefixes, sampler_costs, scale_cal))
        artefacts.atomic_write_json(work / TABLES_FILE, self._combined(distinct, ceilings, rules, tables))
        artefacts.atomic_write_text(work / GENERATIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))
        shutil.rmtree(work / PARTS, ignore_errors=True)  # superseded by the two files above
        return {"n_generations": len(records)}

    def load(self, folder: Path, key: str) -> Evaluation:
        return Evaluation(tables=artefacts.read_json(folder / TABLES_FILE), folder=folder, fingerprint=key)

    def _variant_tables(self, variant, model, judge, prefixes, prompts, ceilings):
        """One variant's Table I rows (both decodings) with its training and cost-model columns."""
        cfg, g, csc, result = self.cfg, self.cfg.generation, self.csc, self.results[variant]
        budgets = self.levels.budgets
        cal, note = decoding_calibration(model, g, cfg.csc.scale, cfg.train.calib_ridge, csc.train_ids, csc.train_csc,
                                         list(budgets.values()))
        t, r = evaluate_variant(model, self.tok, judge, prefixes, prompts, budgets, g, cfg.csc.scale,
                                self.levels.budget_range, variant, cal, note, self.progress)
        fit = cost_model_fit(model, csc.valid_ids, csc.valid_csc, g.prompt_tokens, cfg.csc.scale)
        best = result.metrics[result.best_epoch - 1] if 0 < result.best_epoch <= len(result.metrics) else {}
        for table in t.values():
            table.update(best_epoch=result.best_epoch, val_ppl=best.get("val_ppl"), backbone_val_ppl=result.reference_ppl,
                         cost_model=fit, cost_model_vs_ceiling=against_ceiling(fit, ceilings))
        return t, r

    def _verified_rows(self, sampler, sampler_costs, scale_cal, judge, prefixes, prompts):
        """The verified controller's rows (N x scale) on the sampler, and its label-free baselines."""
        g = self.cfg.generation
        steered = None
        if g.verified_steered_candidates:
            steered = SteeredRows(g.verified_steered_candidates, sampler_costs, scale_cal, g.lambda_max)
        return verified_tables(sampler, self.tok, judge, prefixes, prompts, self.verified_budgets, self.rate_hints,
                               g.verified_candidates, max_new_tokens=g.verified_max_new_tokens, band=g.verified_band,
                               max_probes=g.verified_max_probes, temperature=g.temperature, top_k=g.top_k, seed=g.seed,
                               steered=steered)

    def _stop_rules(self, judge, prefixes, sampler_costs, scale_cal):
        """The stop rules on fixed held-out text (labels every word-end prefix of each), per scale."""
        g, csc = self.cfg.generation, self.csc
        if not g.stop_rule_texts:
            return {}
        fixed = {split: label_continuations(ids, self.tok, prefixes, g.prompt_tokens, g.max_new_tokens, g.stop_rule_texts)
                 for split, ids in (("train", csc.train_ids), ("held_out", csc.valid_ids))}
        return {scale: judge_stop_rules(fixed["train"], fixed["held_out"], b, scale, self.rule_rates[scale],
                                        sampler_costs.numpy(), scale_cal[scale], self.tok, g.verified_band,
                                        g.max_new_tokens, g.seed)
                for scale, b in self.rule_budgets.items()}

    def _combined(self, distinct, ceilings, rules, tables) -> dict[str, Any]:
        cfg, levels, cont = self.cfg, self.levels, self.levels.continuation
        return {"profile": cfg.profile, "budgets": levels.budgets, "budget_source": levels.source,
                "budget_range": list(levels.budget_range), "training_targets": levels.training_targets,
                "continuation_csc": {"n": int(cont.size), "min": float(cont.min()), "median": float(np.median(cont)),
                                     "max": float(cont.max())},
                "verified_budgets": self.verified_budgets, "verified_rate_hints": self.rate_hints,
                "verified_model": f"{cfg.train.variant} (best checkpoint; budget pathway off)",
                "cost_model_ceiling": ceilings, "prompts": distinct,
                "samples_per_prompt": cfg.generation.samples_per_prompt, "stop_rules": rules, "tables": tables,
                "paper": PAPER_TABLE1}


def evaluation(cfg: StudyConfig, progress: bool = True) -> Evaluation:
    """Stage `evaluate`: the artefact `data/<profile>/evaluation/` (tables.json, generations.jsonl)."""
    return realise(EvaluateStage(cfg, progress), cfg)


def evaluate_budgets(cfg: StudyConfig, progress: bool = True) -> dict[str, Any]:
    """Stage `evaluate` (`evaluation`), then publish `data/<profile>/table1_<variant>_<decoding>.json` and the
    combined `data/<profile>/table1.json`. Returns the combined dict (tables, paper, profile, budgets, prompts)."""
    combined = evaluation(cfg, progress).tables
    run = artefacts.run_dir(cfg.run_name)
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


def budget_levels(cfg: StudyConfig, csc: CSCData, scale: str | None = None,
                  trained: TrainResult | None = None) -> BudgetLevels:
    """The profile's generation budgets (`metabolic.evaluate.budgets.levels_from_continuations` on its config), on `scale`
    (default `csc.scale`). On the scale training ran on, its targets and budget range are read from the
    training artefact (`trained`, default the `train.variant` run); on another, derived by training's rule."""
    scale = scale or cfg.csc.scale
    if scale == cfg.csc.scale:
        selection = artefacts.read_json((trained or train_metabolic(cfg, progress=False)).folder / SELECTION)
        saved = TrainedBudgets(selection["targets"], tuple(selection["budget_range"]))
    else:
        saved = budget_derivation.budgets_training_would_use(csc, cfg.train, cfg.generation.prompt_tokens, scale,
                                                             vocab_size=len(corpus(cfg).tokenizer))
    return budget_derivation.levels_from_continuations(csc, cfg.generation, cfg.train.budget_quantiles, scale, saved)


def verified_targets(csc: CSCData, cfg: StudyConfig, budgets: dict[str, float],
                     scales: tuple[str, ...] | None = None) -> tuple[dict, dict[str, float]]:
    """The verified rows' budgets per scale and rate hints (`metabolic.evaluate.budgets.targets_per_scale`);
    `scales` defaults to `generation.verified_scales`."""
    return budget_derivation.targets_per_scale(csc, cfg.generation, cfg.train.budget_quantiles, cfg.csc.scale, budgets,
                                               scales)


def read_generations(cfg) -> list[dict[str, Any]]:
    """The per-generation records of the `evaluate` stage (run it first)."""
    path = stage_folder(cfg, EvaluateStage) / GENERATIONS_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: run the evaluate stage (python -m metabolic run --stages evaluate)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
