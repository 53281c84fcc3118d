"""Integration: the foundation stages on a tiny config, their artefacts, and reuse on a second run."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import TINY_OVERRIDES
from metabolic.core import artefacts
from metabolic.core.config import apply_overrides
from metabolic.core.profiles import load_config
from metabolic.model.backbone import load_backbone
from metabolic.pipeline import stages


def test_foundation_stages_run_and_are_reused(tiny_cfg):
    timings = stages.run(tiny_cfg, ["corpus", "pretrain", "prior"])
    assert set(timings) == {"corpus", "pretrain", "prior"}
    root = artefacts.run_dir(tiny_cfg.run_name)
    for name in ("corpus", "backbone", "prior"):
        manifest = artefacts.read_manifest(root / name)
        assert manifest is not None and manifest["description"]["library_version"]
        # the config of the run that built it: another test's config with other energy or generation settings
        # shares these artefacts, so only the sections they are made from must agree
        saved, ours = json.loads((root / name / artefacts.CONFIG_FILE).read_text()), json.loads(tiny_cfg.to_json())
        made_from = ("profile", "seed", "assets", "corpus", {"backbone": "backbone", "prior": "prior"}.get(name, "corpus"))
        assert {k: saved[k] for k in made_from} == {k: ours[k] for k in made_from}
    backbone = stages.pretrain_backbone(tiny_cfg, progress=False)
    assert backbone.pretrained_here and [m["step"] for m in backbone.metrics] == [2, 4]
    model = load_backbone(backbone.path, "cpu")
    assert model.config.n_layer == 1 and model.config.vocab_size == 50257
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[15496, 995]])).logits).all()
    before = (root / "backbone" / "model.safetensors").stat().st_mtime_ns
    stages.run(tiny_cfg, ["pretrain"])  # same inputs: reused, not retrained
    assert (root / "backbone" / "model.safetensors").stat().st_mtime_ns == before
    prior = stages.energy_prior(tiny_cfg).prior
    assert prior.cost.shape == (50257,) and abs(prior.cost.mean() - 1) < 1e-6 and np.all(prior.cost >= 0.3)


def test_corpus_stage_matches_the_papers_counts(tiny_cfg):
    data = stages.corpus(tiny_cfg)
    assert (len(data.train_ids), len(data.valid_ids)) == (23767, 2461)
    seqs = stages.train_sequences(tiny_cfg, data)
    assert len(seqs) == 64 and max(map(len, seqs)) <= 32
    assert seqs == stages.train_sequences(tiny_cfg, data)


def test_every_stage_follows_the_stage_protocol(tiny_cfg):
    from metabolic.pipeline.corpus import CorpusStage
    from metabolic.pipeline.csc import CSCStage
    from metabolic.pipeline.etokens import EtokenStage
    from metabolic.pipeline.evaluate import EvaluateStage
    from metabolic.pipeline.pretrain import PretrainStage
    from metabolic.pipeline.prior import PriorStage
    from metabolic.pipeline.stage import Stage
    from metabolic.pipeline.train import TrainStage

    for cls in (CorpusStage, PretrainStage, PriorStage, CSCStage, TrainStage, EvaluateStage, EtokenStage):
        assert all(callable(getattr(cls, name, None)) for name in ("description", "build", "load")), cls
        assert isinstance(cls.required, tuple) and cls.required, cls
    stage = CorpusStage(tiny_cfg)
    assert isinstance(stage, Stage) and stage.folder == "corpus"


def test_every_stage_returns_the_key_its_manifest_records(tiny_cfg):
    """What a stage hands to the next is the key `build_artefact` committed, never one rebuilt by hand."""
    from test_faults import EVALUATE_OVERRIDES

    cfg = load_config("smoke", {**TINY_OVERRIDES, **EVALUATE_OVERRIDES})
    returned = {"corpus": stages.corpus(cfg), "backbone": stages.pretrain_backbone(cfg, progress=False),
                "prior": stages.energy_prior(cfg), "csc": stages.csc_labels(cfg, progress=False),
                **{f"train/{v}": r for v, r in stages.train_variants(cfg, progress=False).items()},
                "evaluation": stages.evaluation(cfg, progress=False)}
    run = artefacts.run_dir(cfg.run_name)
    # etokens on a one-cell grid (timings only: no energy counter in the tests); its folder, etokens/<machine>-<key>/,
    # is the one its result names
    etokens = stages.measure_etokens(apply_overrides(cfg, ONE_CELL_GRID), progress=False)
    assert etokens.folder is not None and etokens.folder.parent == run / "etokens"
    reused = stages.measure_etokens(apply_overrides(cfg, ONE_CELL_GRID), progress=False)
    assert reused.grid is None and (reused.folder, reused.fingerprint) == (etokens.folder, etokens.fingerprint)
    returned[etokens.folder.relative_to(run).as_posix()] = etokens
    assert sorted(returned) == sorted(["backbone", "corpus", "csc", "evaluation", "prior", "train/expected-cost",
                                       "train/faithful", f"etokens/{etokens.folder.name}"])
    for folder, result in returned.items():
        manifest = artefacts.read_manifest(run / folder)
        assert result.fingerprint == manifest["fingerprint"] == artefacts.artefact_key(manifest["description"]), folder


# The e-token grid at its smallest: one model, task, batch size and path, one repeat of short windows.
ONE_CELL_GRID = {"energy.models": ("tiny",), "energy.tasks": ("creative",), "energy.batch_sizes": (1,),
                 "energy.paths": ("default",), "energy.repeats": 1, "energy.input_tokens": 8, "energy.max_output_tokens": 2,
                 "energy.min_window_s": 0.02, "energy.idle_s": 0.02, "energy.measure": "always"}


def test_budget_levels_read_what_training_saved_and_derive_only_other_scales(tiny_cfg, monkeypatch):
    """On the trained scale the evaluation's levels take training's targets and range from its artefact
    (selection.json), never by redoing training's data preparation; another scale derives them by its rule."""
    from metabolic.evaluate import budgets as budget_derivation
    from metabolic.train import data as training_data
    from metabolic.train import loop

    trained = stages.train_metabolic(tiny_cfg, progress=False)
    csc = stages.csc_labels(tiny_cfg, progress=False)
    selection = json.loads((trained.folder / loop.SELECTION).read_text())
    real_prepare = budget_derivation.prepare_data

    def refuse(*args, **kwargs):
        raise AssertionError("training's data preparation rerun for data its artefact holds")

    monkeypatch.setattr(budget_derivation, "prepare_data", refuse)
    levels = stages.budget_levels(tiny_cfg, csc)
    assert levels.training_targets == selection["targets"] and len(levels.budgets) == 3
    low, high = selection["budget_range"]
    assert levels.budget_range == (min(low, levels.continuation.min()), max(high, levels.continuation.max()))
    monkeypatch.setattr(budget_derivation, "prepare_data", real_prepare)
    other = "length" if tiny_cfg.csc.scale == "raw" else "raw"
    on_other = stages.budget_levels(tiny_cfg, csc, other)
    data = real_prepare(csc, tiny_cfg.train, vocab_size=50257, scale=other,
                        counted_from=training_data.counted_from(tiny_cfg.train, tiny_cfg.generation.prompt_tokens))
    assert on_other.training_targets == data.targets.tolist() and on_other.training_targets != levels.training_targets
