"""Stage `pretrain`: the GPT-2 backbone, from the Hub or a folder as configured, or trained here from
scratch on the corpus (`backbone.source = "pretrain"`, the offline profiles)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metabolic.core import artefacts, resume
from metabolic.core.config import StudyConfig
from metabolic.data.corpus import pack_blocks
from metabolic.model.backbone import scratch_model
from metabolic.pipeline.corpus import CorpusData, corpus, pretrain_sequences, valid_sequences
from metabolic.pipeline.stage import realise
from metabolic.train.loop import read_metrics
from metabolic.train.pretrain import CHECKPOINT
from metabolic.train.pretrain import METRICS as PRETRAIN_METRICS
from metabolic.train.pretrain import pretrain


@dataclass(frozen=True)
class BackboneData:
    """Where the backbone loads from (`from_pretrained(path)`) and its pretraining log, if any."""

    path: str
    pretrained_here: bool
    metrics: list[dict[str, Any]]
    fingerprint: str


class PretrainStage:
    folder = "backbone"
    required = ("model.safetensors", PRETRAIN_METRICS)

    def __init__(self, cfg: StudyConfig, data: CorpusData, progress: bool = True) -> None:
        self.cfg, self.data, self.progress = cfg, data, progress
        self._description = {
            "stage": "pretrain",
            "backbone": cfg.backbone.__dict__,
            "corpus": cfg.corpus.__dict__,
            "corpus_fingerprint": data.fingerprint,
        }

    def description(self) -> dict[str, Any]:
        return self._description

    def build(self, work: Path) -> dict[str, Any]:
        cfg, data, b = self.cfg, self.data, self.cfg.backbone
        eos = data.tokenizer.eos_token_id
        train_blocks = pack_blocks(pretrain_sequences(cfg, data), b.block_size, eos)
        valid_blocks = pack_blocks(valid_sequences(cfg, data), b.block_size, eos)
        model = scratch_model(b, vocab_size=len(data.tokenizer), n_positions=max(b.block_size, cfg.corpus.seq_len), eos_id=eos)
        t0 = time.perf_counter()
        result = pretrain(model, train_blocks, valid_blocks, b, work, progress=self.progress)
        model.save_pretrained(work)
        data.tokenizer.save_pretrained(work)
        resume.remove_checkpoint(work / CHECKPOINT)  # the saved model supersedes it
        return {
            "steps": result.steps,
            "final_val_ppl": result.final_val_ppl,
            "train_blocks": int(train_blocks.shape[0]),
            "wall_s": time.perf_counter() - t0,
        }

    def load(self, folder: Path, key: str) -> BackboneData:
        return BackboneData(path=str(folder), pretrained_here=True, metrics=read_metrics(folder / PRETRAIN_METRICS),
                            fingerprint=key)


def pretrain_backbone(cfg: StudyConfig, progress: bool = True) -> BackboneData:
    """Stage `pretrain`: a Hub/folder backbone as configured, or a GPT-2 trained from scratch on the corpus."""
    source = cfg.backbone.source
    if source != "pretrain":
        return BackboneData(path=source, pretrained_here=False, metrics=[], fingerprint=artefacts.fingerprint({"source": source}))
    return realise(PretrainStage(cfg, corpus(cfg), progress), cfg)
