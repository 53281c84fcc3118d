"""Stage `etokens`: this machine's e-token grid (or its next part), merged with every machine's results
under `data/<profile>/etokens/` (see `metabolic.energy.measurement` and `metabolic.energy.grid`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from metabolic.core import artefacts
from metabolic.core.config import StudyConfig
from metabolic.energy.grid import CELLS, Grid, run_grid
from metabolic.energy.measurement import (
    JOULE_FIT_FILE,
    MACHINE,
    ROWS,
    joule_fits,
    machine_info,
    machine_tag,
    measured_model_keys,
    merge_results,
    stage_description,
)
from metabolic.energy.meter import EnergyMeter
from metabolic.energy.plan import RUN_SPLITTING, Plan, grid_units, make_plan
from metabolic.energy.workloads import make_tasks, model_specs
from metabolic.pipeline.corpus import corpus, valid_sequences
from metabolic.pipeline.prior import energy_prior
from metabolic.pipeline.stage import realise


@dataclass(frozen=True)
class EtokenResults:
    folder: Optional[Path]  # this machine's finished results (None when unfinished or only merged)
    rows: list[dict]  # every machine's finished rows under data/<profile>/etokens/, plus this run's unfinished ones
    skipped: list[dict]
    joule_fit: dict[str, Any]  # the first measured joule fit found, else this machine's `skipped` reason
    machine: dict[str, Any]
    energy_available: bool  # this machine has an energy meter
    measured_here: bool
    complete: bool = True  # False: this machine's grid is unfinished (energy.part_seconds); rerun to go on
    grid: Optional[Grid] = None  # this run's grid (plan, units measured now and before), when it measured
    fingerprint: Optional[str] = None  # the key `folder`'s manifest records (None with `folder`)


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
    root = artefacts.run_dir(cfg.run_name) / "etokens"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = EnergyMeter(device=device.type, gpu_index=e.gpu_index, counter_period_s=e.counter_period_s)
    try:
        machine = machine_info(meter, device)
        existing = merge_results(root)
        with_energy = any(r.get("total_j") is not None for r in existing)
        measure = e.measure == "always" or (e.measure == "auto" and (meter.available or not with_energy))
        built, grid = _measure_here(cfg, meter, machine, device, progress) if measure else (None, None)
    finally:
        meter.close()
    folder = built.folder if built is not None else None
    rows = merge_results(root)
    if folder is not None:
        own = artefacts.read_json(folder / MACHINE)
        skipped, own_fit = own["skipped"], artefacts.read_json(folder / JOULE_FIT_FILE)
    elif grid is not None:  # unfinished: what this machine has measured so far
        skipped, own_fit = grid.skipped, grid.joule_fit
        rows += [{**r, "results_file": f"unfinished/{ROWS}"} for r in grid.rows]
    else:
        skipped, own_fit = [], {"skipped": f"not measured on this machine (energy.measure={e.measure!r})"}
    joule_fit = next((c for c in joule_fits(root) if "skipped" not in c), own_fit)
    return EtokenResults(folder=folder, rows=rows, skipped=skipped, joule_fit=joule_fit, machine=machine,
                         energy_available=meter.available, measured_here=measure, complete=grid is None or grid.complete,
                         grid=grid, fingerprint=built.key if built is not None else None)


def measured_budgets(cfg: StudyConfig) -> tuple[float, ...]:
    """The CSC budgets a MetabolicGPT-2 is measured at: `generation.budgets`, else `train.budgets`, else
    (empty) the targets each model was trained on (`metabolic.energy.workloads.model_specs`)."""
    return cfg.generation.budgets or cfg.train.budgets


class EtokenStage:
    """This machine's grid: `etokens/<machine>-<key>/`. Its build raises `_PartDone` when it measured one
    part of an unfinished grid (`energy.part_seconds`): the partial folder keeps every unit measured so far."""

    required = (ROWS, JOULE_FIT_FILE, MACHINE)

    def __init__(self, cfg: StudyConfig, meter: EnergyMeter, machine: dict, device: torch.device, progress: bool) -> None:
        e = cfg.energy
        self.cfg, self.meter, self.machine, self.device, self.progress = cfg, meter, machine, device, progress
        data = corpus(cfg)
        self.valid = valid_sequences(cfg, data)
        self.tokenizer = data.tokenizer
        self.specs, self.skipped_models = model_specs(e.models, artefacts.run_dir(cfg.run_name), measured_budgets(cfg))
        # How a grid is split into runs does not change what it measures: none of these keys goes into the fingerprint.
        settings = {k: v for k, v in e.__dict__.items() if k not in ("measure", *RUN_SPLITTING)}
        self._description = stage_description(settings, cfg.seed, data.fingerprint, measured_model_keys(self.specs), machine)
        self.folder = f"etokens/{machine_tag(machine)}-{artefacts.fingerprint(self._description)[:8]}"
        self.grid: Optional[Grid] = None  # set when this run measured (None when the finished artefact was reused)

    def description(self) -> dict[str, Any]:
        return self._description

    def build(self, work: Path) -> dict[str, Any]:
        cfg, e, meter, machine = self.cfg, self.cfg.energy, self.meter, self.machine
        grid = run_grid(e, cfg.seed, meter, self.tokenizer, self.valid, self.specs, self.device, machine, work / CELLS,
                        token_cost=lambda: energy_prior(cfg).prior.cost, progress=self.progress)
        self.grid = grid
        if not grid.complete:
            # the partial folder keeps every unit measured so far, and the rows they make (a cut grid's table so far)
            artefacts.write_jsonl(work / ROWS, grid.rows)
            raise _PartDone(grid)
        artefacts.write_jsonl(work / ROWS, grid.rows)
        artefacts.atomic_write_json(work / JOULE_FIT_FILE, grid.joule_fit)
        records = [grid.records[u.key] for u in grid.plan.units]  # in grid order
        units = [{k: r.get(k) for k in ("key", "estimate_s", "wall_s", "group_warmup_s")} | {"host": r["machine"]["host"]}
                 for r in records]
        hosts = {r["machine"]["host"]: r["machine"] for r in records}
        artefacts.atomic_write_json(work / MACHINE, {**machine, "skipped": self.skipped_models + grid.skipped,
                                                     "machines": list(hosts.values()), "units": units,
                                                     "plan": grid.whole_plan.describe()})
        return {"n_rows": len(grid.rows), "energy_available": meter.available,
                "wall_s": sum(u["wall_s"] or 0.0 for u in units)}

    def load(self, folder: Path, key: str) -> artefacts.Built:
        """The finished folder and the key its manifest records (`measure_etokens` reads the files it merges)."""
        return artefacts.Built(folder, key)


def _measure_here(cfg: StudyConfig, meter: EnergyMeter, machine: dict, device: torch.device,
                  progress: bool) -> tuple[Optional[artefacts.Built], Optional[Grid]]:
    """(the finished artefact or None while unfinished, the grid as this run left it or None when reused)."""
    stage = EtokenStage(cfg, meter, machine, device, progress)
    try:
        built = realise(stage, cfg)
    except _PartDone as done:
        return None, done.grid
    return built, stage.grid


def etokens_plan(cfg: StudyConfig, joule_fit: bool = True) -> Plan:
    """The profile's e-token grid as planned for one H100 (`metabolic.energy.plan`), nothing measured:
    the models this run folder offers, the tasks, batch sizes and paths, each unit's estimate, the parts."""
    e = cfg.energy
    specs, _ = model_specs(e.models, artefacts.run_dir(cfg.run_name), measured_budgets(cfg))
    tasks = make_tasks(e.input_tokens, e.max_output_tokens, e.tasks)
    return make_plan(e, grid_units(e, specs, tasks, joule_fit=joule_fit and e.joule_fit), tasks, cfg.seed)
