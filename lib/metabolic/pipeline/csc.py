"""Stage `csc`: exact CSC labels of the profile's train/valid sequences, cached in chunks, resumable,
shared by torchrun ranks (the rank protocol: `metabolic.csc.sharding`)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from metabolic.core import artefacts
from metabolic.core.config import StudyConfig
from metabolic.core.errors import DataError
from metabolic.csc.dataset import DATA_FILE, CSCData, csc_stats, label_shard, label_split, load_data, save_data
from metabolic.csc.labeller import CSCLabeller
from metabolic.csc.sharding import build_sharded, shard_group
from metabolic.data.corpus import subsample_indices
from metabolic.pipeline.corpus import CorpusData, corpus, train_sequences, valid_sequences
from metabolic.pipeline.stage import encoder, encoder_sha256, loaded_once, stage_folder, tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)


def csc_labeller(cfg: StudyConfig, device: str | None = None) -> CSCLabeller:
    """The configured encoder (resolved by `metabolic.core.assets`), GPT-2 tokenizer and CSC settings."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return CSCLabeller(encoder(cfg.assets.encoder, device), tokenizer(cfg.assets.tokenizer).value, device=device,
                       precision=cfg.csc.precision, batch_size=cfg.csc.batch_size, encoder_name=cfg.assets.encoder)


def select_for_labelling(cfg: StudyConfig, data: CorpusData) -> tuple[list[list[int]], list[list[int]]]:
    """The profile's train/valid sequences (`*_sequences`), seeded subsets of csc.max_*sequences."""
    train = train_sequences(cfg, data)
    valid = valid_sequences(cfg, data)
    train = [train[i] for i in subsample_indices(len(train), cfg.csc.max_sequences, cfg.csc.seed)]
    valid = [valid[i] for i in subsample_indices(len(valid), cfg.csc.max_valid_sequences, cfg.csc.seed + 1)]
    return train, valid


def csc_description_keys() -> tuple[str, ...]:
    """The `csc` settings a CSC cache depends on. `batch_size` is not one: it only changes which
    counterfactuals are padded together, i.e. float rounding (< 1e-6, tested), so a cache labelled at
    one batch size (a GPU's) serves every other; `precision` is keyed on its own, as the labeller's."""
    return ("max_sequences", "max_valid_sequences", "positions", "positions_per_sequence", "seed", "chunk_sequences")


class CSCStage:
    """The CSC cache of one profile, labelled on rank `rank` of `world` processes (0 of 1: one process)."""

    folder = "csc"
    required = (DATA_FILE,)

    def __init__(self, cfg: StudyConfig, device: str | None, progress: bool, shard: tuple[int, int]) -> None:
        self.cfg, self.progress, self.shard = cfg, progress, shard
        data = corpus(cfg)
        self.train, self.valid = select_for_labelling(cfg, data)
        self.labeller = labeller = csc_labeller(cfg, device=device)
        self._description = {
            "stage": "csc",
            "encoder": {"name": cfg.assets.encoder, "weights_sha256": encoder_sha256(cfg.assets.encoder, str(labeller.device)),
                        "window": labeller.window},
            "tokenizer": tokenizer_fingerprint(data.tokenizer),
            "corpus_fingerprint": data.fingerprint,
            "corpus": {k: getattr(cfg.corpus, k) for k in ("seq_len", "max_train_texts", "max_valid_texts", "min_tokens", "seed")},
            "csc": {k: getattr(cfg.csc, k) for k in csc_description_keys()},
            "precision": labeller.precision,
            "device_type": labeller.device.type,
        }
        self.key = artefacts.artefact_key(self._description)  # before the build: every rank must agree on it
        self.splits = (("train", 0, self.train), ("valid", 1, self.valid))

    def description(self) -> dict[str, Any]:
        return self._description

    def label_shard(self, work: Path) -> None:
        """This rank's share of the missing chunks of both splits, into `work/chunks/`."""
        for name, split, seqs in self.splits:
            label_shard(self.labeller, name, split, seqs, self.cfg.csc, work, self.shard, self.progress)

    def build(self, work: Path) -> dict[str, Any]:
        """Merge the chunks (labelling any still missing) into `csc.npz` (rank 0).

        A `csc.npz` already merged in `work` (a kill between the merge and the commit) is reused when it
        holds labels of exactly these sequences: the chunks it was merged from may already be gone."""
        cfg = self.cfg
        merged = self._merged(work)
        if merged is not None:
            train_csc, valid_csc = merged
            log.info("CSC: reusing the labels merged before an interrupted commit (%s)", DATA_FILE)
        else:
            train_csc, valid_csc = [label_split(self.labeller, name, split, seqs, cfg.csc, work, self.progress)
                                    for name, split, seqs in self.splits]
            save_data(work / DATA_FILE, self.train, train_csc, self.valid, valid_csc)
        shutil.rmtree(work / "chunks", ignore_errors=True)  # merged into csc.npz
        raw = csc_stats(train_csc, "raw", cfg.train.budget_quantiles)
        return {"n_train": len(self.train), "n_valid": len(self.valid), "raw_total_mean": raw["mean"],
                "token_mean": raw["token_mean"], "n_labels": raw["n_labels"]}

    def _merged(self, work: Path) -> tuple[list, list] | None:
        """The labels of a `csc.npz` merged in `work` for these sequences, or None (none, or not these)."""
        if not (work / DATA_FILE).is_file():
            return None
        try:
            return load_data(work, self.train, self.valid)
        except DataError as exc:
            log.warning("CSC: the merged %s in the partial build is not usable (%s): merging again", DATA_FILE, exc)
            return None

    def load(self, folder: Path, key: str) -> CSCData:
        return self.labelled(folder, self.read_labels(folder))

    def read_labels(self, folder: Path) -> tuple[list, list]:
        """The committed labels of both splits (`DataError` when they belong to other sequences)."""
        return load_data(folder, self.train, self.valid)

    def labelled(self, folder: Path, labels: tuple[list, list]) -> CSCData:
        train_csc, valid_csc = labels
        return CSCData(
            train_ids=self.train, train_csc=train_csc, valid_ids=self.valid, valid_csc=valid_csc,
            stats=csc_stats(train_csc, self.cfg.csc.scale, self.cfg.train.budget_quantiles),
            fingerprint=self.key,
            folder=folder,
        )


def csc_labels(cfg: StudyConfig, progress: bool = True, device: str | None = None) -> CSCData:
    """Stage `csc`: label (or reuse) the profile's train/valid sequences with exact CSC.

    Under torchrun (`RANK`, `WORLD_SIZE`) the ranks share the labelling (`metabolic.csc.sharding`); every
    rank returns the same committed cache."""
    with shard_group() as (rank, world):
        if world > 1 and device is None and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        stage = CSCStage(cfg, device, progress and rank == 0, (rank, world))
        folder = stage_folder(cfg, stage)
        committed = artefacts.Built(folder, stage.key)
        labels = build_sharded(folder, stage.description(), stage.key, cfg.to_json(), stage.required, build=stage.build,
                               label_shard=stage.label_shard, shard=(rank, world),
                               load=lambda: loaded_once(stage, committed, lambda: stage.read_labels(folder)))
        return stage.labelled(folder, labels)
