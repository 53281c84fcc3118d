"""Energy per query, phase by phase: the windows of one unit, its result rows, and the merged table.

A query runs from receiving its text to its last output token, in three phases, each measured in its
own named zeus window (`metabolic.energy.meter`) of whole, identical calls that lasts at least
`energy.min_window_s` (NVML's counter moves in ~100 ms steps, RAPL's in ~1 ms), repeated `energy.repeats` times:

* preprocess: tokenising the batch's texts (CPU work; on a GPU machine the GPU idles, and its energy is counted).
  It depends on neither the model nor the serving path, so it is measured once per task x batch
  size (`measure_preprocess`) and shared by every generation cell of that task and batch size;
* prefill: `generate(max_new_tokens=1)` (the AI Energy Score / optimum-benchmark energy_star method):
  the forward pass over the prompt plus the first token;
* full: `generate(max_new_tokens=T_out, min_new_tokens=T_out)`, so every query has exactly T_out
  output tokens whatever the weights.

Decode = full - prefill. Why subtraction and not a window inside `generate`: splitting there needs a
synchronisation per step inside the decode loop, which changes the launch-bound decode it measures,
and the full call is exactly what a user runs. Decode therefore covers T_out - 1 tokens. A query's
total energy is preprocess + full; e-tokens use it.

Idle and active energy: each generation cell first measures the idle device for `energy.idle_s`;
active = total - idle power x the query's time. Every window's energy is known only to within its
resolution (one counter period x its power, `Measurement.resolution_j`), so the active energy of a
query is known to within the sum of its windows' resolutions plus the idle power's resolution x its
time. An active (or decode) energy below that bound is written as None with `active_below_resolution`
True and the bound in `active_resolution_j` ("below resolution (< x J)" in tables): never as a
negative energy.

Serving paths: `default` (HF `generate()`, dynamic KV cache) and `static` (HF's own static cache,
`generate(cache_implementation="static")`, whose decode step `generate` compiles with torch.compile
on CUDA; on CPU it runs uncompiled). The row's `compiled` says what transformers actually did. No
decode loop of our own: transformers' static path reached 540 tokens/s on the H100 at batch 1 alone
(issue 14), against 323-455 inside the grid (cause not established; the grid then grew the static
cache with each longer task, a new shape for the compiled step each time). Here the first call of
each (model, batch size) uses the longest task, so the cache is sized once (`metabolic.energy.grid`). A CUDA-graphed loop of our own would have to beat that on a
GPU before it earned its place. Both paths are greedy, so their outputs are compared by hash
(`same_outputs_as_first_path`). MetabolicGPT-2 decodes through the same `generate()` under its budget
pathway, on the default path only (its budget enters through forward hooks, which a compiled
decode step would not see change).

The measured device is the one that runs the queries: the GPU through NVML, or on a CPU run the CPU
package(s) + DRAM through RAPL (`energy_source="rapl"`), with the same phases and subtraction. Every row
names its counters (`energy_counters`) and those not read with why (`energy_missing`); where the measured
device's counters cannot be read (no GPU; RAPL hidden or root-only, as in containers and on CI) rows keep
wall time and tokens/s per phase, labelled as timings, and every energy field is None with
`energy_source="unavailable"`: never 0 J, never an estimate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from metabolic.core import artefacts
from metabolic.core.budget import in_band
from metabolic.core.config import EnergyConfig
from metabolic.core.errors import DataError
from metabolic.energy.etokens import check_rows, etokens, spread
from metabolic.energy.joules import JouleBudgetStopping, cost_predictor, fit_linear, tokens_predictor
from metabolic.energy.meter import COUNTERS, EnergyMeter, Measurement, active_energy_j, idle_energy_j, missing_text
from metabolic.energy.plan import joule_fit_requests
from metabolic.energy.workloads import SCRATCH_SHAPES, ModelSpec, Task, load_model, pick_prompts

log = logging.getLogger(__name__)

PHASES = ("preprocess", "prefill", "full")
ROWS = "rows.jsonl"
JOULE_FIT_FILE = "joule_fit.json"  # the joule fit (semantic cost and tokens -> joules, `metabolic.energy.joules`)
MACHINE = "machine.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- machine -------------------------------------------------------------------------------------


def machine_info(meter: EnergyMeter, device: torch.device) -> dict[str, Any]:
    """Where a result was measured: host, device, GPU, driver, power limit, energy source and counters, versions."""
    import transformers

    info = meter.info
    return {
        "host": socket.gethostname(),
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu_name": info.name if info else None,
        "driver": info.driver if info else None,
        "power_limit_w": info.power_limit_w if info else None,
        "energy_source": meter.source,
        "energy_counters": meter.counters,
        "energy_missing": missing_text(meter.missing),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def machine_tag(machine: dict[str, Any]) -> str:
    """A folder-safe name for a kind of machine, e.g. `NVIDIA-H100-80GB-HBM3` or `cpu`.

    The host is left out: parts of one grid may run on several machines of the same kind (each
    lent machine starts bare), and every row names its own host and driver.
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", machine["gpu_name"] or "cpu").strip("-")


# --- windows ---------------------------------------------------------------------------------------


def greedy_generate_fn(model, spec: ModelSpec, path: str, eos_id: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """fn(input_ids [B, T_in], n_new) -> ids [B, T_in + n_new], exactly n_new new tokens, greedy.

    Every model decodes through `generate()`: a MetabolicGPT-2 through its backbone under its budget
    pathway (`conditioned_on`), the serving path of budgeted generation, so its rows compare with
    the other models' on the same decode loop.
    """
    extra = {"cache_implementation": "static"} if path == "static" else {}
    metabolic = spec.kind == "metabolic"
    lm = model.backbone if metabolic else model

    # generate() runs under its own no_grad, as it does when transformers compiles it; no inference_mode
    # around it, so the compiled step sees the same grad mode as in transformers' own use
    def run(ids: torch.Tensor, n_new: int) -> torch.Tensor:
        budget = torch.full((ids.shape[0],), float(spec.budget), device=ids.device) if metabolic else None
        with model.conditioned_on(budget) if metabolic else contextlib.nullcontext():
            return lm.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                do_sample=False, pad_token_id=eos_id, eos_token_id=eos_id, **extra,
            )

    return run


def compiled_by_generate(model, spec: ModelSpec) -> bool:
    """Whether transformers compiled this model's decode step (it keeps the compiled call on the model)."""
    lm = model.backbone if spec.kind == "metabolic" else model
    return hasattr(lm, "_compiled_call")


def sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def adaptive_window(meter: EnergyMeter, fn: Callable[[], Any], min_window_s: float,
                    sync: Callable[[], None], name: str = "window") -> tuple[Measurement, int, Any]:
    """(measurement, calls, first call's result) of the zeus window `name` of whole calls of `fn`, ended by
    the first call that brings it to `min_window_s` (the host waits for the device after each call)."""
    first, n = None, 0
    with meter.window(name) as w:
        t0 = time.perf_counter()
        while True:
            out = fn()
            sync()
            n += 1
            if first is None:
                first = out
            if time.perf_counter() - t0 >= min_window_s:
                break
    return w.measurement, n, first


def window_record(m: Measurement, n_calls: int) -> dict[str, Any]:
    """What a window keeps: everything a row is computed from."""
    return {"energy_j": m.energy_j, "time_s": m.time_s, "n_calls": n_calls, "short_window": m.short_window,
            "resolution_j": m.resolution_j, "source": m.source, "gpu_j": m.gpu_j, "cpu_package_j": m.cpu_package_j,
            "dram_j": m.dram_j}


def idle_record(meter: EnergyMeter, idle_s: float) -> dict[str, Any]:
    """The idle device's power over `idle_s` seconds (nothing to wait for without a meter)."""
    if not meter.available:
        return {"power_w": None, "resolution_w": None, "time_s": 0.0, "energy_j": None}
    base = meter.idle_baseline(idle_s)
    return {"power_w": base.power_w, "resolution_w": base.resolution_w, "time_s": base.measurement.time_s,
            "energy_j": base.measurement.energy_j}


def measure_preprocess(meter: EnergyMeter, tokenizer, prompts: list[list[int]], min_window_s: float,
                       repeats: int) -> dict[str, Any]:
    """Tokenising a batch's texts: `repeats` windows."""
    texts = tokenizer.batch_decode(prompts, clean_up_tokenization_spaces=False)
    fn = lambda: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    fn()  # warm-up
    return {"windows": [window_record(*adaptive_window(meter, fn, min_window_s, lambda: None, "preprocess")[:2])
                        for _ in range(repeats)]}


def measure_cell(meter: EnergyMeter, gen: Callable, ids: torch.Tensor, task: Task, min_window_s: float, repeats: int,
                 idle_s: float, sync: Callable[[], None]) -> dict[str, Any]:
    """One (model, path, task, batch size): the idle baseline, then `repeats` x (prefill, full) windows.

    The greedy outputs of the first full call are kept as a hash, to compare serving paths.
    """
    idle = idle_record(meter, idle_s)
    gen(ids, 1)  # this prompt shape's warm-up
    sync()
    windows, outputs = [], None
    for _ in range(repeats):
        pre, n_pre, _ = adaptive_window(meter, lambda: gen(ids, 1), min_window_s, sync, "prefill")
        full, n_full, out = adaptive_window(meter, lambda: gen(ids, task.output_tokens), min_window_s, sync, "full")
        outputs = out if outputs is None else outputs
        windows.append({"prefill": window_record(pre, n_pre), "full": window_record(full, n_full)})
    if outputs.shape[1] != task.input_tokens + task.output_tokens:
        raise DataError(f"generate returned {outputs.shape[1] - task.input_tokens} new tokens, expected {task.output_tokens}")
    digest = artefacts.sha256_bytes(outputs.cpu().to(torch.int64).numpy().tobytes())
    return {"idle": idle, "windows": windows, "outputs_sha256": digest}


# --- rows ------------------------------------------------------------------------------------------


def resolved(name: str, value_j: float, bound_j: float) -> dict[str, Any]:
    """`<name>_j` when it exceeds what the meter resolves, else None with the flag and the bound."""
    below = value_j < bound_j
    return {f"{name}_j": None if below else value_j, f"{name}_below_resolution": below, f"{name}_resolution_j": bound_j}


def energy_text(value_j: Optional[float], below: Optional[bool], bound_j: Optional[float]) -> str:
    """How a table shows an energy: "12.3 J", "below resolution (< 0.8 J)" or "unavailable"."""
    if below:
        return f"below resolution (< {bound_j:.3g} J)"
    return "unavailable" if value_j is None else f"{value_j:.3g} J"


def phase_row(windows: dict[str, dict], batch_size: int, task: Task, idle: dict[str, Any]) -> dict[str, Any]:
    """Per-query energies and times of one repeat, from its preprocess, prefill and full windows."""
    row: dict[str, Any] = {}
    available = all(w["energy_j"] is not None for w in windows.values()) and idle["power_w"] is not None
    for ph, w in windows.items():
        queries = w["n_calls"] * batch_size
        row[f"{ph}_window_s"] = w["time_s"]
        row[f"{ph}_n_calls"] = w["n_calls"]
        row[f"{ph}_s_per_query"] = w["time_s"] / queries  # amortised over the batch
        row[f"{ph}_latency_s"] = w["time_s"] / w["n_calls"]  # one batched call
        row[f"{ph}_j"] = w["energy_j"] / queries if available else None
        row[f"{ph}_resolution_j"] = w["resolution_j"] / queries if available else None
        row[f"{ph}_short_window"] = w["short_window"]
    row["decode_s_per_query"] = row["full_s_per_query"] - row["prefill_s_per_query"]
    row["total_s_per_query"] = row["preprocess_s_per_query"] + row["full_s_per_query"]
    row["output_tokens_per_s"] = windows["full"]["n_calls"] * batch_size * task.output_tokens / windows["full"]["time_s"]
    row["prefill_tokens_per_s"] = windows["prefill"]["n_calls"] * batch_size * task.input_tokens / windows["prefill"]["time_s"]
    for counter in COUNTERS:  # each counter read, per query (None where it was not)
        parts = [windows[ph].get(f"{counter}_j") for ph in ("preprocess", "full")]
        row[f"total_{counter}_j"] = None if None in parts else sum(
            p / (windows[ph]["n_calls"] * batch_size) for p, ph in zip(parts, ("preprocess", "full")))
    row["idle_power_w"] = idle["power_w"]
    row["idle_window_s"] = idle["time_s"]
    if available:
        row["total_j"] = row["preprocess_j"] + row["full_j"]
        row["idle_j"] = idle_energy_j(idle["power_w"], row["total_s_per_query"])
        active_bound = (row["preprocess_resolution_j"] + row["full_resolution_j"]
                        + idle["resolution_w"] * row["total_s_per_query"])
        row.update(resolved("active", active_energy_j(row["total_j"], idle["power_w"], row["total_s_per_query"]),
                            active_bound))
        row.update(resolved("decode", row["full_j"] - row["prefill_j"],
                            row["full_resolution_j"] + row["prefill_resolution_j"]))
        row["j_per_output_token"] = row["total_j"] / task.output_tokens
        e = etokens(row["total_j"], task.input_tokens, task.output_tokens)
        row.update(energy_wh=e.energy_wh, e_in_wh=e.e_in_wh, e_out_wh=e.e_out_wh, etoken_note=e.note,
                   identity_ok=e.identity_holds())
    else:
        row.update(total_j=None, idle_j=None, active_j=None, active_below_resolution=None, active_resolution_j=None,
                   decode_j=None, decode_below_resolution=None, decode_resolution_j=None, j_per_output_token=None,
                   energy_wh=None, e_in_wh=None, e_out_wh=None, identity_ok=None,
                   etoken_note="energy unavailable on this machine (its counters: energy_missing): these are CPU/wall "
                               "timings only")
    row["energy_source"] = windows["full"]["source"]
    return row


def cell_rows(record: dict[str, Any], preprocess: dict[str, Any], task: Task, batch_size: int) -> list[dict[str, Any]]:
    """The rows of one measured cell: one per repeat, with the preprocess window of the same repeat."""
    rows = []
    for r, windows in enumerate(record["windows"]):
        phases = {"preprocess": preprocess["windows"][r], **windows}
        rows.append({"repeat": r, **phase_row(phases, batch_size, task, record["idle"])})
    return rows


# --- the joule fit and physical budgets (where energy is measured) --------------------------------


def run_joule_fit(e: EnergyConfig, seed: int, meter: EnergyMeter, tokenizer, valid, token_cost, device: torch.device,
                  progress: bool = True) -> dict[str, Any]:
    """Per-request joules vs semantic cost and tokens; then generation within joule budgets, Hit@10%.

    Semantic cost of a request = sum of the synthetic prior's token costs over its input and output
    tokens (the study's "metabolic tokenizer"; a trained MetabolicGPT-2's calibrated cost can replace
    it). Batch 1, default path; each request's joules come from one window of whole repeated calls.
    Needs a working energy meter: on a machine without one this returns a `skipped` reason.
    """
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    if not meter.available:
        return {"skipped": f"energy unavailable: {meter.reason}"}
    spec = ModelSpec(e.joule_fit_model, "scratch", shape=SCRATCH_SHAPES[e.joule_fit_model])
    dtype = DTYPES[e.dtype] if device.type == "cuda" else torch.float32
    eos = tokenizer.eos_token_id
    model = load_model(spec, len(tokenizer), eos, device, dtype)
    gen = greedy_generate_fn(model, spec, "default", eos)
    sync = sync_for(device)
    warm = torch.tensor(pick_prompts(valid, 1, e.input_tokens, seed), device=device)
    gen(warm, e.max_output_tokens)  # warm-up
    idle = idle_record(meter, e.idle_s)
    points = []
    requests = joule_fit_requests(e, seed)
    for i, (t_in, t_out) in enumerate(tqdm(requests, desc="joule fit", disable=not progress)):
        ids = torch.tensor(pick_prompts(valid, 1, t_in, seed + i), device=device)
        m, n, out = adaptive_window(meter, lambda: gen(ids, t_out), e.min_window_s, sync, "joule_fit")  # noqa: B023
        points.append({"input_tokens": t_in, "output_tokens": t_out, "context_tokens": t_in + t_out,
                       "semantic_cost": float(token_cost[out[0].tolist()].sum()), "energy_j": m.energy_j / n,
                       "resolution_j": m.resolution_j / n, "window_s": m.time_s, "n_calls": n, "batch_size": 1})
    fit_tokens = fit_linear([[p["input_tokens"], p["output_tokens"]] for p in points], [p["energy_j"] for p in points],
                            ("input_tokens", "output_tokens"))
    fit_cost = fit_linear([[p["semantic_cost"]] for p in points], [p["energy_j"] for p in points], ("semantic_cost",))
    top = max(p["energy_j"] for p in points)
    budgets = []
    for predictor in ("tokens", "cost"):
        for frac in e.budget_fractions:
            budget_j = frac * top
            measured, lengths = [], []
            for i in range(e.budget_prompts):
                prompt = pick_prompts(valid, 1, e.input_tokens, seed + 1000 + i)
                if predictor == "tokens":
                    predict, step = tokens_predictor(fit_tokens)
                else:
                    predict, step = cost_predictor(fit_cost, token_cost, float(token_cost[prompt[0]].sum()))
                ids = torch.tensor(prompt, device=device)
                crit = JouleBudgetStopping([budget_j], e.input_tokens, predict, step)

                def fn(ids=ids, crit=crit):
                    with torch.inference_mode():
                        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=e.max_output_tokens, do_sample=False, pad_token_id=eos,
                                              stopping_criteria=StoppingCriteriaList([crit]))
                m, n, out = adaptive_window(meter, fn, e.min_window_s, sync, "joule-budget")
                measured.append(m.energy_j / n)
                lengths.append(out.shape[1] - e.input_tokens)
            budgets.append({"predictor": predictor, "fraction": frac, "budget_j": budget_j, "measured_j": measured,
                            "output_tokens": lengths, "hit10": float(np.mean(in_band(measured, budget_j, 0.10))),
                            "batch_size": 1, "min_window_s": e.min_window_s})
    return {"model": spec.name, "points": points, "semantic_cost": "synthetic prior (sum over input and output tokens)",
            "fit_tokens": fit_tokens.__dict__, "fit_cost": fit_cost.__dict__, "budgets": budgets,
            "min_window_s": e.min_window_s, "idle_power_w": idle["power_w"]}


# --- the stage's description and results ----------------------------------------------------------


def joule_fits(root: Path) -> list[dict]:
    """Every finished machine's joule fit under `root` (one e-token folder per machine)."""
    return [artefacts.read_json(p) for p in sorted(Path(root).glob(f"*/{JOULE_FIT_FILE}")) if ".partial" not in p.parent.name]


def measured_model_keys(specs: Sequence[ModelSpec]) -> list[tuple[str, str, str | None]]:
    """(name, source, training fingerprint) per model: a retrained MetabolicGPT-2 changes its
    training folder's manifest fingerprint, and so the e-token stage's key. A MetabolicGPT-2 is known by
    that fingerprint, not by its folder's path: moving the data folder measures nothing again."""
    return [(s.name, s.source, None) if s.kind != "metabolic" else
            (s.name, "metabolic", (artefacts.read_manifest(Path(s.source).parent) or {}).get("fingerprint"))
            for s in specs]


# Bumped when what is measured changes (2: MetabolicGPT-2 decodes through generate(), not a hand loop;
# 3: units kept one by one, adaptive windows, idle per cell, preprocess per task x batch size, the
# static path named `static`, active and decode energies below resolution written as None; 4: zeus is the
# meter, the CPU's RAPL counters measured on a CPU run, each counter's joules kept per window).
MEASUREMENT_VERSION = 4
# What identifies the kind of machine in the stage's key: parts of one grid may run on several
# lent machines of the same kind (each starts bare), so host and driver are recorded per unit instead.
MACHINE_KEY = ("device", "gpu_name", "energy_source")


def stage_description(settings: dict, seed: int, corpus_fingerprint: str, model_keys: list, machine: dict) -> dict:
    """What the e-token stage's artefact is made from: a change to any of it measures again.

    `model_keys` holds (name, source, training fingerprint) per measured model, so a retrained
    MetabolicGPT-2 (new manifest fingerprint) is measured again instead of reusing stale rows.
    """
    return {"stage": "etokens", "version": MEASUREMENT_VERSION, "energy": settings, "seed": seed, "corpus": corpus_fingerprint,
            "models": [list(k) for k in model_keys], "machine": {k: machine[k] for k in MACHINE_KEY}}


def read_rows(path: Path) -> list[dict]:
    """The rows of one `rows.jsonl`, each tagged with the file it came from."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path} line {i + 1} is not JSON: the file is corrupt; re-copy it from its machine") from None
        rows.append({**row, "results_file": f"{Path(path).parent.name}/{Path(path).name}"})
    return rows


def merge_results(root: Path, extra: Sequence[Path] = ()) -> list[dict]:
    """Every `rows.jsonl` under `root` (one folder per machine and setting) plus `extra` files, as one list.

    Result folders copied from other machines (e.g. the H100 and H200 runs) into `root` merge here;
    each row names its machine, so the table can split by GPU. Unfinished (`.partial`) folders are left out.
    """
    files = sorted(Path(root).glob(f"*/{ROWS}")) if Path(root).is_dir() else []
    files += [Path(p) for p in extra]
    rows = [row for path in files if ".partial" not in path.parent.name for row in read_rows(path)]
    check_rows(rows)
    return rows


GROUP = ("gpu_name", "host", "model", "path", "task", "batch_size")
SUMMARY_FIELDS = ("total_j", "preprocess_j", "prefill_j", "decode_j", "active_j", "e_in_wh", "e_out_wh",
                  "j_per_output_token", "total_s_per_query", "prefill_s_per_query", "decode_s_per_query",
                  "output_tokens_per_s")
RESOLVED = ("active", "decode")  # energies that can fall below the meter's resolution


def paths_agree(rows: Sequence[dict]) -> dict[str, int]:
    """Cells (machine x model x task x batch size) measured on several paths: how many gave identical outputs."""
    seen: dict[tuple, set] = {}
    paths: dict[tuple, set] = {}
    for r in rows:
        if "outputs_sha256" not in r:
            continue
        key = (r.get("gpu_name"), r.get("host"), r["model"], r["task"], r["batch_size"])
        seen.setdefault(key, set()).add(r["outputs_sha256"])
        paths.setdefault(key, set()).add(r["path"])
    multi = [k for k in seen if len(paths[k]) > 1]
    return {"cells_with_several_paths": len(multi), "identical_outputs": sum(len(seen[k]) == 1 for k in multi)}


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Median (and inter-quartile range) over repeats per machine x model x path x task x batch size.

    Active and decode energies: the median of the resolved repeats when most repeats are resolved,
    else None; `<name>_text` says which ("12.3 J" or "below resolution (< 0.8 J)").
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in GROUP), []).append(row)
    out = []
    for key, members in groups.items():
        first = members[0]
        entry = {**dict(zip(GROUP, key)), "device": first["device"], "energy_source": first["energy_source"],
                 "input_tokens": first["input_tokens"], "output_tokens": first["output_tokens"],
                 "n_params": first["n_params"], "repeats": len(members), "compiled": first["compiled"],
                 "window_s_min": min(min(r[f"{ph}_window_s"] for ph in PHASES) for r in members)}
        for name in SUMMARY_FIELDS:
            s = spread(r.get(name) for r in members)
            entry[name] = s.median if s else None
            entry[f"{name}_iqr"] = s.iqr if s else None
        for name in RESOLVED:
            below = [r for r in members if r.get(f"{name}_below_resolution")]
            if 2 * len(below) > len(members):
                entry[f"{name}_j"] = entry[f"{name}_j_iqr"] = None
            bound = max((r[f"{name}_resolution_j"] for r in below), default=None)
            entry[f"{name}_text"] = energy_text(entry[f"{name}_j"], 2 * len(below) > len(members), bound)
        out.append(entry)
    return out


def window_resolution_note(rows: Sequence[dict]) -> str:
    """One line on how many active and decode energies were below the meter's resolution."""
    with_energy = [r for r in rows if r.get("total_j") is not None]
    if not with_energy:
        return "no energy measured: no resolution to state"
    parts = []
    for name in RESOLVED:
        below = [r[f"{name}_resolution_j"] for r in with_energy if r.get(f"{name}_below_resolution")]
        parts.append(f"{name} energy below resolution in {len(below)} of {len(with_energy)} rows"
                     + (f" (bounds up to {max(below):.3g} J)" if below else ""))
    return "; ".join(parts)


def outputs_agree_across_paths(rows: list[dict], paths: Sequence[str]) -> None:
    """Set `same_outputs_as_first_path` on every row: its cell's output hash against the first path's
    (in `paths` order) for the same model, task and batch size; None for the first path itself."""
    first: dict[tuple, tuple[str, str]] = {}
    order = {p: i for i, p in enumerate(paths)}
    for r in sorted(rows, key=lambda r: order.get(r["path"], len(order))):
        key = (r["model"], r["task"], r["batch_size"])
        first.setdefault(key, (r["path"], r["outputs_sha256"]))
    for r in rows:
        path, digest = first[(r["model"], r["task"], r["batch_size"])]
        r["same_outputs_as_first_path"] = None if r["path"] == path else r["outputs_sha256"] == digest
