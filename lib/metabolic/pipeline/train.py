"""Stage `train`: MetabolicGPT-2, both variants on one protocol (same backbone, CSC labels, settings),
each in `data/<profile>/train/<variant>/`; a finished run is reused, an interrupted one resumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from metabolic.core import artefacts, resume
from metabolic.core.config import StudyConfig
from metabolic.core.errors import ConfigError, DataError
from metabolic.csc.dataset import CSCData
from metabolic.model.metabolic_gpt2 import SETTINGS_FILE, VARIANTS
from metabolic.pipeline.corpus import corpus
from metabolic.pipeline.csc import csc_labels
from metabolic.pipeline.pretrain import BackboneData, pretrain_backbone
from metabolic.pipeline.prior import energy_prior
from metabolic.pipeline.stage import realise, tokenizer_fingerprint
from metabolic.train.data import TrainingData, counted_from, prepare_data
from metabolic.train.loop import (
    BEST_DIR,
    CHECKPOINT,
    LAST_DIR,
    METRICS,
    SELECTION,
    TrainResult,
    read_metrics,
    train,
)


@dataclass(frozen=True)
class StageInputs:
    """What both variants train from (loaded once: the CSC stage alone loads and hashes the encoder)."""

    backbone: BackboneData
    csc: CSCData
    data: TrainingData
    prior: np.ndarray | None
    prior_fingerprint: str | None


def stage_inputs(cfg: StudyConfig, progress: bool = True) -> StageInputs:
    """The backbone, the CSC cache (checked against the tokenizer), training data and the optional prior."""
    backbone = pretrain_backbone(cfg, progress=progress)
    csc = csc_labels(cfg, progress=progress)
    data = corpus(cfg)
    tok_key = tokenizer_fingerprint(data.tokenizer)
    manifest = artefacts.read_manifest(csc.folder) or {}
    made_with = (manifest.get("description") or {}).get("tokenizer")
    if made_with is not None and made_with != tok_key:
        raise DataError(f"CSC cache {csc.folder} was made for another tokenizer: rebuild it "
                        f"(python -m metabolic run --stages csc) with assets.tokenizer={cfg.assets.tokenizer!r}")
    training = prepare_data(csc, cfg.train, vocab_size=len(data.tokenizer), scale=cfg.csc.scale,
                            counted_from=counted_from(cfg.train, cfg.generation.prompt_tokens))
    prior = energy_prior(cfg) if cfg.train.token_cost_from_prior else None
    return StageInputs(backbone=backbone, csc=csc, data=training, prior=None if prior is None else prior.prior.cost,
                       prior_fingerprint=None if prior is None else prior.fingerprint)


class TrainStage:
    """One variant's training run."""

    required = (METRICS, SELECTION, f"{BEST_DIR}/{SETTINGS_FILE}", f"{LAST_DIR}/{SETTINGS_FILE}")

    def __init__(self, cfg: StudyConfig, variant: str, inputs: StageInputs, progress: bool = True) -> None:
        self.variant, self.inputs, self.progress = variant, inputs, progress
        self.folder = f"train/{variant}"
        self.tcfg = replace(cfg.train, variant=variant)
        self._description = {"stage": "train", "variant": variant, "train": asdict(self.tcfg), "csc_scale": cfg.csc.scale,
                             "counted_from": counted_from(cfg.train, cfg.generation.prompt_tokens),
                             "backbone": inputs.backbone.fingerprint, "csc": inputs.csc.fingerprint,
                             "prior": inputs.prior_fingerprint}

    def description(self) -> dict[str, Any]:
        return self._description

    def build(self, work: Path) -> dict[str, Any]:
        inputs = self.inputs
        result = train(inputs.backbone.path, inputs.data, self.tcfg, self.variant, work, prior_cost=inputs.prior,
                       progress=self.progress)
        resume.remove_checkpoint(work / CHECKPOINT)  # best/ and last/ supersede it
        return {"best_epoch": result.best_epoch, "reference_ppl": result.reference_ppl, "epochs": len(result.metrics)}

    def load(self, folder: Path, key: str) -> TrainResult:
        selection = artefacts.read_json(folder / SELECTION)
        return TrainResult(variant=self.variant, folder=folder, metrics=read_metrics(folder / METRICS),
                           best_epoch=selection["best_epoch"], best_dir=folder / BEST_DIR, last_dir=folder / LAST_DIR,
                           reference_ppl=selection["reference_ppl"], targets=selection["targets"],
                           fingerprint=key)


def train_metabolic(cfg: StudyConfig, variant: str | None = None, progress: bool = True,
                    inputs: StageInputs | None = None) -> TrainResult:
    """Stage `train` for one variant (default `train.variant`): run folder `data/<profile>/train/<variant>/`.

    A finished run made from the same inputs and config is reused; an interrupted one resumes.
    """
    variant = variant or cfg.train.variant
    if variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r} is invalid: choose one of {', '.join(VARIANTS)}")
    return realise(TrainStage(cfg, variant, inputs or stage_inputs(cfg, progress=progress), progress), cfg)


def train_variants(cfg: StudyConfig, progress: bool = True) -> dict[str, TrainResult]:
    """Stage `train` in the pipeline: both variants on the same data, backbone and protocol."""
    inputs = stage_inputs(cfg, progress=progress)
    return {v: train_metabolic(cfg, v, progress=progress, inputs=inputs) for v in VARIANTS}
