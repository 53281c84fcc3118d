"""The e-token grid kept unit by unit (kill and resume, parts), its plan and time estimate, and active
energies below the meter's resolution. NVML is mocked with autospec where a GPU meter is needed."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from unittest import mock

import pytest
from fake_counters import fake_nvml, fake_rapl
from metabolic.core.config import EnergyConfig, apply_overrides
from metabolic.core.errors import ConfigError
from metabolic.energy import grid as grid_module
from metabolic.energy.measurement import phase_row
from metabolic.energy.meter import EnergyMeter
from metabolic.energy.plan import (
    CELL,
    H100,
    Estimator,
    PartClock,
    ProcessState,
    Throughput,
    Unit,
    grid_units,
    make_plan,
    window_s,
)
from metabolic.energy.workloads import ModelSpec, Task, make_tasks, model_specs

BUSY_W, IDLE_W = 100.0, 150.0  # the fake GPU draws more while "idle" than while busy: active < 0 if subtracted


@contextlib.contextmanager
def fake_gpu_idle_above_busy(tmp_path):
    """NVML whose energy counter grows at BUSY_W, except inside idle-baseline windows (IDLE_W)."""
    state = {"t": time.perf_counter(), "mj": 0.0, "w": BUSY_W}

    def advance(watts=None):
        now = time.perf_counter()
        state["mj"] += state["w"] * 1000.0 * (now - state["t"])
        state["t"] = now
        if watts is not None:
            state["w"] = watts

    def counter(handle):
        advance()
        return int(state["mj"])

    original = EnergyMeter.idle_baseline

    def idle_baseline(self, duration_s):
        advance(IDLE_W)
        try:
            return original(self, duration_s)
        finally:
            advance(BUSY_W)

    # the grid runs on this CPU; the fake GPU is the measured device (as the GPU is where the grid runs on CUDA)
    on_gpu = lambda *args, **kwargs: EnergyMeter(*args, **{**kwargs, "device": "cuda"})  # noqa: E731
    with fake_rapl(None, tmp_path), fake_nvml(counter), \
            mock.patch.object(EnergyMeter, "idle_baseline", autospec=True, side_effect=idle_baseline), \
            mock.patch("metabolic.pipeline.etokens.EnergyMeter", autospec=True, side_effect=on_gpu):
        yield


@pytest.fixture
def own_data(small_grid_cfg, tmp_path, monkeypatch):
    """A data folder of the test's own that reuses the session's tokenized corpus."""
    from metabolic.pipeline import stages

    def make(name: str) -> Path:
        corpus_folder = stages.corpus(small_grid_cfg).folder
        root = tmp_path / name
        (root / small_grid_cfg.profile).mkdir(parents=True)
        (root / small_grid_cfg.profile / "corpus").symlink_to(corpus_folder)
        monkeypatch.setenv("METABOLIC_DATA", str(root))
        return root / small_grid_cfg.profile / "etokens"

    return make


@pytest.fixture(scope="module")
def small_grid_cfg(tiny_cfg):
    return apply_overrides(tiny_cfg, SMALL_GRID)


SMALL_GRID = {
    "energy.models": ("tiny",), "energy.tasks": ("chat",), "energy.batch_sizes": (1, 2),
    "energy.paths": ("default", "static"), "energy.repeats": 2, "energy.input_tokens": 8,
    "energy.max_output_tokens": 3, "energy.min_window_s": 0.02, "energy.idle_s": 0.03, "energy.joule_fit": False,
}


REAL_MEASURE = grid_module._Runner.measure


def _counting(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Record every unit the runner measures; raise KeyboardInterrupt (a kill) before unit `fail_after` + 1."""
    measured: list[str] = []
    real = REAL_MEASURE

    def measure(self, unit):
        if fail_after is not None and len(measured) == fail_after:
            raise KeyboardInterrupt
        measured.append(unit.key)
        return real(self, unit)

    monkeypatch.setattr(grid_module._Runner, "measure", measure)
    return measured


DETERMINISTIC = ("model", "path", "task", "batch_size", "repeat", "input_tokens", "output_tokens", "n_params",
                 "compiled", "outputs_sha256", "same_outputs_as_first_path", "energy_source", "gpu_name")
ENERGIES = ("preprocess_j", "prefill_j", "full_j", "total_j", "idle_j", "active_j", "decode_j", "j_per_output_token")


def test_a_kill_9_keeps_every_unit_written_and_a_damaged_one_is_measured_again(small_grid_cfg, own_data, monkeypatch,
                                                                              caplog):
    """A real kill -9 after the second unit record was kept (no GPU: timings only): the rerun keeps both records as
    they were written, except one whose bytes no longer match their hash, and measures only the rest; the rows
    equal an uninterrupted run's."""
    from conftest import TINY_OVERRIDES
    from kill import kill_9
    from metabolic.pipeline.stages import measure_etokens

    root = own_data("interrupted")
    kill_9("measure_etokens", {**TINY_OVERRIDES, **SMALL_GRID}, "metabolic.core.artefacts.write_hashed_json", 2)
    cells = next(root.glob("*.partial")) / grid_module.CELLS
    kept = sorted(p.stem for p in cells.glob("*.json"))
    assert kept == ["preprocess-chat-b1", "preprocess-chat-b2"]
    first = json.loads((cells / "preprocess-chat-b1.json").read_text())
    damaged = cells / "preprocess-chat-b2.json"
    damaged.write_text(damaged.read_text().replace('"key"', '"kEy"'))  # still JSON: only the hash tells
    after = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="metabolic.energy.grid"):
        resumed = measure_etokens(small_grid_cfg, progress=False)
    assert [r.getMessage() for r in caplog.records] == \
        [f"{damaged}: its bytes do not match their recorded hash: its unit is measured again"]
    assert "preprocess-chat-b2" in after and "preprocess-chat-b1" not in after and len(after) == 5 and resumed.complete
    assert resumed.grid.records["preprocess-chat-b1"]["wall_s"] == first["wall_s"]  # kept, not measured again
    own_data("uninterrupted")
    clean = measure_etokens(small_grid_cfg, progress=False)
    pick = lambda rows: [{f: r[f] for f in DETERMINISTIC} for r in rows]  # noqa: E731
    assert pick(resumed.rows) == pick(clean.rows) and len(clean.rows) == 4 * 2  # cells x repeats


def test_killed_grid_resumes_with_only_the_rest_and_writes_no_negative_energy(small_grid_cfg, own_data, monkeypatch,
                                                                             tmp_path):
    """Kill after k units, rerun: only the other units are measured, and the rows equal an uninterrupted
    run's. The fake GPU draws more while idle than busy: no written row holds a negative energy."""
    from metabolic.pipeline.stages import measure_etokens

    # idle windows of 0.3 s, not 0.03: with 30 ms ones the idle power read ~195 W, not 150, when this file ran in one
    # process with the other energy tests (a few ms between the fake counter's reads and zeus's clock are 30% of 30 ms)
    cfg, k = apply_overrides(small_grid_cfg, {"energy.batch_sizes": (1,), "energy.idle_s": 0.3}), 2
    with fake_gpu_idle_above_busy(tmp_path):
        root = own_data("interrupted")
        before_kill = _counting(monkeypatch, fail_after=k)
        with pytest.raises(KeyboardInterrupt):
            measure_etokens(cfg, progress=False)
        partial = next(root.glob("*.partial"))
        assert sorted(p.stem for p in (partial / "cells").glob("*.json")) == sorted(before_kill)
        after = _counting(monkeypatch)
        resumed = measure_etokens(cfg, progress=False)
        own_data("uninterrupted")
        whole = _counting(monkeypatch)
        clean = measure_etokens(cfg, progress=False)
    assert len(before_kill) == k and resumed.complete and resumed.folder is not None
    assert before_kill + after == whole  # each unit once, in grid order: none measured twice, none lost
    assert whole == ["preprocess-chat-b1", "cell-tiny-default-chat-b1", "cell-tiny-static-chat-b1"]
    pick = lambda rows: [{f: r[f] for f in DETERMINISTIC} for r in rows]  # noqa: E731
    assert pick(resumed.rows) == pick(clean.rows) and len(clean.rows) == 2 * 2  # cells x repeats
    assert [r["same_outputs_as_first_path"] for r in clean.rows] == [None, None, True, True]  # greedy: paths agree
    written = [json.loads(line) for line in (resumed.folder / "rows.jsonl").read_text().splitlines()]
    assert written == [{k: v for k, v in r.items() if k != "results_file"} for r in resumed.rows]
    for row in written + clean.rows:
        assert all(row[name] is None or row[name] >= 0 for name in ENERGIES), row
        # idle (150 W) above busy (100 W): the active energy cannot be resolved, and says so
        assert row["active_j"] is None and row["active_below_resolution"] and row["active_resolution_j"] > 0
        assert row["idle_power_w"] == pytest.approx(IDLE_W, rel=0.1) and row["identity_ok"]
    machine = json.loads((resumed.folder / "machine.json").read_text())
    assert [u["key"] for u in machine["units"]] == whole and "e-token plan" in machine["plan"]


def test_grid_in_parts_measures_each_unit_once(small_grid_cfg, own_data, monkeypatch):
    """With energy.part_seconds, each run measures the start of the plan's first part and stops cleanly,
    keeping what it measured; the run that measures the last unit finishes the artefact."""
    from metabolic.pipeline.stages import measure_etokens

    # parts: the two preprocess units, then one cell each (a new process loads the model again)
    cfg = apply_overrides(small_grid_cfg, {"energy.paths": ("default",), "energy.part_seconds": H100.model_load_s + 0.2})
    root = own_data("parts")
    measured: list[str] = []
    runs = []
    for _ in range(5):
        now = _counting(monkeypatch)
        res = measure_etokens(cfg, progress=False)
        runs.append(res)
        planned = res.grid.plan.parts[0].keys
        assert now and tuple(now) == planned[:len(now)]  # a prefix of the planned part, never beyond it
        assert len(res.grid.plan.parts) > 1 or res.complete
        measured += now
        if res.complete:
            break
    assert len(runs) > 1 and not runs[0].complete and runs[-1].complete
    assert [r.folder for r in runs[:-1]] == [None] * (len(runs) - 1) and runs[-1].folder.parent == root
    assert [len(p.keys) for p in runs[0].grid.plan.parts] == [2, 1, 1]  # preprocess b1, b2 | cell b1 | cell b2
    assert measured == ["preprocess-chat-b1", "preprocess-chat-b2", "cell-tiny-default-chat-b1",
                        "cell-tiny-default-chat-b2"]  # each unit once, in grid order
    assert not list(root.glob("*.partial")) and len(runs[-1].rows) == 2 * 2


def test_a_slice_first_then_the_rest_of_the_same_grid(small_grid_cfg, own_data, monkeypatch):
    """energy.only measures the selected cells (and the preprocess units their rows need) into the same
    grid as a run without it: the grid stays unfinished, its partial folder holds the slice's rows, and a
    run without energy.only measures only the rest and finishes the grid with every row."""
    from metabolic.pipeline.stages import measure_etokens

    sliced = apply_overrides(small_grid_cfg, {"energy.only": "cell-tiny-static-*-b2"})
    root = own_data("slice")
    first = _counting(monkeypatch)
    part = measure_etokens(sliced, progress=False)
    assert first == ["preprocess-chat-b2", "cell-tiny-static-chat-b2"] and not part.complete and part.folder is None
    partial = next(root.glob("*.partial"))
    kept = [json.loads(line) for line in (partial / "rows.jsonl").read_text().splitlines()]
    assert [(r["model"], r["path"], r["batch_size"]) for r in kept] == [("tiny", "static", 2)] * 2  # 2 repeats
    assert "this run: only units matching cell-tiny-static-*-b2: 2 of the 6 left" in part.grid.plan.describe()
    rest = _counting(monkeypatch)
    whole = measure_etokens(small_grid_cfg, progress=False)
    assert whole.complete and whole.folder.name + ".partial" == partial.name  # one grid: the same fingerprint
    assert rest == ["preprocess-chat-b1", "cell-tiny-default-chat-b1", "cell-tiny-default-chat-b2",
                    "cell-tiny-static-chat-b1"]
    assert len(whole.rows) == 4 * 2 and not list(root.glob("*.partial"))


# --- the plan and its time estimate ----------------------------------------------------------------

GPT2_SMALL = ModelSpec("gpt2-small-scratch", "scratch", shape=(12, 768, 12))


def test_cell_estimate_by_hand():
    """One cell's seconds, from the module docstring's formula with round throughput figures."""
    t = Throughput("test GPU", {"default": 0.01, "static": 0.002}, batch32_factor=1.31, call_overhead_s=0.05,
                   tokenize_s=0.001, compile_first_s=50.0, compile_next_s=20.0, graph_record_s=1.0, model_load_s=3.0,
                   process_start_s=30.0, measured="test")
    e = EnergyConfig(min_window_s=1.0, repeats=3, idle_s=0.5, batch_sizes=(1, 32), paths=("default", "static"),
                     input_tokens=64, max_output_tokens=256, tasks=("chat", "creative"))
    tasks = make_tasks(64, 256, ("chat", "creative"))
    chat = tasks[0]
    assert (chat.input_tokens, chat.output_tokens, tasks[1].output_tokens) == (64, 64, 250)
    est = Estimator(e, tasks, seed=0, throughput=t)
    # batch 32: a step takes 1.31x; full call 0.05 + 64 x 0.01 x 1.31 = 0.8884 s -> windows of 2 calls
    assert t.call_s("default", 64, 32) == pytest.approx(0.8884)
    assert window_s(0.8884, 1.0) == pytest.approx(1.7768)
    prefill = 0.05 + 0.01 * 1.31  # 0.0631 s -> 16 calls fill 1 s
    unit = Unit(CELL, task=chat, batch_size=32, model=GPT2_SMALL, path="default")
    base = 0.5 + prefill + 3 * (16 * prefill + 1.7768)
    warm = ProcessState(model=GPT2_SMALL.name)
    assert est.cost(unit, warm) == pytest.approx(base)
    assert est.cost(unit, ProcessState()) == pytest.approx(base + 3.0)  # the model loads first
    # the static path's first batch size compiles after the longest task's call (0.05 + 250 x 0.002)
    static = Unit(CELL, task=chat, batch_size=1, model=GPT2_SMALL, path="static")
    s_prefill, s_full = 0.052, 0.05 + 64 * 0.002
    s_base = 0.5 + s_prefill + 3 * (20 * s_prefill + 6 * s_full)
    assert est.cost(static, warm) == pytest.approx(s_base + 0.55 + 50.0)
    est.advance(warm, static)
    static32 = Unit(CELL, task=chat, batch_size=32, model=GPT2_SMALL, path="static")
    assert est.cost(static32, warm) - est.cost(Unit(CELL, task=chat, batch_size=32, model=GPT2_SMALL, path="static"),
                                               ProcessState(model=GPT2_SMALL.name, warmed={static32.group})) \
        == pytest.approx(0.05 + 250 * 0.002 * 1.31 + 20.0)  # the second batch size recompiles once


def test_gpu_profile_plan_fits_twenty_h100_minutes_in_parts_of_eight(tmp_path):
    """The gpu profile's grid (3 models x 4 tasks x batch 1/8/32 x 2 paths) and the joule fit: <= 20 min on
    one H100 by the plan's estimate, in parts of <= 8 min each (process start included), cut between models."""
    from metabolic.core.profiles import load_config

    cfg = load_config("gpu")
    e = cfg.energy
    assert e.part_seconds + H100.process_start_s <= 8 * 60
    specs, skipped = model_specs(e.models, tmp_path, ())  # no trained MetabolicGPT-2 here: skipped
    assert [s.name for s in specs] == ["tiny", "gpu-6x384", "gpt2-small-scratch"] and skipped
    tasks = make_tasks(e.input_tokens, e.max_output_tokens, e.tasks)
    assert e.batch_sizes == (1, 8, 32) and e.paths == ("default", "static") and len(tasks) == 4
    units = grid_units(e, specs, tasks, joule_fit=True)
    plan = make_plan(e, units, tasks, cfg.seed)
    assert len(units) == 1 + 4 * 3 + 3 * 2 * 4 * 3
    assert plan.total_s <= 20 * 60
    assert all(p.seconds <= 8 * 60 for p in plan.parts) and len(plan.parts) == 3
    for part in plan.parts:  # a part's time is the process start plus its units' estimates
        assert part.seconds == pytest.approx(H100.process_start_s + sum(plan.estimates_s[k] for k in part.keys))
    assert [p.keys[0] for p in plan.parts] == ["joule_fit", "cell-gpu-6x384-default-classification-b1",
                                               "cell-gpt2-small-scratch-default-classification-b1"]
    text = plan.describe()
    assert "3 model(s) (tiny, gpu-6x384, gpt2-small-scratch)" in text and f"{plan.total_s / 60:.1f} min in 3 part(s)" in text
    done = make_plan(e, units, tasks, cfg.seed, done=plan.parts[0].keys)  # a rerun plans only the rest
    assert done.parts == plan.parts[1:] and len(done.remaining) == len(units) - len(plan.parts[0].keys)


def test_gpu_results_slice_of_the_gpu_grid(tmp_path):
    """scripts/gpu_results.sh's e-token slice: gpu-6x384 and gpt2-small-scratch, chat and creative, batch 1 and
    32, both paths: 16 cells and their 4 preprocess units of the gpu grid, no joule fit; the rest plans alone."""
    import re

    from metabolic.core.profiles import load_config

    script = (Path(__file__).resolve().parents[1] / "scripts" / "gpu_results.sh").read_text()
    patterns = re.findall(r'C_ONLY=\$\{C_ONLY:-"([^"]+)"\}', script)[-1]  # the GPU run's (the dry run's comes first)
    assert patterns.split(",") == [f"cell-{m}-*-{t}-b{b}" for m in ("gpu-6x384", "gpt2-small-scratch")
                                   for t in ("chat", "creative") for b in (1, 32)]
    e = apply_overrides(load_config("gpu"), {"energy.only": patterns}).energy  # a string, as the script passes it
    specs, _ = model_specs(e.models, tmp_path, ())
    tasks = make_tasks(e.input_tokens, e.max_output_tokens, e.tasks)
    units = grid_units(e, specs, tasks, joule_fit=True)
    plan = make_plan(e, units, tasks, seed=0, only=e.only)
    keys = [k for p in plan.parts for k in p.keys]
    assert len(keys) == 20 and [k for k in keys if not k.startswith("cell-")] == [
        "preprocess-chat-b1", "preprocess-chat-b32", "preprocess-creative-b1", "preprocess-creative-b32"]
    assert keys[4] == "cell-gpu-6x384-default-chat-b1" and keys[-1] == "cell-gpt2-small-scratch-static-creative-b32"
    rest = make_plan(e, units, tasks, seed=0, done=keys)
    assert len([k for p in rest.parts for k in p.keys]) == len(units) - 20 == 65


def test_plan_rejects_a_unit_larger_than_a_part():
    e = EnergyConfig(part_seconds=5.0, tasks=("chat",), batch_sizes=(1,), paths=("static",))
    tasks = make_tasks(e.input_tokens, e.max_output_tokens, e.tasks)
    with pytest.raises(ConfigError, match="more than energy.part_seconds=5"):
        make_plan(e, grid_units(e, [GPT2_SMALL], tasks, joule_fit=False), tasks, seed=0)


def test_part_clock_scales_estimates_by_what_units_took():
    now = [0.0]
    clock = PartClock(100.0, clock=lambda: now[0])
    assert clock.fits(500.0)  # the first unit always runs
    now[0] = 40.0
    clock.record(20.0, 40.0)  # took twice its estimate
    assert clock.ratio == 2.0 and clock.fits(30.0) and not clock.fits(31.0)  # 40 + 2 x 30 = 100
    clock.record(100.0, 10.0)
    assert clock.ratio == 0.5  # never trusts estimates below half
    assert PartClock(None).fits(1e9)


# --- below resolution ------------------------------------------------------------------------------


def _window(energy_j, time_s, n_calls, resolution_j):
    return {"energy_j": energy_j, "time_s": time_s, "n_calls": n_calls, "short_window": False,
            "resolution_j": resolution_j, "source": "counter"}


def test_active_energy_below_resolution_is_never_negative():
    task = Task("chat", 1.0, 64, 64)
    windows = {"preprocess": _window(121.0, 1.0, 100, 12.1), "prefill": _window(125.0, 1.0, 50, 12.5),
               "full": _window(130.0, 1.0, 2, 13.0)}
    idle = {"power_w": 128.0, "resolution_w": 12.8, "time_s": 1.0, "energy_j": 128.0}
    row = phase_row(windows, 1, task, idle)
    # total 1.21 + 65 J in 0.51 s per query; idle 128 W x 0.51 s = 65.28 J > total: active would be -0.07 J
    assert row["total_j"] == pytest.approx(66.21) and row["active_j"] is None and row["active_below_resolution"]
    assert row["active_resolution_j"] == pytest.approx(0.121 + 6.5 + 12.8 * 0.51)
    assert row["decode_j"] == pytest.approx(65 - 2.5) and not row["decode_below_resolution"]
    busy = phase_row({**windows, "full": _window(400.0, 1.0, 2, 40.0)}, 1, task, idle)
    assert busy["active_j"] == pytest.approx(1.21 + 200 - 65.28) and not busy["active_below_resolution"]
    from metabolic.energy.measurement import energy_text

    assert energy_text(row["active_j"], True, row["active_resolution_j"]) == "below resolution (< 13.1 J)"
    assert energy_text(busy["active_j"], False, busy["active_resolution_j"]) == "136 J"
