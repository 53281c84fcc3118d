"""The study's stages, in data-flow order: each builds (or reuses) one artefact under `data/<profile>/`.

    corpus -> pretrain -> prior -> csc -> train -> evaluate -> etokens

This is the only module that runs stages and unpacks `StudyConfig`: domain code (`metabolic.data`,
`csc`, `model`, `train`, `generate`, `evaluate`, `energy`) takes its own config section or plain
arguments and never calls a stage. Notebooks and `python -m metabolic run` call the same functions.
A stage asks for its inputs by calling the stages before it, so any notebook can run alone; an
artefact made from the same inputs (same fingerprint) is reused, a stale or corrupt one is rebuilt.
The loaded tokenizer and encoder are kept once per process (`_tokenizer`, `_encoder`): stages and
notebooks share them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from metabolic.core import artefacts
from metabolic.core.assets import load_encoder, load_tokenizer
from metabolic.core.config import StudyConfig
from metabolic.core.errors import ConfigError, DataError
from metabolic.csc.dataset import (
    DATA_FILE,
    CSCData,
    barrier,
    broadcast,
    csc_stats,
    encoder_weights_sha256,
    label_shard,
    label_split,
    load_data,
    save_data,
    shard_group,
)
from metabolic.csc.labeller import CSCLabeller
from metabolic.data.corpus import load_corpus, pack_blocks, pack_ids, select_sequences, subsample_indices, tokenize, unpack_ids
from metabolic.data.prior import Prior, build_prior, decoded_tokens, token_counts
from metabolic.energy.grid import CELLS, Grid, run_grid
from metabolic.energy.measurement import (
    CALIBRATION,
    MACHINE,
    ROWS,
    calibrations,
    machine_info,
    machine_tag,
    measured_model_keys,
    merge_results,
    stage_description,
)
from metabolic.energy.meter import EnergyMeter
from metabolic.energy.plan import RUN_SPLITTING, Plan, grid_units, make_plan
from metabolic.energy.workloads import make_tasks, model_specs
from metabolic.evaluate.cost_fit import against_ceiling, cost_ceilings, cost_model_fit
from metabolic.evaluate.scoring import (
    EVALUATION_VERSION,
    GENERATIONS_FILE,
    LEVELS,
    PAPER_TABLE1,
    TABLES_FILE,
    Judge,
    choose_calibration,
    continuation_points,
    continuation_totals,
    evaluate_variant,
    select_prompts,
)
from metabolic.evaluate.verified_rows import SteeredRows, verified_tables
from metabolic.generate.budgeted import model_token_costs
from metabolic.generate.verified import PrefixLabeller
from metabolic.model.backbone import load_backbone, scratch_model
from metabolic.model.metabolic_gpt2 import SETTINGS_FILE, VARIANTS
from metabolic.train.loop import (
    BEST_DIR,
    CHECKPOINT,
    LAST_DIR,
    METRICS,
    SELECTION,
    TrainingData,
    TrainResult,
    prepare_data,
    read_metrics,
    train,
)
from metabolic.train.pretrain import METRICS as PRETRAIN_METRICS
from metabolic.train.pretrain import pretrain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusData:
    """Tokenized WikiText-2: full splits (id lists), the tokenizer and the artefact's fingerprint."""

    train_ids: list[list[int]]
    valid_ids: list[list[int]]
    tokenizer: Any
    source: str
    location: str
    fingerprint: str
    folder: Path


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    return load_tokenizer(spec)


@functools.lru_cache(maxsize=2)
def _encoder(spec: str, device: str):
    """`load_encoder(spec, device)`, loaded once per process (stages and notebooks share it)."""
    return load_encoder(spec, device).value


@functools.lru_cache(maxsize=2)
def _encoder_sha256(spec: str, device: str) -> str:
    """The weights hash of the process's cached encoder (it is never trained, so it never changes)."""
    return encoder_weights_sha256(_encoder(spec, device))


def csc_labeller(cfg: StudyConfig, device: str | None = None) -> CSCLabeller:
    """The configured encoder (resolved by `metabolic.core.assets`), GPT-2 tokenizer and CSC settings."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return CSCLabeller(_encoder(cfg.assets.encoder, device), _tokenizer(cfg.assets.tokenizer).value, device=device,
                       precision=cfg.csc.precision, batch_size=cfg.csc.batch_size, encoder_name=cfg.assets.encoder)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser)."""
    return artefacts.sha256_bytes(tokenizer.backend_tokenizer.to_str().encode("utf-8"))


def corpus(cfg: StudyConfig) -> CorpusData:
    """Stage `corpus`: WikiText-2 train/validation texts tokenized with GPT-2 (cached per source+tokenizer)."""
    texts = load_corpus(cfg.assets)
    tok = _tokenizer(cfg.assets.tokenizer)
    description = {
        "stage": "corpus",
        "train_sha256": artefacts.sha256_bytes("\n".join(texts.train).encode("utf-8")),
        "valid_sha256": artefacts.sha256_bytes("\n".join(texts.validation).encode("utf-8")),
        "tokenizer": tokenizer_fingerprint(tok.value),
    }
    folder = artefacts.run_dir(cfg.profile) / "corpus"

    def build(work: Path) -> dict[str, Any]:
        train_flat, train_off = pack_ids(tokenize(tok.value, texts.train))
        valid_flat, valid_off = pack_ids(tokenize(tok.value, texts.validation))
        artefacts.atomic_torch_save(
            work / "tokens.pt",
            {"train_ids": train_flat, "train_offsets": train_off, "valid_ids": valid_flat, "valid_offsets": valid_off},
        )
        return {
            "n_train_texts": len(texts.train),
            "n_valid_texts": len(texts.validation),
            "n_train_tokens": int(train_flat.numel()),
            "n_valid_tokens": int(valid_flat.numel()),
            "source": texts.source,
        }

    artefacts.build_artefact(folder, description, build, cfg.to_json(), required=("tokens.pt",))
    data = torch.load(folder / "tokens.pt", weights_only=True)
    return CorpusData(
        train_ids=unpack_ids(data["train_ids"], data["train_offsets"]),
        valid_ids=unpack_ids(data["valid_ids"], data["valid_offsets"]),
        tokenizer=tok.value,
        source=texts.source,
        location=texts.location,
        fingerprint=artefacts.fingerprint(description),
        folder=folder,
    )


def train_sequences(cfg: StudyConfig, data: CorpusData) -> list[list[int]]:
    """The profile's training texts: seeded subsample, capped at `corpus.seq_len` tokens."""
    c = cfg.corpus
    return select_sequences(data.train_ids, c.max_train_texts, c.seq_len, c.min_tokens, c.seed)


def valid_sequences(cfg: StudyConfig, data: CorpusData) -> list[list[int]]:
    c = cfg.corpus
    return select_sequences(data.valid_ids, c.max_valid_texts, c.seq_len, c.min_tokens, c.seed + 1)


@dataclass(frozen=True)
class BackboneData:
    """Where the backbone loads from (`from_pretrained(path)`) and its pretraining log, if any."""

    path: str
    pretrained_here: bool
    metrics: list[dict[str, Any]]
    fingerprint: str


def pretrain_backbone(cfg: StudyConfig, progress: bool = True) -> BackboneData:
    """Stage `pretrain`: a Hub/folder backbone as configured, or a GPT-2 trained from scratch on the corpus."""
    b = cfg.backbone
    if b.source != "pretrain":
        return BackboneData(path=b.source, pretrained_here=False, metrics=[], fingerprint=artefacts.fingerprint({"source": b.source}))
    data = corpus(cfg)
    description = {
        "stage": "pretrain",
        "backbone": cfg.backbone.__dict__,
        "corpus": cfg.corpus.__dict__,
        "corpus_fingerprint": data.fingerprint,
    }
    folder = artefacts.run_dir(cfg.profile) / "backbone"

    def build(work: Path) -> dict[str, Any]:
        eos = data.tokenizer.eos_token_id
        train_blocks = pack_blocks(train_sequences(cfg, data), b.block_size, eos)
        valid_blocks = pack_blocks(valid_sequences(cfg, data), b.block_size, eos)
        model = scratch_model(b, vocab_size=len(data.tokenizer), n_positions=max(b.block_size, cfg.corpus.seq_len), eos_id=eos)
        t0 = time.perf_counter()
        result = pretrain(model, train_blocks, valid_blocks, b, work, progress=progress)
        model.save_pretrained(work)
        data.tokenizer.save_pretrained(work)
        (work / "checkpoint.pt").unlink(missing_ok=True)  # the saved model supersedes it
        return {
            "steps": result.steps,
            "final_val_ppl": result.final_val_ppl,
            "train_blocks": int(train_blocks.shape[0]),
            "wall_s": time.perf_counter() - t0,
        }

    artefacts.build_artefact(folder, description, build, cfg.to_json(), required=("model.safetensors", PRETRAIN_METRICS))
    return BackboneData(
        path=str(folder), pretrained_here=True, metrics=read_metrics(folder / PRETRAIN_METRICS),
        fingerprint=artefacts.fingerprint({**description, "library_version": artefacts.__version__}),
    )


@dataclass(frozen=True)
class PriorData:
    prior: Any  # metabolic.data.prior.Prior
    folder: Path
    fingerprint: str


def energy_prior(cfg: StudyConfig) -> PriorData:
    """Stage `prior`: the synthetic energy prior from token counts over the whole training split."""
    data = corpus(cfg)
    description = {"stage": "prior", "prior": cfg.prior.__dict__, "corpus_fingerprint": data.fingerprint}
    folder = artefacts.run_dir(cfg.profile) / "prior"
    vocab_size = len(data.tokenizer)
    tokens = decoded_tokens(data.tokenizer, vocab_size)

    def build(work: Path) -> dict[str, Any]:
        prior = build_prior(token_counts(data.train_ids, vocab_size), tokens, cfg.prior)
        buffer = work / "prior.npz"
        with open(buffer, "wb") as fh:
            np.savez(fh, cost=prior.cost, counts=prior.counts, lengths=prior.lengths, heading=prior.heading)
        return {"vocab_size": vocab_size, "mean": float(prior.cost.mean()), "min": float(prior.cost.min())}

    artefacts.build_artefact(folder, description, build, cfg.to_json(), required=("prior.npz",))
    arrays = np.load(folder / "prior.npz")
    prior = Prior(cost=arrays["cost"], counts=arrays["counts"], lengths=arrays["lengths"], heading=arrays["heading"], tokens=tokens)
    return PriorData(prior=prior, folder=folder, fingerprint=artefacts.fingerprint(description))


# --- stage `csc` -------------------------------------------------------------------------------------


def select_for_labelling(cfg: StudyConfig, data) -> tuple[list[list[int]], list[list[int]]]:
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


def csc_labels(cfg: StudyConfig, progress: bool = True, device: str | None = None) -> CSCData:
    """Stage `csc`: label (or reuse) the profile's train/valid sequences with exact CSC.

    Under torchrun (`RANK`, `WORLD_SIZE`) the ranks share the labelling (see `_csc_labels`); every rank
    returns the same committed cache."""
    with shard_group() as (rank, world):
        if world > 1 and device is None and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        return _csc_labels(cfg, progress and rank == 0, device, rank, world)


def _csc_labels(cfg: StudyConfig, progress: bool, device: str | None, rank: int, world: int) -> CSCData:
    """The csc stage on rank `rank` of `world` processes (0 of 1: one process, as always).

    Sharded (world > 1), one build, one committer: rank 0 holds the artefact's lock and builds in
    `csc.partial/` as one process would; once it has made (or resumed) the partial, it sends the
    partial's path and fingerprint to the others, every rank labels its missing chunks
    (`label_shard`: chunk k goes to rank k % world) into the partial's `chunks/`, a barrier, then rank 0
    merges the chunk files where they lie (`label_split`, which also labels any still missing) and
    commits. A final barrier lets the others read the committed cache. A fresh cache sends no path:
    nobody labels. Chunks are planned and batched on their own, so labels are byte-identical to one
    process's, and a killed sharded run resumes from the chunks every rank saved.
    """
    data = corpus(cfg)
    train, valid = select_for_labelling(cfg, data)
    labeller = csc_labeller(cfg, device=device)
    description = {
        "stage": "csc",
        "encoder": {"name": cfg.assets.encoder, "weights_sha256": _encoder_sha256(cfg.assets.encoder, str(labeller.device)),
                    "window": labeller.window},
        "tokenizer": tokenizer_fingerprint(data.tokenizer),
        "corpus_fingerprint": data.fingerprint,
        "corpus": {k: getattr(cfg.corpus, k) for k in ("seq_len", "max_train_texts", "max_valid_texts", "min_tokens", "seed")},
        "csc": {k: getattr(cfg.csc, k) for k in csc_description_keys()},
        "precision": labeller.precision,
        "device_type": labeller.device.type,
    }
    key = artefacts.fingerprint({**description, "library_version": artefacts.__version__})
    folder = artefacts.run_dir(cfg.profile) / "csc"
    splits = (("train", 0, train), ("valid", 1, valid))
    shared: list[Path] = []  # the partial the ranks labelled together (at most one per stage call)

    def label_my_shard(work: Path) -> None:
        for name, split, seqs in splits:
            label_shard(labeller, name, split, seqs, cfg.csc, work, (rank, world), progress)

    def build(work: Path) -> dict[str, Any]:
        if world > 1 and not shared:  # rank 0, holding the lock: the partial exists, with its fingerprint
            shared.append(work)
            broadcast((str(work), key))
            label_my_shard(work)
            barrier()  # every rank's chunks are saved
        train_csc, valid_csc = [label_split(labeller, name, split, seqs, cfg.csc, work, progress) for name, split, seqs in splits]
        save_data(work / DATA_FILE, train, train_csc, valid, valid_csc)
        shutil.rmtree(work / "chunks", ignore_errors=True)  # merged into csc.npz
        raw = csc_stats(train_csc, "raw", cfg.train.budget_quantiles)
        return {"n_train": len(train), "n_valid": len(valid), "raw_total_mean": raw["mean"],
                "token_mean": raw["token_mean"], "n_labels": raw["n_labels"]}

    if rank == 0:
        artefacts.build_artefact(folder, description, build, cfg.to_json(), required=(DATA_FILE,))
        try:
            loaded = load_data(folder, train, valid)
        except DataError as exc:  # rank 0 alone relabels (the others wait at the last barrier)
            log.warning("%s: rebuilding the CSC cache", exc)
            artefacts.build_artefact(folder, description, build, cfg.to_json(), required=(DATA_FILE,), force=True)
            loaded = load_data(folder, train, valid)
        if world > 1:
            if not shared:
                broadcast((None, key))  # fresh: nothing to label
            barrier()  # committed
    else:
        work, rank0_key = broadcast(None)
        if rank0_key != key:
            raise ConfigError(f"rank {rank} would label other inputs than rank 0 (CSC fingerprint {key[:12]} vs "
                              f"{rank0_key[:12]}): start every rank with the same profile, --set overrides and assets")
        if work is not None:
            label_my_shard(Path(work))
            barrier()
        barrier()
        loaded = load_data(folder, train, valid)
    train_csc, valid_csc = loaded
    return CSCData(
        train_ids=train, train_csc=train_csc, valid_ids=valid, valid_csc=valid_csc,
        stats=csc_stats(train_csc, cfg.csc.scale, cfg.train.budget_quantiles),
        fingerprint=key,
        folder=folder,
    )


# --- stage `train` -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageInputs:
    """What both variants train from (loaded once: the CSC stage alone loads and hashes the encoder)."""

    backbone: BackboneData
    csc: CSCData
    data: TrainingData
    prior: np.ndarray | None
    prior_fingerprint: str | None


def counted_from(cfg: StudyConfig) -> int:
    """The first token position a training budget counts (`train.budget_span`): the generation prompt's length, or 0."""
    return cfg.generation.prompt_tokens if cfg.train.budget_span == "continuation" else 0


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
    training = prepare_data(csc, cfg.train, vocab_size=len(data.tokenizer), scale=cfg.csc.scale, counted_from=counted_from(cfg))
    prior = energy_prior(cfg) if cfg.train.token_cost_from_prior else None
    return StageInputs(backbone=backbone, csc=csc, data=training, prior=None if prior is None else prior.prior.cost,
                       prior_fingerprint=None if prior is None else prior.fingerprint)


def train_metabolic(cfg: StudyConfig, variant: str | None = None, progress: bool = True,
                    inputs: StageInputs | None = None) -> TrainResult:
    """Stage `train` for one variant (default `train.variant`): run folder `data/<profile>/train/<variant>/`.

    A finished run made from the same inputs and config is reused; an interrupted one resumes.
    """
    variant = variant or cfg.train.variant
    if variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r} is invalid: choose one of {', '.join(VARIANTS)}")
    inputs = inputs or stage_inputs(cfg, progress=progress)
    tcfg = replace(cfg.train, variant=variant)
    description = {"stage": "train", "variant": variant, "train": asdict(tcfg), "csc_scale": cfg.csc.scale,
                   "counted_from": counted_from(cfg),
                   "backbone": inputs.backbone.fingerprint, "csc": inputs.csc.fingerprint, "prior": inputs.prior_fingerprint}
    folder = artefacts.run_dir(cfg.profile) / "train" / variant

    def build(work: Path) -> dict[str, Any]:
        result = train(inputs.backbone.path, inputs.data, tcfg, variant, work, prior_cost=inputs.prior, progress=progress)
        (work / CHECKPOINT).unlink(missing_ok=True)  # best/ and last/ supersede it
        return {"best_epoch": result.best_epoch, "reference_ppl": result.reference_ppl, "epochs": len(result.metrics)}

    artefacts.build_artefact(folder, description, build, cfg.to_json(),
                             required=(METRICS, SELECTION, f"{BEST_DIR}/{SETTINGS_FILE}", f"{LAST_DIR}/{SETTINGS_FILE}"))
    selection = artefacts.read_json(folder / SELECTION)
    return TrainResult(variant=variant, folder=folder, metrics=read_metrics(folder / METRICS),
                       best_epoch=selection["best_epoch"], best_dir=folder / BEST_DIR, last_dir=folder / LAST_DIR,
                       reference_ppl=selection["reference_ppl"], targets=selection["targets"],
                       fingerprint=artefacts.fingerprint({**description, "library_version": artefacts.__version__}))


def train_variants(cfg: StudyConfig, progress: bool = True) -> dict[str, TrainResult]:
    """Stage `train` in the pipeline: both variants on the same data, backbone and protocol."""
    inputs = stage_inputs(cfg, progress=progress)
    return {v: train_metabolic(cfg, v, progress=progress, inputs=inputs) for v in VARIANTS}


# --- stage `evaluate` --------------------------------------------------------------------------------


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
    verified_budgets, rate_hints = verified_targets(csc, cfg, budgets)
    description = {
        "stage": "evaluate", "version": EVALUATION_VERSION, "generation": cfg.generation.__dict__, "csc": csc.fingerprint, "csc_scale": cfg.csc.scale,
        "backbone": backbone.fingerprint, "train": {v: r.fingerprint for v, r in results.items()},
        "encoder": cfg.assets.encoder, "budgets": budgets, "budget_range": budget_range,
        "verified_budgets": verified_budgets, "verified_model": cfg.train.variant,
    }
    folder = artefacts.run_dir(cfg.profile) / "evaluation"

    def build(work):
        torch.manual_seed(cfg.generation.seed)
        prompts = select_prompts(g, tok, csc.valid_ids)
        judge = Judge(load_backbone(backbone.path))  # one memo: texts several tables judge are scored once
        prefixes = PrefixLabeller(csc_labeller(cfg))  # one memo: texts several decodings produce are labelled once
        tables, records = {}, []
        models = {}
        # What simple predictors fitted on the same labels reach on the same held-out texts (cost_fit).
        ceilings = cost_ceilings(load_backbone(backbone.path), csc.train_ids, csc.train_csc, csc.valid_ids, csc.valid_csc,
                                 energy_prior(cfg).prior.cost, g.prompt_tokens, cfg.csc.scale)
        for variant, result in results.items():
            model = models[variant] = result.load_best()
            cal, note = choose_calibration(model, g, cfg.csc.scale, cfg.train.calib_ridge, csc.train_ids, csc.train_csc,
                                           list(budgets.values()))
            t, r = evaluate_variant(model, tok, judge, prefixes, prompts, budgets, g, cfg.csc.scale, budget_range, variant,
                                    cal, note, progress)
            fit = cost_model_fit(model, csc.valid_ids, csc.valid_csc, g.prompt_tokens, cfg.csc.scale)
            for table in t.values():
                best = result.metrics[result.best_epoch - 1] if 0 < result.best_epoch <= len(result.metrics) else {}
                table.update(best_epoch=result.best_epoch, val_ppl=best.get("val_ppl"), backbone_val_ppl=result.reference_ppl,
                             cost_model=fit, cost_model_vs_ceiling=against_ceiling(fit, ceilings))
            tables.update(t)
            records.extend(r)
        sampler = models.get(cfg.train.variant) or next(iter(models.values()))
        steered = None
        if g.verified_steered_candidates:
            steer_cal = {scale: choose_calibration(sampler, g, scale, cfg.train.calib_ridge, csc.train_ids, csc.train_csc,
                                                   list(b.values()))[0] for scale, b in verified_budgets.items()}
            steered = SteeredRows(g.verified_steered_candidates, model_token_costs(sampler), steer_cal, g.lambda_max)
        t, r = verified_tables(sampler, tok, judge, prefixes, prompts, verified_budgets, rate_hints, g.verified_candidates,
                               max_new_tokens=g.verified_max_new_tokens, band=g.verified_band,
                               max_probes=g.verified_max_probes, temperature=g.temperature, top_k=g.top_k, seed=g.seed,
                               steered=steered)
        tables.update(t)
        records.extend(r)
        combined = {"profile": cfg.profile, "budgets": budgets, "budget_source": levels.source,
                    "budget_range": list(budget_range), "training_targets": levels.training_targets,
                    "continuation_csc": {"n": int(cont.size), "min": float(cont.min()), "median": float(np.median(cont)),
                                         "max": float(cont.max())},
                    "verified_budgets": verified_budgets, "verified_rate_hints": rate_hints,
                    "verified_model": f"{cfg.train.variant} (best checkpoint; budget pathway off)",
                    "cost_model_ceiling": ceilings,
                    "prompts": prompts, "tables": tables, "paper": PAPER_TABLE1}
        artefacts.atomic_write_json(work / TABLES_FILE, combined)
        artefacts.atomic_write_text(work / GENERATIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))
        return {"n_generations": len(records)}

    artefacts.build_artefact(folder, description, build, cfg.to_json(), required=(TABLES_FILE, GENERATIONS_FILE))
    combined = artefacts.read_json(folder / TABLES_FILE)
    run = artefacts.run_dir(cfg.profile)
    for key, table in combined["tables"].items():
        artefacts.atomic_write_json(run / f"table1_{key}.json",
                                    {"profile": cfg.profile, **table, "paper": PAPER_TABLE1})
    artefacts.atomic_write_json(run / "table1.json", combined)
    return combined


@dataclass(frozen=True)
class BudgetLevels:
    """The generation budgets: the evaluate stage, notebook 04 and the explorer (06) use these."""

    budgets: dict[str, float]  # level (low/medium/high, or B0, B1, ...) -> CSC budget
    source: str  # where they come from, in words
    budget_range: tuple[float, float]  # CSC budgets generation accepts (trained and continuation range)
    continuation: np.ndarray  # true CSC totals of the training-text continuations
    training_targets: list[float]  # the training stage's targets (whole texts, every token counted)


def budget_levels(cfg: StudyConfig, csc: CSCData) -> BudgetLevels:
    """`generation.budgets`, else the `train.budget_quantiles` of the true CSC of training-text
    continuations (first `prompt_tokens` tokens = prompt, 1..max_new_tokens counted): what Table I scores."""
    g = cfg.generation
    data = prepare_data(csc, cfg.train, vocab_size=len(corpus(cfg).tokenizer), scale=cfg.csc.scale, counted_from=counted_from(cfg))
    cont = continuation_totals(csc.train_ids, csc.train_csc, g.prompt_tokens, g.max_new_tokens, cfg.csc.scale)
    if g.budgets:
        targets, source = list(g.budgets), "generation.budgets"
    else:
        targets = [float(np.quantile(cont, q)) for q in cfg.train.budget_quantiles]
        source = (f"quantiles {list(cfg.train.budget_quantiles)} of the true CSC of {cont.size} training-text continuations "
                  f"(first {g.prompt_tokens} tokens = prompt, 1..{g.max_new_tokens} tokens counted)")
    names = LEVELS if len(targets) == 3 else tuple(f"B{i}" for i in range(len(targets)))
    budget_range = (min(data.budget_range[0], float(cont.min())), max(data.budget_range[1], float(cont.max())))
    return BudgetLevels(dict(zip(names, targets)), source, budget_range, cont, [float(x) for x in data.targets])


def verified_targets(csc: CSCData, cfg: StudyConfig, budgets: dict[str, float]) -> tuple[dict, dict[str, float]]:
    """Budgets per CSC scale for the verified rows, and each scale's CSC per generated token (the
    controller's first probe). The configured scale keeps the evaluation's budgets; the other is
    given the same quantiles of its own continuation totals."""
    g = cfg.generation
    by_scale, hints = {}, {}
    ones = np.ones(1 + max(max(ids) for ids in csc.train_ids))
    for scale in g.verified_scales:
        lengths, totals = continuation_points(csc.train_ids, csc.train_csc, ones, g.prompt_tokens, scale,
                                              max_tokens=g.max_new_tokens)
        if totals.size < 3:
            lengths, totals = continuation_points(csc.train_ids, csc.train_csc, ones, g.prompt_tokens, scale)
        hints[scale] = float(np.median(totals / lengths)) if totals.size else 0.0
        if scale == cfg.csc.scale:
            by_scale[scale] = dict(budgets)
        else:
            by_scale[scale] = {name: float(np.quantile(totals, q)) for name, q in zip(budgets, cfg.train.budget_quantiles)}
    return by_scale, hints


def read_generations(cfg) -> list[dict[str, Any]]:
    """The per-generation records of the `evaluate` stage (run it first)."""
    path = artefacts.run_dir(cfg.profile) / "evaluation" / GENERATIONS_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: run the evaluate stage (python -m metabolic run --stages evaluate)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- stage `etokens` ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtokenResults:
    folder: Optional[Path]  # this machine's finished results (None when unfinished or only merged)
    rows: list[dict]  # every machine's finished rows under data/<profile>/etokens/, plus this run's unfinished ones
    skipped: list[dict]
    calibration: dict[str, Any]  # the first measured calibration found, else this machine's `skipped` reason
    machine: dict[str, Any]
    energy_available: bool  # this machine has an energy meter
    measured_here: bool
    complete: bool = True  # False: this machine's grid is unfinished (energy.part_seconds); rerun to go on
    grid: Optional[Grid] = None  # this run's grid (plan, units measured now and before), when it measured


class _PartDone(Exception):
    """Raised inside the artefact's build to leave an unfinished grid in its `.partial` folder."""

    def __init__(self, grid: Grid) -> None:
        super().__init__("e-token grid unfinished")
        self.grid = grid


def measure_etokens(cfg: StudyConfig, progress: bool = True) -> EtokenResults:
    """Stage `etokens`: measure this machine's grid (or its next part, or reuse it), then merge every machine's results.

    With `energy.measure="auto"`, a machine without an energy meter does not measure when results
    with energy already sit in data/<profile>/etokens/ (copied from GPU machines): it only merges.
    With `energy.part_seconds`, one run measures one part of the grid and keeps it; the next run
    measures the next part, and the run that measures the last one finishes the artefact.
    """
    e = cfg.energy
    root = artefacts.run_dir(cfg.profile) / "etokens"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = EnergyMeter(gpu_index=e.gpu_index, counter_period_s=e.counter_period_s, poll_interval_s=e.poll_interval_s)
    try:
        machine = machine_info(meter, device)
        existing = merge_results(root)
        with_energy = any(r.get("total_j") is not None for r in existing)
        measure = e.measure == "always" or (e.measure == "auto" and (meter.available or not with_energy))
        folder, grid = _measure_here(cfg, meter, machine, device, progress) if measure else (None, None)
    finally:
        meter.close()
    rows = merge_results(root)
    if folder is not None:
        own = artefacts.read_json(folder / MACHINE)
        skipped, own_calibration = own["skipped"], artefacts.read_json(folder / CALIBRATION)
    elif grid is not None:  # unfinished: what this machine has measured so far
        skipped, own_calibration = grid.skipped, grid.calibration
        rows += [{**r, "results_file": f"unfinished/{ROWS}"} for r in grid.rows]
    else:
        skipped, own_calibration = [], {"skipped": f"not measured on this machine (energy.measure={e.measure!r})"}
    calibration = next((c for c in calibrations(root) if "skipped" not in c), own_calibration)
    return EtokenResults(folder=folder, rows=rows, skipped=skipped, calibration=calibration, machine=machine,
                         energy_available=meter.available, measured_here=measure, complete=grid is None or grid.complete,
                         grid=grid)


def _measure_here(cfg: StudyConfig, meter: EnergyMeter, machine: dict, device: torch.device,
                  progress: bool) -> tuple[Optional[Path], Optional[Grid]]:
    """(the finished artefact or None while unfinished, the grid as this run left it or None when reused)."""
    e = cfg.energy
    data = corpus(cfg)
    valid = valid_sequences(cfg, data)
    tokenizer = data.tokenizer
    run_folder = artefacts.run_dir(cfg.profile)
    budgets = cfg.generation.budgets or cfg.train.budgets
    specs, skipped_models = model_specs(e.models, run_folder, budgets)
    # How a grid is split into runs does not change what it measures: none of these keys goes into the fingerprint.
    settings = {k: v for k, v in e.__dict__.items() if k not in ("measure", *RUN_SPLITTING)}
    description = stage_description(settings, cfg.seed, data.fingerprint, measured_model_keys(specs), machine)
    key = artefacts.fingerprint(description)[:8]
    folder = run_folder / "etokens" / f"{machine_tag(machine)}-{key}"
    result: dict[str, Grid] = {}

    def build(work: Path) -> dict[str, Any]:
        grid = run_grid(e, cfg.seed, meter, tokenizer, valid, specs, device, machine, work / CELLS,
                        token_cost=lambda: energy_prior(cfg).prior.cost, progress=progress)
        result["grid"] = grid
        if not grid.complete:
            # the partial folder keeps every unit measured so far, and the rows they make (a cut grid's table so far)
            artefacts.write_jsonl(work / ROWS, grid.rows)
            raise _PartDone(grid)
        artefacts.write_jsonl(work / ROWS, grid.rows)
        artefacts.atomic_write_json(work / CALIBRATION, grid.calibration)
        records = [grid.records[u.key] for u in grid.plan.units]  # in grid order
        units = [{k: r.get(k) for k in ("key", "estimate_s", "wall_s", "group_warmup_s")} | {"host": r["machine"]["host"]}
                 for r in records]
        hosts = {r["machine"]["host"]: r["machine"] for r in records}
        artefacts.atomic_write_json(work / MACHINE, {**machine, "skipped": skipped_models + grid.skipped,
                                                     "machines": list(hosts.values()), "units": units,
                                                     "plan": grid.whole_plan.describe()})
        return {"n_rows": len(grid.rows), "energy_available": meter.available,
                "wall_s": sum(u["wall_s"] or 0.0 for u in units)}

    try:
        artefacts.build_artefact(folder, description, build, cfg.to_json(), required=(ROWS, CALIBRATION, MACHINE))
    except _PartDone as done:
        return None, done.grid
    return folder, result.get("grid")  # no grid when the finished artefact was reused


def etokens_plan(cfg: StudyConfig, calibrate: bool = True) -> Plan:
    """The profile's e-token grid as planned for one H100 (`metabolic.energy.plan`), nothing measured:
    the models this run folder offers, the tasks, batch sizes and paths, each unit's estimate, the parts."""
    e = cfg.energy
    specs, _ = model_specs(e.models, artefacts.run_dir(cfg.profile), cfg.generation.budgets or cfg.train.budgets)
    tasks = make_tasks(e.input_tokens, e.max_output_tokens, e.tasks)
    return make_plan(e, grid_units(e, specs, tasks, calibrate=calibrate and e.calibrate), tasks, cfg.seed)


# Registered in pipeline order; later issues add their stages here.
STAGES: dict[str, Callable[[StudyConfig], Any]] = {
    "corpus": corpus,
    "pretrain": pretrain_backbone,
    "prior": energy_prior,
    "csc": csc_labels,
    "train": train_variants,
    "evaluate": evaluate_budgets,
    "etokens": measure_etokens,  # last: it also measures the trained MetabolicGPT-2 when it exists
}


def run(cfg: StudyConfig, stages: list[str] | None = None) -> dict[str, float]:
    """Run `stages` (default: all, in order) and return each stage's wall time in seconds."""
    names = list(STAGES) if not stages else stages
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}: choose among {', '.join(STAGES)}")
    timings: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        STAGES[name](cfg)
        timings[name] = time.perf_counter() - t0
        log.info("stage %s done in %.1f s", name, timings[name])
    return timings
