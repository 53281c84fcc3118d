"""The e-token grid, unit by unit: every measured unit is kept at once, a rerun measures only the rest.

`run_grid` measures the units of the plan (`metabolic.energy.plan`) in order. Each unit's record
(its windows, the machine it ran on, its estimated and actual seconds) is written atomically to
`<cells>/<key>.json` the moment it is measured; a unit already there is never measured again, so a
run cut off anywhere loses at most the unit in flight. One call measures the plan's first part (the
whole grid when `energy.part_seconds` is None) and stops early when the part clock says the next
unit would not end in time. The rows are computed from the kept records, so a grid measured in
parts, on several machines of one kind, gives the same table as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from metabolic.core import artefacts
from metabolic.core.config import EnergyConfig
from metabolic.core.errors import AssetError
from metabolic.energy.etokens import check_rows
from metabolic.energy.measurement import (
    DTYPES,
    cell_rows,
    compiled_by_generate,
    greedy_generate_fn,
    measure_cell,
    measure_preprocess,
    outputs_agree_across_paths,
    run_joule_fit,
    sync_for,
)
from metabolic.energy.meter import EnergyMeter
from metabolic.energy.plan import (
    JOULE_FIT,
    CELL,
    H100,
    PREPROCESS,
    Estimator,
    PartClock,
    Plan,
    ProcessState,
    Throughput,
    Unit,
    grid_units,
    longest_task,
    make_plan,
)
from metabolic.energy.workloads import ModelSpec, count_parameters, load_model, make_tasks, pick_prompts

log = logging.getLogger(__name__)

CELLS = "cells"  # the folder of kept unit records, inside the stage's (partial) artefact


@dataclass(frozen=True)
class Grid:
    """What the grid holds so far: rows of every measured cell, skipped cells, the joule fit."""

    rows: list[dict]
    skipped: list[dict]
    joule_fit: dict[str, Any]  # semantic cost -> joules (`metabolic.energy.measurement.run_joule_fit`), or why not
    plan: Plan  # as it stood when this run started (the units left, in parts)
    whole_plan: Plan  # the whole grid as if nothing were measured: what the artefact records
    records: dict[str, dict]  # unit key -> kept record
    measured_now: list[str]  # unit keys measured by this run
    complete: bool


def load_records(cells: Path) -> dict[str, dict]:
    """The kept unit records whose bytes match their recorded SHA-256 (`artefacts.write_hashed_json`); a
    damaged or unreadable one is measured again, never loaded (it was being written when cut off)."""
    records = {}
    for path in sorted(Path(cells).glob("*.json")):
        try:
            data, why = artefacts.read_hashed(path)
            if data is None:
                log.warning("%s: %s: its unit is measured again", path, why)
                continue
            records[path.stem] = json.loads(data)
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s): its unit is measured again", path, exc)
    return records


class _Runner:
    """Measures one unit at a time, keeping one model loaded and each static group warmed up once."""

    def __init__(self, e: EnergyConfig, seed: int, meter: EnergyMeter, tokenizer, valid, device: torch.device,
                 tasks, token_cost: Optional[Callable[[], Any]], progress: bool) -> None:
        self.e, self.seed, self.meter, self.tokenizer, self.valid = e, seed, meter, tokenizer, valid
        self.device, self.tasks, self.token_cost, self.progress = device, tasks, token_cost, progress
        self.dtype = DTYPES[e.dtype] if device.type == "cuda" else torch.float32
        self.sync = sync_for(device)
        self.spec: Optional[ModelSpec] = None
        self.model = None
        self.failed: dict[str, str] = {}  # model name -> why it did not load
        self.warmed: set[tuple] = set()

    def measure(self, unit: Unit) -> dict[str, Any]:
        e = self.e
        if unit.kind == JOULE_FIT:
            self.close()
            return {JOULE_FIT: run_joule_fit(e, self.seed, self.meter, self.tokenizer, self.valid,
                                             self.token_cost(), self.device, self.progress)}
        prompts = pick_prompts(self.valid, unit.batch_size, unit.task.input_tokens, self.seed)
        if unit.kind == PREPROCESS:
            return measure_preprocess(self.meter, self.tokenizer, prompts, e.min_window_s, e.repeats)
        model = self._load(unit.model)
        if model is None:
            return {"skipped": self.failed[unit.model.name]}
        gen = greedy_generate_fn(model, unit.model, unit.path, self.tokenizer.eos_token_id)
        try:
            warmup_s = self._warm_up(gen, unit)
            record = measure_cell(self.meter, gen, torch.tensor(prompts, device=self.device), unit.task, e.min_window_s,
                                  e.repeats, e.idle_s, self.sync)
        except (RuntimeError, TypeError) as exc:  # e.g. a path this model/device cannot run
            return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        return {**record, "group_warmup_s": warmup_s, "n_params": count_parameters(model),
                "dtype": str(self.dtype).replace("torch.", ""),
                "compiled": unit.path == "static" and compiled_by_generate(model, unit.model)}

    def _warm_up(self, gen, unit: Unit) -> Optional[float]:
        """The static path's first call at a batch size compiles it: done outside every window, with the
        longest task first, since transformers sizes the static cache for the longest call seen."""
        if unit.path != "static" or unit.group in self.warmed:
            return None
        longest = longest_task(self.tasks)
        ids = torch.tensor(pick_prompts(self.valid, unit.batch_size, longest.input_tokens, self.seed), device=self.device)
        t0 = time.perf_counter()
        gen(ids, longest.output_tokens)
        self.sync()
        self.warmed.add(unit.group)
        return time.perf_counter() - t0

    def _load(self, spec: ModelSpec):
        if spec.name in self.failed:
            return None
        if self.spec is None or self.spec.name != spec.name:
            self.close()
            try:
                self.model = load_model(spec, len(self.tokenizer), self.tokenizer.eos_token_id, self.device, self.dtype)
            except AssetError as exc:
                self.failed[spec.name] = str(exc)
                return None
            self.spec = spec
        return self.model

    def close(self) -> None:
        """Let the loaded model go (and its GPU memory)."""
        self.model, self.spec = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _cell_description(unit: Unit, record: dict[str, Any], e: EnergyConfig) -> dict[str, Any]:
    spec, task = unit.model, unit.task
    return {"model": spec.name, "model_kind": spec.kind, "budget": spec.budget, "path": unit.path, "task": task.name,
            "ratio": task.ratio, "input_tokens": task.input_tokens, "output_tokens": task.output_tokens,
            "batch_size": unit.batch_size, "min_window_s": e.min_window_s}


def assemble(units: Sequence[Unit], records: dict[str, dict], e: EnergyConfig) -> tuple[list[dict], list[dict]]:
    """Rows of every measured cell (in grid order) and the skipped cells with their reasons."""
    rows: list[dict] = []
    skipped: list[dict] = []
    for unit in units:
        record = records.get(unit.key)
        if unit.kind != CELL or record is None:
            continue
        desc = _cell_description(unit, record, e)
        if "skipped" in record:
            skipped.append({**desc, "reason": record["skipped"]})
            continue
        preprocess = records.get(Unit(PREPROCESS, task=unit.task, batch_size=unit.batch_size).key)
        if preprocess is None:  # only while a grid is unfinished
            continue
        fixed = {**record["machine"], **desc, "n_params": record["n_params"], "dtype": record["dtype"],
                 "compiled": record["compiled"], "group_warmup_s": record["group_warmup_s"],
                 "outputs_sha256": record["outputs_sha256"]}
        rows += [{**fixed, **row} for row in cell_rows(record, preprocess, unit.task, unit.batch_size)]
    outputs_agree_across_paths(rows, e.paths)
    check_rows(rows)
    return rows, skipped


def run_grid(e: EnergyConfig, seed: int, meter: EnergyMeter, tokenizer, valid: Sequence[Sequence[int]],
             specs: list[ModelSpec], device: torch.device, machine: dict[str, Any], cells: Path,
             token_cost: Optional[Callable[[], Any]] = None, progress: bool = True,
             throughput: Throughput = H100) -> Grid:
    """Measure the next part of the grid into `cells` (kept unit by unit); return everything measured so far.

    `token_cost()` gives the semantic cost per token id for the joule fit, which runs only with an
    energy meter, `e.joule_fit` and a `token_cost`.
    """
    from tqdm.auto import tqdm

    tasks = make_tasks(e.input_tokens, e.max_output_tokens, e.tasks)
    units = grid_units(e, specs, tasks, joule_fit=e.joule_fit and meter.available and token_cost is not None)
    by_key = {u.key: u for u in units}
    records = {k: r for k, r in load_records(cells).items() if k in by_key}
    plan = make_plan(e, units, tasks, seed, done=records, throughput=throughput, only=e.only)
    log.info("%s", plan.describe())
    todo = plan.parts[0].keys if plan.parts else ()
    clock = PartClock(e.part_seconds)
    estimator, state = Estimator(e, tasks, seed, throughput), ProcessState()
    runner = _Runner(e, seed, meter, tokenizer, valid, device, tasks, token_cost, progress)
    measured: list[str] = []
    for key in tqdm(todo, desc="etokens", unit="unit", disable=not progress):
        unit = by_key[key]
        estimate_s = estimator.cost(unit, state)
        if not clock.fits(estimate_s):
            log.info("part clock: %.0f s used of %.0f s, %s would need about %.0f s more: stopping here",
                     clock.elapsed_s, e.part_seconds, key, estimate_s * clock.ratio)
            break
        t0 = time.perf_counter()
        record = runner.measure(unit)
        wall_s = time.perf_counter() - t0
        record.update(key=key, machine=machine, estimate_s=estimate_s, wall_s=wall_s)
        artefacts.write_hashed_json(Path(cells) / f"{key}.json", record)  # kept before the next unit starts
        records[key] = record
        measured.append(key)
        estimator.advance(state, unit)
        clock.record(estimate_s, wall_s)
    runner.close()
    complete = all(u.key in records for u in units)
    if not complete:
        log.info("e-token grid: %d of %d units measured (%d by this run, in %.0f s); rerun the same command to "
                 "measure the next part%s", len(records), len(units), len(measured), clock.elapsed_s,
                 " (without energy.only for the units it left out)" if e.only else "")
    rows, skipped = assemble(units, records, e)
    if JOULE_FIT in records:
        joule_fit = records[JOULE_FIT][JOULE_FIT]
    elif not meter.available:
        joule_fit = {"skipped": f"energy unavailable: {meter.reason}"}
    elif not e.joule_fit:
        joule_fit = {"skipped": "energy.joule_fit=false for this run"}
    elif token_cost is None:
        joule_fit = {"skipped": "no semantic cost per token was given (token_cost)"}
    else:
        joule_fit = {"skipped": "not measured yet: the grid is unfinished"}
    whole = make_plan(e, units, tasks, seed, throughput=throughput)
    return Grid(rows, skipped, joule_fit, plan, whole, records, measured, complete)
