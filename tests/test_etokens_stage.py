"""Workloads, the query runner and the `etokens` stage: CPU path for real, GPU path with NVML mocked (autospec)."""

from __future__ import annotations

import contextlib
import math
import time
from unittest import mock

import numpy as np
import pynvml
import pytest
import torch
from fake_counters import Powercap, fake_nvml, fake_rapl
from metabolic.core.config import apply_overrides
from metabolic.core.errors import ConfigError, DataError
from metabolic.energy.joules import JouleBudgetStopping, fit_linear, tokens_predictor
from metabolic.energy.workloads import SCRATCH_SHAPES, TASK_RATIOS, ModelSpec, load_model, make_tasks, model_specs, pick_prompts
from metabolic.evaluate.scoring import hit_fraction

WATTS = 100.0  # the fake GPU draws a constant 100 W


@contextlib.contextmanager
def fake_gpu_counter(tmp_path):
    """An NVML energy counter that grows at exactly WATTS (mJ = W x ms), patched with autospec; no RAPL."""
    t0 = time.perf_counter()
    with fake_rapl(None, tmp_path), fake_nvml(lambda h: int(WATTS * 1000 * (time.perf_counter() - t0))):
        yield


# --- workloads -----------------------------------------------------------------------------------


def test_tasks_follow_the_note_ratios():
    tasks = {t.name: t for t in make_tasks(64, 512)}
    assert [(t.input_tokens, t.output_tokens) for t in tasks.values()] == [(64, 6), (64, 64), (64, 320), (10, 500)]
    for t in tasks.values():
        assert t.output_tokens / t.input_tokens == pytest.approx(TASK_RATIOS[t.name], rel=0.1)


def test_task_cap_keeps_ratio_and_context():
    tasks = make_tasks(32, 8)
    assert [(t.input_tokens, t.output_tokens) for t in tasks] == [(32, 3), (8, 8), (2, 8), (1, 8)]
    with pytest.raises(ConfigError, match="exceeds GPT-2's 1024 positions"):
        make_tasks(600, 1000, ("chat",))
    with pytest.raises(ConfigError, match="unknown task 'poetry'"):
        make_tasks(8, 8, ("poetry",))


def test_prompts_are_exact_and_seeded():
    seqs = [list(range(i, i + n)) for i, n in enumerate([3, 10, 12, 40, 7, 9])]
    a = pick_prompts(seqs, 3, 8, seed=0)
    assert a == pick_prompts(seqs, 3, 8, seed=0)
    assert all(len(p) == 8 for p in a) and len(a) == 3
    assert len(pick_prompts(seqs, 10, 8, seed=1)) == 10  # with replacement when few texts are long enough
    with pytest.raises(DataError, match="no validation text has 50 tokens"):
        pick_prompts(seqs, 1, 50, seed=0)


def test_model_specs_and_optional_metabolic(tmp_path):
    specs, skipped = model_specs(("tiny", "gpt2-small-scratch", "metabolic"), tmp_path, budgets=(1.0, 2.0))
    assert [s.name for s in specs] == ["tiny", "gpt2-small-scratch"]
    assert specs[1].shape == (12, 768, 12)
    assert skipped and skipped[0]["model"] == "metabolic"
    with pytest.raises(ConfigError, match="unknown model 'llama'"):
        model_specs(("llama",), tmp_path, ())


def test_scratch_models_have_the_right_size(tokenizer):
    model = load_model(ModelSpec("tiny", "scratch", shape=SCRATCH_SHAPES["tiny"]), len(tokenizer),
                       tokenizer.eos_token_id, torch.device("cpu"), torch.float32)
    assert model.config.n_layer == 2 and model.config.n_embd == 128 and model.config.n_positions == 1024


# --- joule-fit maths and the joule-budget stopping criterion ------------------------------------


def test_fit_linear_recovers_a_plane():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 100, size=(20, 2)).astype(float)
    y = 3.0 + 0.05 * x[:, 0] + 0.9 * x[:, 1]
    fit = fit_linear(x, y, ("input_tokens", "output_tokens"))
    assert fit.intercept == pytest.approx(3.0) and fit.coef == pytest.approx((0.05, 0.9))
    assert fit.r2 == pytest.approx(1.0) and max(abs(r) for r in fit.residuals) < 1e-9
    noisy = fit_linear(x, y + rng.normal(0, 5, 20), ("input_tokens", "output_tokens"))
    assert 0 < noisy.r2 < 1 and noisy.rmse > 1


def test_fit_linear_bad_inputs():
    with pytest.raises(DataError, match="cannot fit"):
        fit_linear([[1.0], [2.0]], [1.0, 2.0], ("semantic_cost",))
    with pytest.raises(DataError, match="NaN"):
        fit_linear([[1.0], [2.0], [3.0], [4.0]], [1.0, float("nan"), 2.0, 3.0], ("semantic_cost",))
    with pytest.raises(DataError, match="pair up"):
        fit_linear([[1.0], [2.0]], [1.0], ("semantic_cost",))


def test_hit_rate():
    assert hit_fraction([9.5, 11.5, 10.0, 20.0], [10.0] * 4, 10) == 0.5
    with pytest.raises(DataError):
        hit_fraction([], [], 10)


def test_joule_budget_stops_where_the_joule_fit_says(tokenizer):
    model = load_model(ModelSpec("tiny", "scratch", shape=SCRATCH_SHAPES["tiny"]), len(tokenizer),
                       tokenizer.eos_token_id, torch.device("cpu"), torch.float32)
    x = [[i, o] for i in (4, 8) for o in (1, 5, 9)]
    fit = fit_linear(x, [2.0 + 0.1 * i + 0.5 * o for i, o in x], ("input_tokens", "output_tokens"))
    predict, step = tokens_predictor(fit)
    ids = torch.tensor([list(range(100, 108))])
    budget = 2.0 + 0.1 * 8 + 0.5 * 6 + 0.2  # room for 6 tokens, not 7
    crit = JouleBudgetStopping([budget], 8, predict, step)
    from transformers import StoppingCriteriaList

    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id, eos_token_id=None, stopping_criteria=StoppingCriteriaList([crit]))
    assert out.shape[1] - 8 == 6
    with pytest.raises(ConfigError, match="joule budgets"):
        JouleBudgetStopping([0.0], 8, predict, step)


# --- the stage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cfg(tiny_cfg):
    return apply_overrides(tiny_cfg, {
        "energy.models": ("tiny",), "energy.tasks": ("creative",), "energy.batch_sizes": (1, 2),
        "energy.paths": ("default", "static"), "energy.repeats": 2, "energy.input_tokens": 16,
        "energy.max_output_tokens": 3, "energy.min_window_s": 0.02, "energy.idle_s": 0.05,
        "energy.joule_fit_model": "tiny", "energy.joule_fit_requests": 5, "energy.budget_prompts": 2,
        "energy.budget_fractions": (1.0,),
    })


def test_stage_on_cpu_records_unavailable_energy(small_cfg, tmp_path):
    """No readable counter (RAPL not exposed, as here and on CI): timings only, each row says which counters
    were missing and why, and no energy field is a number."""
    from metabolic.energy.measurement import summarise
    from metabolic.pipeline.stages import measure_etokens

    with fake_rapl(None, tmp_path):
        res = measure_etokens(small_cfg, progress=False)
    assert not res.energy_available and res.machine["energy_source"] == "unavailable"
    assert res.machine["energy_counters"] == "none"
    # every counter not read, with why (the measured device's among them): one field, not a second for the latter
    assert "cpu package + dram: RAPL not exposed: no " in res.machine["energy_missing"]
    assert "energy_unavailable_reason" not in res.machine
    rows = [r for r in res.rows if r["results_file"].startswith(res.folder.name)]
    assert len(rows) == 1 * 2 * 1 * 2 * 2  # models x paths x tasks x batch sizes x repeats
    for r in rows:
        assert r["total_j"] is None and r["e_in_wh"] is None and r["energy_source"] == "unavailable"
        assert "CPU/wall timings only" in r["etoken_note"]
        assert r["energy_missing"] == res.machine["energy_missing"] and "cpu package + dram: RAPL not exposed" in r["energy_missing"]
        assert (r["total_cpu_package_j"], r["total_dram_j"], r["total_gpu_j"], r["idle_power_w"]) == (None,) * 4
        assert r["full_window_s"] > 0 and r["output_tokens_per_s"] > 0
        assert r["full_n_calls"] >= 1 and r["batch_size"] in (1, 2) and r["min_window_s"] == 0.02
    # greedy outputs agree between the two serving paths
    assert all(r["same_outputs_as_first_path"] for r in rows if r["path"] == "static")
    from metabolic.energy.measurement import paths_agree

    assert paths_agree(rows) == {"cells_with_several_paths": 2, "identical_outputs": 2}
    assert res.joule_fit["skipped"].startswith("energy unavailable: cpu package + dram: RAPL not exposed: no ")
    table = summarise(rows)
    assert len(table) == 4 and all(t["total_j"] is None and t["repeats"] == 2 for t in table)
    with fake_rapl(None, tmp_path):
        again = measure_etokens(small_cfg, progress=False)  # reused, not re-measured
    assert again.folder == res.folder and again.rows == res.rows


def test_grid_with_mocked_gpu_counter(small_cfg, tokenizer, tmp_path):
    from metabolic.energy.grid import run_grid
    from metabolic.energy.measurement import machine_info, run_joule_fit
    from metabolic.energy.meter import EnergyMeter
    from metabolic.pipeline import stages

    cfg = apply_overrides(small_cfg, {"energy.tasks": ("chat",), "energy.batch_sizes": (2,), "energy.paths": ("default",)})
    valid = stages.valid_sequences(cfg, stages.corpus(cfg))
    with fake_gpu_counter(tmp_path):
        meter = EnergyMeter(sync=None, counter_period_s=0.001)
        assert meter.source == "counter"
        machine = machine_info(meter, torch.device("cpu"))
        specs, _ = model_specs(("tiny",), tmp_path, ())
        grid = run_grid(cfg.energy, cfg.seed, meter, tokenizer, valid, specs, torch.device("cpu"), machine,
                        tmp_path / "cells", progress=False)
        rows, skipped = grid.rows, grid.skipped
        fit = run_joule_fit(cfg.energy, cfg.seed, meter, tokenizer, valid, np.ones(len(tokenizer)), torch.device("cpu"),
                            progress=False)
        meter.close()
    assert not skipped and len(rows) == 2
    assert grid.joule_fit == {"skipped": "no semantic cost per token was given (token_cost)"}  # a meter, no costs
    for r in rows:
        assert r["gpu_name"] == "NVIDIA H100 80GB HBM3" and r["energy_source"] == "counter"
        assert r["idle_power_w"] == pytest.approx(WATTS, rel=0.05)
        # energy = 100 W x the window's time, within the counter's 1 mJ resolution and read skew
        per_call_s = r["full_window_s"] / r["full_n_calls"] / 2
        assert r["full_j"] == pytest.approx(WATTS * per_call_s, rel=0.05, abs=0.01)
        assert r["total_j"] == pytest.approx(r["preprocess_j"] + r["full_j"])
        decode = r["full_j"] - r["prefill_j"]  # resolved, or written as below resolution (never negative)
        assert (r["decode_j"] == pytest.approx(decode) and decode >= r["decode_resolution_j"]) or \
            (r["decode_j"] is None and r["decode_below_resolution"] and decode < r["decode_resolution_j"])
        # nothing but "idle" power on this fake GPU: the active energy is below what the meter resolves
        assert r["active_j"] is None and r["active_below_resolution"]
        assert 0 < r["active_resolution_j"] < 0.1 * r["total_j"]
        assert r["identity_ok"] and r["e_in_wh"] / r["e_out_wh"] == pytest.approx(r["output_tokens"] / r["input_tokens"])
    assert len(fit["points"]) == 5 and all(p["energy_j"] > 0 for p in fit["points"])
    assert fit["fit_tokens"]["names"] == ("input_tokens", "output_tokens") and fit["fit_tokens"]["r2"] <= 1
    assert [(b["predictor"], b["fraction"]) for b in fit["budgets"]] == [("tokens", 1.0), ("cost", 1.0)]
    for b in fit["budgets"]:
        assert 0.0 <= b["hit10"] <= 1.0 and len(b["measured_j"]) == 2 and all(m > 0 for m in b["measured_j"])
        assert math.isfinite(b["budget_j"])


PACKAGE_W, DRAM_W = 20.0, 5.0  # the fake CPU draws a constant 20 W in its package and 5 W in DRAM


@contextlib.contextmanager
def live_rapl(tmp_path):
    """A powercap tree whose energy_uj files hold, whenever zeus opens one, the energy drawn so far at PACKAGE_W
    and DRAM_W: as in sysfs, where reading energy_uj reads the CPU's counter at that moment."""
    import builtins
    from pathlib import Path

    cap = Powercap(tmp_path)
    watts = {str(cap.package(0)): PACKAGE_W, str(cap.dram(0)): DRAM_W}
    t0 = time.perf_counter()

    def sysfs_open(path, *args, **kwargs):
        if str(path) in watts:
            cap.set(Path(path), int(watts[str(path)] * 1e6 * (time.perf_counter() - t0)))
        return builtins.open(path, *args, **kwargs)

    with fake_rapl(cap, tmp_path), fake_nvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), \
            mock.patch("zeus.device.cpu.rapl.open", side_effect=sysfs_open, create=True):  # no GPU
        yield


def test_cpu_grid_measures_package_and_dram_through_rapl(small_cfg, tmp_path):
    """Where RAPL is readable, the CPU grid has joules: CPU package + DRAM per query, the phase split by
    subtraction, e-tokens per 1,000 input and output tokens, the idle baseline, at every batch size (2 here)."""
    from metabolic.pipeline.stages import measure_etokens

    # the joule fit with a meter is test_grid_with_mocked_gpu_counter's: left out here to keep the suite's time
    # windows of >= 0.2 s: a read preempted for a few ms (2 shared cores) moves a joule by a few percent at most
    cfg = apply_overrides(small_cfg, {"energy.paths": ("default",), "energy.joule_fit": False, "energy.min_window_s": 0.2,
                                      "energy.idle_s": 0.2})
    with live_rapl(tmp_path):
        res = measure_etokens(cfg, progress=False)
    assert res.energy_available and res.machine["energy_source"] == "rapl"
    assert res.machine["energy_counters"] == "CPU package + DRAM (RAPL)" and res.machine["gpu_name"] is None
    assert res.machine["energy_missing"].startswith("gpu: no GPU energy counter (")
    rows = [r for r in res.rows if r["results_file"].startswith(res.folder.name)]
    assert len(rows) == 1 * 1 * 1 * 2 * 2 and {r["batch_size"] for r in rows} == {1, 2}
    for r in rows:
        assert r["energy_source"] == "rapl" and r["total_gpu_j"] is None
        per_query_s = r["preprocess_s_per_query"] + r["full_s_per_query"]
        # joules = the counters' differences: 20 W and 5 W over the query's windows (zeus stamps each edge's time
        # just before it reads the counters, package then DRAM)
        assert r["total_cpu_package_j"] == pytest.approx(PACKAGE_W * per_query_s, rel=0.05)
        assert r["total_dram_j"] == pytest.approx(DRAM_W * per_query_s, rel=0.05)
        assert r["total_j"] == pytest.approx(r["total_cpu_package_j"] + r["total_dram_j"], rel=1e-9)
        assert r["idle_power_w"] == pytest.approx(PACKAGE_W + DRAM_W, rel=0.05)
        assert r["identity_ok"] and r["e_out_wh"] == pytest.approx(r["total_j"] / 3600 / r["output_tokens"] * 1000)
        decode = r["full_j"] - r["prefill_j"]  # resolved, or written as below resolution (never negative)
        assert (r["decode_j"] == pytest.approx(decode) and decode >= r["decode_resolution_j"]) or \
            (r["decode_j"] is None and r["decode_below_resolution"] and decode < r["decode_resolution_j"])
    assert res.joule_fit == {"skipped": "energy.joule_fit=false for this run"}  # not "energy unavailable": RAPL measures


def test_cpu_machine_only_merges_copied_gpu_results(small_cfg):
    """With GPU results copied into data/<profile>/etokens/, a CPU machine merges them instead of measuring."""
    from metabolic.core import artefacts
    from metabolic.energy.etokens import etokens
    from metabolic.energy.measurement import JOULE_FIT_FILE, ROWS
    from metabolic.pipeline.stages import measure_etokens

    cfg = small_cfg
    root = artefacts.run_dir(cfg.run_name) / "etokens"
    gpu_folder = root / "NVIDIA-H100-gpuhost-abcdef12"
    e = etokens(92.0, 32, 100)
    row = {"gpu_name": "NVIDIA H100", "host": "gpuhost", "model": "tiny", "path": "default", "task": "chat",
           "batch_size": 1, "device": "cuda", "energy_source": "counter", "input_tokens": 32, "output_tokens": 100,
           "n_params": 1, "compiled": False, "total_j": 92.0, "e_in_wh": e.e_in_wh, "e_out_wh": e.e_out_wh,
           "preprocess_window_s": 1.0, "prefill_window_s": 1.0, "full_window_s": 1.2}
    artefacts.atomic_write_text(gpu_folder / ROWS, __import__("json").dumps(row) + "\n")
    artefacts.atomic_write_json(gpu_folder / JOULE_FIT_FILE, {"model": "tiny", "points": []})
    try:
        res = measure_etokens(cfg, progress=False)
        assert not res.measured_here and res.folder is None
        gpu_rows = [r for r in res.rows if r["results_file"].startswith(gpu_folder.name)]
        assert len(gpu_rows) == 1 and gpu_rows[0]["total_j"] == 92.0
        assert res.joule_fit == {"model": "tiny", "points": []}
        bad = {**row, "e_in_wh": row["e_in_wh"] * 2}
        artefacts.atomic_write_text(gpu_folder / ROWS, __import__("json").dumps(bad) + "\n")
        with pytest.raises(DataError, match="e_in/e_out"):
            measure_etokens(cfg, progress=False)
    finally:
        __import__("shutil").rmtree(gpu_folder)


def test_metabolic_model_at_each_trained_budget(tmp_path, tokenizer):
    """A saved MetabolicGPT-2 is found, measured at each budget it was trained on, and decoded with a KV cache."""
    from metabolic.core.config import BackboneConfig
    from metabolic.energy.measurement import greedy_generate_fn
    from metabolic.model.backbone import scratch_model
    from metabolic.model.metabolic_gpt2 import MetabolicGPT2, MetabolicSettings

    eos = tokenizer.eos_token_id
    backbone = scratch_model(BackboneConfig(n_layer=1, n_embd=32, n_head=2), len(tokenizer), 64, eos)
    saved = MetabolicGPT2(backbone, MetabolicSettings(K=1))
    saved.training_info = {"targets": [0.5, 1.5]}
    # the training stage's layout: the selected checkpoint in best/, the last epoch in last/ (not measured)
    saved.save_pretrained(tmp_path / "train" / "expected-cost" / "best")
    saved.save_pretrained(tmp_path / "train" / "expected-cost" / "last")
    specs, skipped = model_specs(("metabolic",), tmp_path, ())
    assert not skipped and [s.budget for s in specs] == [0.5, 1.5]
    assert specs[0].name == "metabolic[expected-cost/best]@0.5"
    model = load_model(specs[1], len(tokenizer), eos, torch.device("cpu"), torch.float32)
    ids = torch.tensor([[464, 3290, 318, 257], [1212, 318, 257, 1332]])
    out = greedy_generate_fn(model, specs[1], "default", eos)(ids, 5)
    seq = ids
    with torch.inference_mode():  # generate() under the budget pathway equals recomputing MetabolicGPT-2 each step
        for _ in range(5):
            logits = model(seq, torch.full((2,), 1.5)).logits[:, -1]
            logits[:, eos] = -math.inf  # exactly n_new tokens: EOS is held back
            seq = torch.cat([seq, logits.argmax(-1)[:, None]], 1)
    assert torch.equal(out, seq)
    specs_cfg, _ = model_specs(("metabolic",), tmp_path, (2.0,))  # configured budgets win
    assert [s.budget for s in specs_cfg] == [2.0]


def test_cost_predictor_adds_token_costs():
    from metabolic.energy.joules import cost_predictor

    x = [[c] for c in (0.0, 1.0, 2.0, 3.0, 4.0)]
    fit = fit_linear(x, [1.0 + 2.0 * c[0] for c in x], ("semantic_cost",))
    token_cost = np.array([0.5, 1.0, 3.0, 1.5])  # mean 1.5
    predict, step = cost_predictor(fit, token_cost, prompt_cost=2.0)
    assert predict(4, []) == pytest.approx(1 + 2 * 2.0)
    assert predict(4, [2, 0]) == pytest.approx(1 + 2 * (2.0 + 3.0 + 0.5))
    assert step(4, [2]) == pytest.approx(2 * 1.5)
    with pytest.raises(ConfigError, match="cost predictor"):
        cost_predictor(fit_linear([[1, 2], [2, 1], [3, 3], [4, 1]], [1, 2, 3, 4], ("input_tokens", "output_tokens")), token_cost)


def test_retraining_measures_the_model_again(small_cfg, session_data_dir, tmp_path, monkeypatch, tokenizer):
    """A retrained MetabolicGPT-2 (new training manifest) is measured again, never given stale rows."""
    from metabolic.core import artefacts
    from metabolic.core.config import BackboneConfig
    from metabolic.model.backbone import scratch_model
    from metabolic.model.metabolic_gpt2 import MetabolicGPT2, MetabolicSettings
    from metabolic.pipeline import stages
    from metabolic.pipeline.stages import measure_etokens

    corpus_folder = stages.corpus(small_cfg).folder  # tokenized once, in the session's data folder
    run = tmp_path / small_cfg.profile
    run.mkdir()
    (run / "corpus").symlink_to(corpus_folder)
    monkeypatch.setenv("METABOLIC_DATA", str(tmp_path))
    backbone = scratch_model(BackboneConfig(n_layer=1, n_embd=32, n_head=2), len(tokenizer), 64, tokenizer.eos_token_id)
    saved = MetabolicGPT2(backbone, MetabolicSettings(K=1))
    saved.training_info = {"targets": [0.5]}
    variant = run / "train" / "expected-cost"
    saved.save_pretrained(variant / "best")
    cfg = apply_overrides(small_cfg, {"energy.models": ("metabolic",), "energy.paths": ("default",),
                                      "energy.batch_sizes": (1,), "energy.repeats": 1})
    artefacts.atomic_write_json(variant / "manifest.json", {"fingerprint": "trained-once"})
    first = measure_etokens(cfg, progress=False)
    assert measure_etokens(cfg, progress=False).folder == first.folder  # reused while nothing changes
    artefacts.atomic_write_json(variant / "manifest.json", {"fingerprint": "trained-again"})
    second = measure_etokens(cfg, progress=False)
    assert second.folder != first.folder and second.measured_here


def test_the_stage_key_holds_content_not_the_data_folders_path(tmp_path):
    """Moving the data folder (the same trained model elsewhere) keeps the e-token stage's key."""
    from metabolic.core import artefacts
    from metabolic.energy.measurement import measured_model_keys
    from metabolic.energy.workloads import ModelSpec

    keys = []
    for where in ("a", "b"):
        folder = tmp_path / where / "train" / "expected-cost"
        (folder / "best").mkdir(parents=True)
        artefacts.atomic_write_json(folder / artefacts.MANIFEST, {"fingerprint": "f00d"})
        keys.append(measured_model_keys([ModelSpec("metabolic", "metabolic", str(folder / "best")),
                                         ModelSpec("gpt2", "hub", "gpt2")]))
    assert keys[0] == keys[1] == [("metabolic", "metabolic", "f00d"), ("gpt2", "gpt2", None)]
