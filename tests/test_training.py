"""Lagrangian training: loss terms, smoke steps, resume == uninterrupted, bad input, the `train` stage.

Training data are real: WikiText-2 texts labelled by the real CSC labeller (all-MiniLM-L6-v2), on a
tiny from-scratch GPT-2 with the real GPT-2 vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from metabolic.core.config import BackboneConfig
from metabolic.core.errors import ConfigError, DataError
from metabolic.csc.dataset import CSCData, csc_stats
from metabolic.model.backbone import scratch_model
from metabolic.model.metabolic_gpt2 import MetabolicGPT2
from metabolic.train import loop as training
from metabolic.train import losses
from metabolic.train.data import make_batch, prepare_data, target_budgets, token_label_means
from metabolic.train.step import make_optimizer, step_budgets, train_step
from metabolic.train.validation import balanced_score
from torch.nn import functional as F

N_TRAIN, N_VALID = 8, 4


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_backbone")
    model = scratch_model(BackboneConfig(n_layer=1, n_embd=32, n_head=2, seed=1), vocab_size=len(tokenizer),
                          n_positions=64, eos_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def csc_data(tiny_cfg, assets_dir, tokenizer):
    """12 short WikiText-2 training texts with exact CSC labels (8 to train on, 4 to validate)."""
    from metabolic.data.corpus import non_empty_texts
    from metabolic.pipeline import stages

    lines = non_empty_texts((assets_dir / "wikitext-2" / "train.txt").read_text(encoding="utf-8").splitlines())
    seqs = []
    for text in lines:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if 6 <= len(ids) <= 20 and not text.startswith("="):
            seqs.append(ids)
        if len(seqs) == N_TRAIN + N_VALID:
            break
    labels = stages.csc_labeller(tiny_cfg, device="cpu").label(seqs, progress=False)
    train_csc, valid_csc = labels[:N_TRAIN], labels[N_TRAIN:]
    return CSCData(train_ids=seqs[:N_TRAIN], train_csc=train_csc, valid_ids=seqs[N_TRAIN:], valid_csc=valid_csc,
                   stats=csc_stats(train_csc, "raw", (0.25, 0.5, 0.75)), fingerprint="test-labels", folder=assets_dir)


def train_cfg(tiny_cfg, **changes):
    base = dataclasses.replace(tiny_cfg.train, epochs=3, batch_size=4, lr=1e-3, cost_lr_multiplier=10.0, calib_refit_every=1)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def data(csc_data, tiny_cfg, tokenizer):
    return prepare_data(csc_data, tiny_cfg.train, vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def runs(backbone_dir, data, tiny_cfg, tmp_path_factory):
    """Uninterrupted 3-epoch runs of both variants."""
    out = {}
    for variant in ("faithful", "expected-cost"):
        work = tmp_path_factory.mktemp(f"run-{variant}")
        out[variant] = training.train(backbone_dir, data, train_cfg(tiny_cfg), variant, work, progress=False, device="cpu")
    return out


# --- loss terms -------------------------------------------------------------------------------


def padded_batch():
    ids = torch.tensor([[5, 7, 5, 9, 7], [3, 4, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return ids, mask


def test_lm_loss_equals_cross_entropy_ignoring_padding():
    ids, mask = padded_batch()
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    at = losses.Positions.of(ids, mask)
    assert at.seq.tolist() == [0, 0, 0, 0, 1] and at.pos.tolist() == [0, 1, 2, 3, 0]
    ours = losses.lm_loss(F.log_softmax(logits[at.seq, at.pos], -1), at)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))[:, 1:]
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ours, ref)


def test_expected_totals_entropy_and_repetition_by_hand():
    ids, mask = padded_batch()
    at = losses.Positions.of(ids, mask)
    probs = torch.softmax(torch.randn(at.seq.numel(), 11, generator=torch.Generator().manual_seed(1)), -1)
    costs = torch.rand(11, 2, generator=torch.Generator().manual_seed(2))
    totals = losses.expected_totals(probs, at, ids, mask, costs)
    for b in range(2):
        want = costs[ids[b, 0]] + sum(probs[n] @ costs for n in range(at.seq.numel()) if at.seq[n] == b)
        torch.testing.assert_close(totals[b], want)
    h = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(losses.mean_entropy(probs.log(), probs), h)
    # the repetition term by its definition, one prediction at a time: r[n] = the mass prediction n gives the
    # distinct tokens already seen (after x_<=2 = (5, 7, 5): tokens {5, 7}); per sequence relu(mean(r - repeats))
    excess = {}
    for n, (b, t) in enumerate(zip(at.seq.tolist(), at.pos.tolist())):
        seen = set(ids[b, : t + 1].tolist())
        r = sum(probs[n, v] for v in seen)
        excess.setdefault(b, []).append(r - float(ids[b, t + 1].item() in seen))
    want = sum(F.relu(torch.stack(e).mean()) for e in excess.values()) / len(excess)
    torch.testing.assert_close(losses.repetition_loss(probs, at, ids, mask), want)
    # sequence 0 repeats 2 of its 4 next tokens (x_3 = 5, x_5 = 7); a model putting all its mass on
    # already-seen tokens repeats 4 of 4: excess 0.5 for that sequence, none for sequence 1
    onehot = F.one_hot(ids[at.seq, at.pos], 11).float()
    excess0 = losses.repetition_loss(onehot, at, ids, mask)
    torch.testing.assert_close(excess0, torch.tensor((0.5 + 1.0) / 2))


def test_csc_mse_ignores_unlabelled_tokens_and_constraint_terms():
    costs = torch.tensor([[[0.1, 0.3], [0.2, 0.2]]])
    labels = torch.tensor([[0.1, float("nan")]])
    assert float(losses.csc_mse(costs, labels)) == pytest.approx((0.0 + 0.2**2) / 2)
    totals = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    budgets = torch.tensor([[1.5, 1.5], [1.5, 1.5]])
    lagr, sq, gap = losses.constraint_terms(totals, budgets, torch.tensor([2.0, 0.5]), per_sequence=False)
    torch.testing.assert_close(gap, torch.tensor([0.5, 0.5]))
    assert float(lagr) == pytest.approx(2.0 * 0.5 + 0.5 * 0.5) and float(sq) == pytest.approx(0.5)
    _, sq_seq, _ = losses.constraint_terms(totals, budgets, torch.zeros(2), per_sequence=True)
    assert float(sq_seq) == pytest.approx(((0.25 + 0.25) + (2.25 + 0.25)) / 2)


def test_vocab_aux_is_zero_for_perfect_correlation():
    ids = torch.tensor([1, 4, 6])
    means = torch.tensor([0.1, 0.3, 0.2])
    costs = torch.zeros(8, 2)
    costs[ids] = torch.stack([means * 2 + 1, means * 5], 1)
    assert float(losses.vocab_aux_loss(costs, ids, means)) == pytest.approx(0.0, abs=1e-6)
    costs[ids, 1] = -means
    assert float(losses.vocab_aux_loss(costs, ids, means)) == pytest.approx(1.0, abs=1e-6)  # (0 + 2) / 2


# --- training ---------------------------------------------------------------------------------


def test_fixed_budget_steps_lower_lm_and_csc_losses_and_move_lambda(backbone_dir, data, tiny_cfg, tokenizer):
    cfg = train_cfg(tiny_cfg, curriculum_start=1.0, cost_parameterisation="paper")  # costs start at 0.05 / token
    torch.manual_seed(0)
    from metabolic.model.backbone import load_backbone

    model = MetabolicGPT2(load_backbone(backbone_dir, device="cpu"), training.model_settings(cfg, "faithful", data.budget_scale))
    opt = make_optimizer(model, cfg)
    vocab_ids, means = (torch.as_tensor(a) for a in token_label_means(data.train_ids, data.train_labels))
    batch = make_batch(data.train_ids[:4], data.train_labels[:4], data.train_totals[:4], "cpu")
    budgets = step_budgets(model, batch, data.targets, 1.0)
    history, lambdas = [], []
    for _ in range(6):
        res = train_step(model, opt, batch, budgets, cfg, vocab_ids, means.float())
        assert all(math.isfinite(v) for v in res.terms.as_floats().values())
        history.append(res.terms.as_floats())
        lambdas.append(model.dual_lambda.clone())
    assert history[-1]["lm"] < history[0]["lm"]
    assert history[-1]["csc_mse"] < history[0]["csc_mse"]
    assert not torch.equal(lambdas[0], lambdas[-1])
    assert torch.all(lambdas[-1] > 0)  # init costs (0.05 / token) exceed the budgets: lambda rises
    assert model.calibration_stats.n == 6 * 4  # every step's pairs reached the online calibration


@pytest.mark.parametrize("variant", ["faithful", "expected-cost"])
def test_training_runs_log_every_monitored_quantity(runs, variant, data):
    result = runs[variant]
    rows = result.metrics
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    needed = {"train_loss", "val_loss", "aux", "err", "lambda", "shape", "target_budget", "achieved_budget",
              "calib_a", "calib_b", "val_ppl", "train_lm", "train_csc_mse", "train_lagrangian", "train_constraint_sq",
              "train_entropy", "train_repetition", "train_vocab_aux", "val_level_achieved", "balanced_score"}
    assert needed <= set(rows[0])
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)
    assert rows[-1]["train_csc_mse"] < rows[0]["train_csc_mse"]
    assert all(0 <= r["lambda"] <= 100.0 for r in rows)
    if variant == "expected-cost":
        assert rows[-1]["lambda"] != rows[0]["lambda"]  # the dual variable moves
    else:  # scaled costs start at the labels' mean: the loose curriculum budgets are never exceeded here
        assert all(r["lambda"] == 0.0 and r["err"] < 0 for r in rows)
    assert [r["calib_n"] for r in rows] == [N_TRAIN, 2 * N_TRAIN, 3 * N_TRAIN]
    if variant == "faithful":
        assert [r["shape"] for r in rows] == [tiny_shape(0), tiny_shape(1), 1.0]
        assert rows[-1]["target_budget"] == pytest.approx(float(np.mean(data.targets)))
    else:
        assert all(r["shape"] == 1.0 for r in rows)
        # each text's own CSC total, held to in proxy units through the calibration fitted on the same pairs:
        # no average gap is left once the calibration has points (lambda does not run away)
        assert rows[-1]["target_budget"] > 0 and abs(rows[-1]["err"]) < 0.25 * rows[-1]["target_budget"]
    best = min(rows, key=lambda r: (r["balanced_score"], -r["epoch"]))
    assert result.best_epoch == best["epoch"]
    assert best["balanced_score"] == pytest.approx(
        balanced_score(best["val_ppl"], result.reference_ppl, best["val_level_rel_err"]))
    selection = json.loads((result.folder / training.SELECTION).read_text())
    assert selection["best_epoch"] == result.best_epoch
    model = result.load_best(device="cpu")
    assert model.settings.variant == variant
    labels = np.concatenate(data.train_labels).astype(np.float64)
    assert model.settings.token_cost_init == pytest.approx(float(np.nanmean(labels)))  # token_cost_init_from_csc
    assert model.training_info["targets"] == pytest.approx(data.targets.tolist())


def tiny_shape(epoch: int) -> float:
    return 1.5 + (1.0 - 1.5) * epoch / 2  # train.curriculum_start = 1.5 over 3 epochs


def test_interrupted_after_epoch_1_of_3_resumes_to_identical_results(runs, backbone_dir, data, tiny_cfg, tmp_path):
    cfg = train_cfg(tiny_cfg)
    with pytest.raises(KeyboardInterrupt):
        training.train(backbone_dir, data, cfg, "expected-cost", tmp_path, progress=False, stop_after_epochs=1, device="cpu")
    assert len(training.read_metrics(tmp_path / training.METRICS)) == 1
    resumed = training.train(backbone_dir, data, cfg, "expected-cost", tmp_path, progress=False, device="cpu")
    reference = runs["expected-cost"]
    assert json.dumps(resumed.metrics, sort_keys=True) == json.dumps(reference.metrics, sort_keys=True)
    assert resumed.best_epoch == reference.best_epoch
    a = MetabolicGPT2.from_pretrained(resumed.last_dir, device="cpu").state_dict()
    b = MetabolicGPT2.from_pretrained(reference.last_dir, device="cpu").state_dict()
    for key in b:
        assert torch.equal(a[key], b[key]), key


def test_a_flipped_checkpoint_resumes_from_the_last_good_epoch(runs, backbone_dir, data, tiny_cfg, tmp_path, caplog):
    """kill -9 after epoch 2 of 3, 16 bytes flipped in the newest checkpoint: the rerun discards it, resumes
    from epoch 1's and ends with the uninterrupted run's metrics and weights (the damaged one once gave
    perplexity 5e21 and was committed)."""
    import logging

    cfg = train_cfg(tiny_cfg)
    assert cfg.epochs == 3
    with pytest.raises(KeyboardInterrupt):
        training.train(backbone_dir, data, cfg, "expected-cost", tmp_path, progress=False, stop_after_epochs=2, device="cpu")
    ckpt = tmp_path / training.CHECKPOINT
    data_bytes = bytearray(ckpt.read_bytes())
    for i in range(len(data_bytes) // 2, len(data_bytes) // 2 + 16):
        data_bytes[i] ^= 0xFF
    ckpt.write_bytes(bytes(data_bytes))
    with caplog.at_level(logging.WARNING, logger="metabolic.core.resume"):
        resumed = training.train(backbone_dir, data, cfg, "expected-cost", tmp_path, progress=False, device="cpu")
    assert any("is damaged (its bytes do not match their recorded hash)" in r.getMessage() for r in caplog.records)
    reference = runs["expected-cost"]
    assert json.dumps(resumed.metrics, sort_keys=True) == json.dumps(reference.metrics, sort_keys=True)
    a = MetabolicGPT2.from_pretrained(resumed.last_dir, device="cpu").state_dict()
    b = MetabolicGPT2.from_pretrained(reference.last_dir, device="cpu").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in b)


def test_a_resumed_run_keeps_the_a_mix_its_cross_validation_chose(backbone_dir, data, tiny_cfg, tmp_path):
    cfg = dataclasses.replace(train_cfg(tiny_cfg), epochs=2, a_mix=1.0, a_mix_choices=(0.0,))  # the config's a_mix loses
    with pytest.raises(KeyboardInterrupt):
        training.train(backbone_dir, data, cfg, "faithful", tmp_path, progress=False, stop_after_epochs=1, device="cpu")
    resumed = training.train(backbone_dir, data, cfg, "faithful", tmp_path, progress=False, device="cpu")
    model = MetabolicGPT2.from_pretrained(resumed.last_dir, device="cpu")
    assert model.settings.a_mix == 0.0 and model.training_info["a_mix_cv"]["a_mix"] == 0.0


def test_checkpoint_from_another_config_is_refused_untouched(backbone_dir, data, tiny_cfg, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        training.train(backbone_dir, data, train_cfg(tiny_cfg), "faithful", tmp_path, progress=False,
                       stop_after_epochs=1, device="cpu")
    ckpt = tmp_path / training.CHECKPOINT
    before = ckpt.read_bytes()
    with pytest.raises(DataError, match="another config"):
        training.train(backbone_dir, data, train_cfg(tiny_cfg, lr=5e-4), "faithful", tmp_path, progress=False, device="cpu")
    with pytest.raises(DataError, match="another config"):
        training.train(backbone_dir, data, train_cfg(tiny_cfg), "expected-cost", tmp_path, progress=False, device="cpu")
    assert ckpt.read_bytes() == before
    assert len(training.read_metrics(tmp_path / training.METRICS)) == 1


def test_csc_cache_for_another_tokenizer_is_refused(csc_data, tiny_cfg, backbone_dir, data, tmp_path):
    foreign = dataclasses.replace(csc_data, train_ids=[[i + 60000 for i in s] for s in csc_data.train_ids])
    with pytest.raises(DataError, match="another tokenizer"):
        prepare_data(foreign, tiny_cfg.train, vocab_size=50257)
    small_vocab = dataclasses.replace(data, train_ids=[[50300] + s[1:] for s in data.train_ids])
    with pytest.raises(DataError, match="another tokenizer"):
        training.train(backbone_dir, small_vocab, train_cfg(tiny_cfg), "faithful", tmp_path, progress=False, device="cpu")
    assert not (tmp_path / training.CHECKPOINT).exists()


def test_target_budgets_from_stats_config_or_quantiles(csc_data, tiny_cfg):
    stats = csc_data.stats
    totals = np.array([0.2, 0.4, 0.6, 0.8])
    got = target_budgets(tiny_cfg.train, stats, totals)
    np.testing.assert_allclose(got, sorted(stats["budgets"].values()))
    fixed = dataclasses.replace(tiny_cfg.train, budgets=(0.9, 0.3, 0.5))
    np.testing.assert_allclose(target_budgets(fixed, stats, totals), [0.3, 0.5, 0.9])
    k2 = dataclasses.replace(tiny_cfg.train, K=2, budget_quantiles=(0.25, 0.75))
    np.testing.assert_allclose(target_budgets(k2, stats, totals), np.quantile(totals, [0.25, 0.75]))
    k4 = dataclasses.replace(tiny_cfg.train, K=4)
    with pytest.raises(ConfigError, match="give K quantiles"):
        target_budgets(k4, stats, totals)


def test_unknown_variant_is_a_config_error(backbone_dir, data, tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="variant"):
        training.train(backbone_dir, data, train_cfg(tiny_cfg), "budgetless", tmp_path, progress=False, device="cpu")


def test_train_stage_builds_both_variant_folders_and_reuses_them(tiny_cfg):
    from metabolic.core import artefacts
    from metabolic.pipeline import stages

    results = stages.STAGES["train"](tiny_cfg, progress=False)
    assert set(results) == {"faithful", "expected-cost"}
    for variant, result in results.items():
        assert result.folder == artefacts.run_dir(tiny_cfg.run_name) / "train" / variant
        assert len(result.metrics) == tiny_cfg.train.epochs
        assert not (result.folder / training.CHECKPOINT).exists()  # best/ and last/ supersede it
        assert MetabolicGPT2.from_pretrained(result.best_dir, device="cpu").settings.variant == variant
    stamp = (results["faithful"].folder / "manifest.json").stat().st_mtime_ns
    again = stages.train_metabolic(tiny_cfg, "faithful", progress=False)
    assert (again.folder / "manifest.json").stat().st_mtime_ns == stamp  # fresh artefact reused, not retrained
    assert again.metrics == results["faithful"].metrics
