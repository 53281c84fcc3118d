"""The e-token grid as a plan: its units in measuring order, what each costs on one H100, and parts.

A *unit* is measured and kept (persisted) as one piece, so a run cut off anywhere loses at most the
unit in flight:

* ``joule_fit``: the joule fit (semantic cost and tokens -> joules, `metabolic.energy.joules`) and the
  joule budgets (batch 1);
* ``preprocess``: tokenising one batch of a task's texts, once per task x batch size (tokenising does
  not depend on the model or the serving path, so every generation cell of that task and batch size
  shares it);
* ``cell``: one model x serving path x task x batch size: prefill and full windows, repeated.

Units run grouped by model, then path, then batch size, so a model loads once and each (model, path,
batch size) warms up (and, on the static path, compiles) once per process.

Time per unit, from a few figures per GPU (`Throughput`): a `generate` call of n new tokens at batch
B takes ``call_overhead_s + n * decode_step_s[path] * batch_factor(B)``; a prefill call (one new
token) counts as one step; a window runs whole calls until at least `min_window_s` has passed, so it
lasts ``ceil(min_window_s / call) * call``. A cell costs its idle window, one warm-up prefill call
and `repeats` x (prefill window + full window); the first cell of a (model, path, batch size) group
in a process also pays the group's warm-up (the longest task's call, plus the compilation on the
static path) and the first of a model its loading. A part is what one process measures within
`energy.part_seconds`; each process also pays its start (imports, CUDA, the corpus).

`H100` holds the figures measured on one H100 in issue 14 (fp16, GPT-2 small shape). The compile
times were not measured there: they are assumptions, and every unit records its estimate beside its
measured wall time, so the next GPU run can replace them. At run time the part clock (`PartClock`)
scales the estimates by what the units of this process actually took.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from metabolic.core.config import EnergyConfig
from metabolic.core.errors import ConfigError
from metabolic.energy.workloads import ModelSpec, Task

JOULE_FIT = "joule_fit"  # the joule fit's unit kind and key ("calibration" alone is the proxy <-> CSC map)
PREPROCESS = "preprocess"
CELL = "cell"
# How a grid is split into runs (`energy.part_seconds`, `energy.only`): not what it measures, so not in its fingerprint.
RUN_SPLITTING = ("part_seconds", "only")
METABOLIC_PATHS = ("default",)  # its budget enters through forward hooks: not compiled (see measurement)


@dataclass(frozen=True)
class Throughput:
    """What one GPU takes per `generate` call and per start-up, for the plan's estimates."""

    name: str
    decode_step_s: dict[str, float]  # seconds per new token at batch 1, per serving path
    batch32_factor: float  # a step at batch 32 over a step at batch 1 (linear in between)
    call_overhead_s: float  # per generate() call, beside its steps
    tokenize_s: float  # one batch of one task's texts (CPU)
    compile_first_s: float  # the static path's first compilation of a model in a process
    compile_next_s: float  # its second batch size: one recompile with the batch size marked dynamic
    graph_record_s: float  # each further batch size: the dynamic graph is reused, a CUDA graph recorded
    model_load_s: float  # build a random-weight model and move it to the GPU
    process_start_s: float  # imports, CUDA start, tokenising the corpus: once per part
    measured: str  # where the figures come from

    def batch_factor(self, batch_size: int) -> float:
        return 1.0 + (self.batch32_factor - 1.0) * (batch_size - 1) / 31.0

    def call_s(self, path: str, new_tokens: int, batch_size: int) -> float:
        if path not in self.decode_step_s:
            raise ConfigError(f"no throughput for serving path {path!r}: choose among {', '.join(self.decode_step_s)}")
        return self.call_overhead_s + new_tokens * self.decode_step_s[path] * self.batch_factor(batch_size)


H100 = Throughput(
    name="one NVIDIA H100 (fp16)",
    # The slow ends of issue 14's ranges on the GPT-2 small shape at batch 1: default path 95-110
    # tokens/s, static path 323-455 tokens/s (transformers' static cache alone reached 540). The
    # smaller shapes (tiny, gpu-6x384) get the same figures: launch-bound decoding makes them barely
    # faster (issue 14: tiny's 12 cells did not finish in 212 s), so for them this is an upper bound.
    decode_step_s={"default": 1 / 95, "static": 1 / 323},
    # Batch 32 vs batch 1, chat and creative: 28-32x less energy per query at about the same power,
    # i.e. a call 1.0-1.14x as long; rounded up.
    batch32_factor=1.2,
    call_overhead_s=0.01,
    tokenize_s=0.002,
    # Assumed, not measured in issue 14: inductor on a 12-layer decode step ("reduce-overhead", as
    # generate compiles it); torch's automatic dynamic shapes recompile once at the second batch size.
    compile_first_s=60.0,
    compile_next_s=30.0,
    graph_record_s=2.0,
    model_load_s=5.0,
    process_start_s=40.0,
    measured="issue 14 (H100, fp16, GPT-2 small shape); compile times assumed",
)


@dataclass(frozen=True)
class Unit:
    """One persisted piece of the grid (see the module docstring)."""

    kind: str
    task: Optional[Task] = None
    batch_size: Optional[int] = None
    model: Optional[ModelSpec] = None
    path: Optional[str] = None

    @property
    def key(self) -> str:
        """A file-safe name, unique within a grid."""
        if self.kind == JOULE_FIT:
            return JOULE_FIT
        if self.kind == PREPROCESS:
            return f"preprocess-{self.task.name}-b{self.batch_size}"
        return f"cell-{_safe(self.model.name)}-{self.path}-{self.task.name}-b{self.batch_size}"

    @property
    def group(self) -> Optional[tuple[str, str, int]]:
        """(model, path, batch size) of a cell: what warms up together."""
        return (self.model.name, self.path, self.batch_size) if self.kind == CELL else None


def _safe(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    if safe == name:
        return name
    return f"{safe}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:6]}"  # two names cannot meet in one key


def paths_for(spec: ModelSpec, paths: Sequence[str]) -> tuple[str, ...]:
    return METABOLIC_PATHS if spec.kind == "metabolic" else tuple(paths)


def grid_units(e: EnergyConfig, specs: Sequence[ModelSpec], tasks: Sequence[Task], joule_fit: bool) -> list[Unit]:
    """Every unit of the grid, in measuring order (the joule fit first, when `joule_fit`)."""
    units = [Unit(JOULE_FIT)] if joule_fit else []
    units += [Unit(PREPROCESS, task=t, batch_size=b) for t in tasks for b in e.batch_sizes]
    for spec in specs:
        for path in paths_for(spec, e.paths):
            for b in e.batch_sizes:
                units += [Unit(CELL, task=t, batch_size=b, model=spec, path=path) for t in tasks]
    return units


def select(units: Sequence[Unit], only: Sequence[str]) -> list[Unit]:
    """The units `energy.only` selects, in grid order: those whose key matches one of its fnmatch patterns,
    and the preprocess unit of each selected cell's task and batch size (its rows need it). No patterns: all."""
    if not only:
        return list(units)
    chosen = {u.key for u in units if any(fnmatch.fnmatchcase(u.key, pattern) for pattern in only)}
    needed = {(u.task.name, u.batch_size) for u in units if u.kind == CELL and u.key in chosen}
    return [u for u in units if u.key in chosen or (u.kind == PREPROCESS and (u.task.name, u.batch_size) in needed)]


def joule_fit_requests(e: EnergyConfig, seed: int) -> list[tuple[int, int]]:
    """(T_in, T_out) of each request of the joule fit: seeded, the same on every machine."""
    rng = random.Random(seed + 17)
    return [(rng.randint(4, e.input_tokens), rng.randint(1, e.max_output_tokens)) for _ in range(e.joule_fit_requests)]


def longest_task(tasks: Sequence[Task]) -> Task:
    """The task with the longest context: the static path warms up on it, so transformers sizes its
    static cache once for every later call of the model (a larger cache later would recompile)."""
    return max(tasks, key=lambda t: t.input_tokens + t.output_tokens)


def window_s(call_s: float, min_window_s: float) -> float:
    """A window of whole calls, ended by the first call that reaches `min_window_s`."""
    return math.ceil(min_window_s / call_s) * call_s


@dataclass
class ProcessState:
    """What a process has loaded and warmed up: the first unit that needs it pays for it."""

    model: Optional[str] = None
    warmed: set = field(default_factory=set)  # (model, path, batch size)
    compiled: dict = field(default_factory=dict)  # model -> batch sizes its static path compiled for here


class Estimator:
    """Seconds per unit on a `Throughput`, given what the process has already done."""

    def __init__(self, e: EnergyConfig, tasks: Sequence[Task], seed: int, throughput: Throughput = H100) -> None:
        self.e, self.tasks, self.seed, self.t = e, list(tasks), seed, throughput

    def cost(self, unit: Unit, state: ProcessState) -> float:
        e, t = self.e, self.t
        w = e.min_window_s
        if unit.kind == PREPROCESS:
            return e.repeats * window_s(t.tokenize_s, w)
        if unit.kind == JOULE_FIT:
            return self._joule_fit()
        b, path = unit.batch_size, unit.path
        prefill = t.call_s(path, 1, b)
        full = t.call_s(path, unit.task.output_tokens, b)
        s = e.idle_s + prefill + e.repeats * (window_s(prefill, w) + window_s(full, w))
        if state.model != unit.model.name:
            s += t.model_load_s
        if path == "static" and unit.group not in state.warmed:
            s += t.call_s(path, longest_task(self.tasks).output_tokens, b)
            s += (t.compile_first_s, t.compile_next_s)[min(len(state.compiled.get(unit.model.name, ())), 1)] \
                if len(state.compiled.get(unit.model.name, ())) < 2 else t.graph_record_s
        return s

    def _joule_fit(self) -> float:
        e, t = self.e, self.t
        w = e.min_window_s
        s = t.model_load_s + e.idle_s + t.call_s("default", e.max_output_tokens, 1)  # load and warm up
        s += sum(window_s(t.call_s("default", t_out, 1), w) for _, t_out in joule_fit_requests(e, self.seed))
        # joule budgets stop a generation at about that fraction of the dearest request
        per_fraction = [window_s(t.call_s("default", max(1, round(f * e.max_output_tokens)), 1), w)
                        for f in e.budget_fractions]
        return s + 2 * e.budget_prompts * sum(per_fraction)  # two predictors (tokens, semantic cost)

    @staticmethod
    def advance(state: ProcessState, unit: Unit) -> None:
        if unit.kind != CELL:
            if unit.kind == JOULE_FIT:
                state.model = None  # the joule fit's model is dropped when it is done
            return
        state.model = unit.model.name
        state.warmed.add(unit.group)
        if unit.path == "static":
            state.compiled.setdefault(unit.model.name, set()).add(unit.batch_size)


@dataclass(frozen=True)
class Part:
    keys: tuple[str, ...]
    seconds: float  # the process's start plus its units


@dataclass(frozen=True)
class Plan:
    """The remaining units, their estimates and their parts, with the settings that decide them."""

    units: tuple[Unit, ...]  # the whole grid, in order
    done: frozenset  # keys already measured (kept from earlier runs)
    estimates_s: dict  # key -> seconds, as the packing into parts saw them
    parts: tuple[Part, ...]
    throughput: Throughput
    settings: dict

    @property
    def remaining(self) -> list[Unit]:
        return [u for u in self.units if u.key not in self.done]

    @property
    def selection(self) -> list[Unit]:
        """The remaining units this run may measure (all of them unless `energy.only` names some)."""
        return select(self.remaining, self.settings["only"])

    @property
    def total_s(self) -> float:
        return sum(p.seconds for p in self.parts)

    def describe(self) -> str:
        """The plan in words: what is measured, how often, how long on the plan's GPU, in which parts."""
        s = self.settings
        kinds = {k: sum(u.kind == k for u in self.units) for k in (JOULE_FIT, PREPROCESS, CELL)}
        models = list(dict.fromkeys(u.model.name for u in self.units if u.kind == CELL))
        paths = list(dict.fromkeys(u.path for u in self.units if u.kind == CELL))
        tasks = ", ".join(f"{t.name} {t.input_tokens}->{t.output_tokens}" for t in s["tasks"])
        lines = [
            f"e-token plan: {len(models)} model(s) ({', '.join(models) or 'none'}) x paths {', '.join(paths) or 'none'} "
            f"x tasks ({tasks}) x batch sizes {', '.join(map(str, s['batch_sizes']))}",
            f"  repeats {s['repeats']}; every phase window >= {s['min_window_s']} s of whole calls (prefill and full per cell, "
            f"preprocess once per task x batch size); idle baseline {s['idle_s']} s before each cell",
            "  joule fit: " + (f"{s['joule_fit_requests']} requests + {s['budget_generations']} joule-budget generations "
                                f"({s['joule_fit_model']}, batch 1, default path)" if kinds[JOULE_FIT] else "not in this run"),
            f"  units: {len(self.units)} ({kinds[JOULE_FIT]} joule fit, {kinds[PREPROCESS]} preprocess, "
            f"{kinds[CELL]} generation cells); measured already: {len(self.done)}; left: {len(self.remaining)}",
        ]
        if s["only"]:
            lines.append(f"  this run: only units matching {', '.join(s['only'])}: {len(self.selection)} of the "
                         f"{len(self.remaining)} left (the rest stays for later runs)")
        lines += [
            f"  estimate{' of that selection' if s['only'] else ''} on {self.throughput.name}, from {self.throughput.measured}: {self.total_s / 60:.1f} min "
            f"in {len(self.parts)} part(s)"
            + (f" of <= {(s['part_seconds'] + self.throughput.process_start_s) / 60:.1f} min each (process start "
               f"included)" if s["part_seconds"] else ""),
        ]
        for i, part in enumerate(self.parts, 1):
            lines.append(f"    part {i}: {part.seconds / 60:.1f} min, {len(part.keys)} units ({part.keys[0]} .. {part.keys[-1]})")
        return "\n".join(lines)


def _block(unit: Unit) -> str:
    """Units that share a process's work (a loaded model and its warm-ups) form one block."""
    return unit.model.name if unit.kind == CELL else unit.kind


def make_plan(e: EnergyConfig, units: Sequence[Unit], tasks: Sequence[Task], seed: int, done: Iterable[str] = (),
              throughput: Throughput = H100, only: Sequence[str] = ()) -> Plan:
    """Pack the units not yet `done` (and selected by `only`, see `select`) into parts of at most
    `e.part_seconds` of measuring (one part without it).

    Parts end between blocks (the joule fit, the preprocess units, each model) where a block fits
    in a part, so a model is loaded, warmed up and compiled once; a block larger than a part is
    split between its units.
    """
    done = frozenset(done)
    est = Estimator(e, tasks, seed, throughput)
    budget = e.part_seconds
    parts: list[Part] = []
    estimates: dict[str, float] = {}
    keys: list[str] = []
    used = 0.0
    state = ProcessState()

    def close() -> None:
        nonlocal keys, used, state
        if keys:
            parts.append(Part(tuple(keys), throughput.process_start_s + used))
        keys, used, state = [], 0.0, ProcessState()

    def block_cost(block: list[Unit]) -> float:
        trial = copy.deepcopy(state)
        total = 0.0
        for unit in block:
            total += est.cost(unit, trial)
            est.advance(trial, unit)
        return total

    remaining = select([u for u in units if u.key not in done], only)
    blocks = [list(b) for _, b in itertools.groupby(remaining, key=_block)]
    for block in blocks:
        if budget is not None and keys and used + block_cost(block) > budget:
            close()  # the block starts a part of its own
        for unit in block:  # one by one: a block larger than a part is split between its units
            cost = est.cost(unit, state)
            if budget is not None and keys and used + cost > budget:
                close()
                cost = est.cost(unit, state)  # a new process loads and warms up again
            if budget is not None and cost > budget:
                raise ConfigError(f"unit {unit.key} alone needs about {cost:.0f} s on {throughput.name}, more than "
                                  f"energy.part_seconds={budget:g}: raise energy.part_seconds or lower "
                                  f"energy.min_window_s, energy.repeats or energy.max_output_tokens")
            estimates[unit.key] = cost
            keys.append(unit.key)
            used += cost
            est.advance(state, unit)
    close()
    settings = {"tasks": list(tasks), "batch_sizes": list(e.batch_sizes), "repeats": e.repeats,
                "min_window_s": e.min_window_s, "idle_s": e.idle_s, "joule_fit_requests": e.joule_fit_requests,
                "budget_generations": 2 * e.budget_prompts * len(e.budget_fractions), "joule_fit_model": e.joule_fit_model,
                "part_seconds": budget, "only": list(only)}
    return Plan(tuple(units), done, estimates, tuple(parts), throughput, settings)


class PartClock:
    """Decides whether the next unit fits in this process's part of `seconds` (None: no limit).

    The estimates are scaled by what this process's units actually took against their estimates
    (never below half), and the first unit always runs, so every part makes progress.
    """

    def __init__(self, seconds: Optional[float], clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.estimated_s = 0.0
        self.actual_s = 0.0
        self.units = 0

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.start

    @property
    def ratio(self) -> float:
        return max(0.5, self.actual_s / self.estimated_s) if self.estimated_s > 0 else 1.0

    def fits(self, estimate_s: float) -> bool:
        if self.seconds is None or self.units == 0:
            return True
        return self.elapsed_s + estimate_s * self.ratio <= self.seconds

    def record(self, estimate_s: float, actual_s: float) -> None:
        self.estimated_s += estimate_s
        self.actual_s += actual_s
        self.units += 1
