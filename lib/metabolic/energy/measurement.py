"""Energy per query, phase by phase, and the `etokens` stage (results per machine, merged into one table).

A query runs from receiving its text to its last output token, in three phases, each measured in its
own window of many identical calls (>= `energy.min_window_s`, because NVML's counter moves in
~100 ms steps), repeated `energy.repeats` times with the phases interleaved so drift hits all alike:

* preprocess: tokenising the batch's texts (CPU work; the GPU idles, and its energy is counted);
* prefill: `generate(max_new_tokens=1)` (the AI Energy Score / optimum-benchmark energy_star method):
  the forward pass over the prompt plus the first token;
* full: `generate(max_new_tokens=T_out, min_new_tokens=T_out)`, so every query has exactly T_out
  output tokens whatever the weights.

Decode = full - prefill. Why subtraction and not a window inside `generate`: splitting there needs a
synchronisation per step inside the decode loop, which changes the launch-bound decode it measures,
and the full call is exactly what a user runs. Decode therefore covers T_out - 1 tokens; a noisy
subtraction can come out slightly negative and is kept as measured. A query's total energy is
preprocess + full; e-tokens use it. The idle baseline (power with nothing running, measured first)
is reported beside it: active = total - idle power x the query's share of the window time.

Two serving paths: `default` (HF `generate()`, dynamic KV cache) and `static-compile` (static KV
cache; on CUDA transformers compiles the forward with torch.compile automatically for a static
cache; on CPU it runs uncompiled and the row says `compiled=False`). Both are greedy, so their outputs
are compared token for token (`same_outputs`). MetabolicGPT-2 runs through its own forward with a
KV cache in a greedy loop (`manual-kv`), since its budget enters the forward pass.

Without a GPU no energy is measured: rows keep wall time and tokens/s per phase, labelled as CPU
timings, and every energy field is None with `energy_source="unavailable"`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import random
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from metabolic.core import artefacts
from metabolic.core.config import EnergyConfig
from metabolic.core.errors import AssetError, DataError
from metabolic.energy.etokens import check_rows, etokens, spread
from metabolic.energy.joules import JouleBudgetStopping, cost_predictor, fit_linear, tokens_predictor
from metabolic.energy.meter import EnergyMeter, IdleBaseline, Measurement
from metabolic.energy.workloads import SCRATCH_SHAPES, ModelSpec, Task, count_parameters, load_model, make_tasks, pick_prompts
from metabolic.evaluate.scoring import hit_fraction

log = logging.getLogger(__name__)

PHASES = ("preprocess", "prefill", "full")
ROWS = "rows.jsonl"
CALIBRATION = "calibration.json"
MACHINE = "machine.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- machine -------------------------------------------------------------------------------------


def machine_info(meter: EnergyMeter, device: torch.device) -> dict[str, Any]:
    """Where a result was measured: host, device, GPU, driver, power limit, energy source, versions."""
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
        "energy_unavailable_reason": meter.reason,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def machine_tag(machine: dict[str, Any]) -> str:
    """A folder-safe name for a machine's results, e.g. `NVIDIA-H100-80GB-HBM3-host` or `cpu-host`."""
    base = machine["gpu_name"] or "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}-{machine['host']}").strip("-")


# --- one query batch -----------------------------------------------------------------------------


def greedy_generate_fn(model, spec: ModelSpec, path: str, eos_id: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """fn(input_ids [B, T_in], n_new) -> ids [B, T_in + n_new], exactly n_new new tokens, greedy.

    Every model decodes through `generate()`: a MetabolicGPT-2 through its backbone under its budget
    pathway (`conditioned_on`), the serving path of budgeted generation, so its rows compare with
    the other models' on the same decode loop.
    """
    extra = {"cache_implementation": "static"} if path == "static-compile" else {}
    metabolic = spec.kind == "metabolic"
    lm = model.backbone if metabolic else model

    @torch.inference_mode()
    def run(ids: torch.Tensor, n_new: int) -> torch.Tensor:
        budget = torch.full((ids.shape[0],), float(spec.budget), device=ids.device) if metabolic else None
        with model.conditioned_on(budget) if metabolic else contextlib.nullcontext():
            return lm.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                do_sample=False, pad_token_id=eos_id, eos_token_id=eos_id, **extra,
            )

    return run


def calls_for_window(fn: Callable[[], Any], min_window_s: float, sync: Callable[[], None]) -> int:
    """How many calls of `fn` fill a window of at least `min_window_s` (from one timed call, +10% margin)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one_s = max(time.perf_counter() - t0, 1e-6)
    return max(1, math.ceil(1.1 * min_window_s / one_s))


def measure_window(meter: EnergyMeter, fn: Callable[[], Any], n_calls: int) -> Measurement:
    with meter.window() as w:
        for _ in range(n_calls):
            fn()
    return w.measurement


def _sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def phase_row(ms: dict[str, Measurement], n_calls: dict[str, int], batch_size: int, task: Task,
              idle: IdleBaseline) -> dict[str, Any]:
    """Per-query energies and times of one repeat, from the three phase windows."""
    row: dict[str, Any] = {}
    available = all(m.available for m in ms.values())
    for ph, m in ms.items():
        queries = n_calls[ph] * batch_size
        row[f"{ph}_window_s"] = m.time_s
        row[f"{ph}_n_calls"] = n_calls[ph]
        row[f"{ph}_s_per_query"] = m.time_s / queries  # amortised over the batch
        row[f"{ph}_latency_s"] = m.time_s / n_calls[ph]  # one batched call
        row[f"{ph}_j"] = m.energy_j / queries if available else None
        row[f"{ph}_short_window"] = m.short_window
    row["decode_s_per_query"] = row["full_s_per_query"] - row["prefill_s_per_query"]
    row["total_s_per_query"] = row["preprocess_s_per_query"] + row["full_s_per_query"]
    row["output_tokens_per_s"] = n_calls["full"] * batch_size * task.output_tokens / ms["full"].time_s
    row["prefill_tokens_per_s"] = n_calls["prefill"] * batch_size * task.input_tokens / ms["prefill"].time_s
    row["idle_power_w"] = idle.power_w
    if available:
        row["decode_j"] = row["full_j"] - row["prefill_j"]
        row["total_j"] = row["preprocess_j"] + row["full_j"]
        row["idle_j"] = idle.idle_energy_j(row["total_s_per_query"])
        row["active_j"] = idle.active_energy_j(row["total_j"], row["total_s_per_query"])
        row["j_per_output_token"] = row["total_j"] / task.output_tokens
        e = etokens(row["total_j"], task.input_tokens, task.output_tokens)
        row.update(energy_wh=e.energy_wh, e_in_wh=e.e_in_wh, e_out_wh=e.e_out_wh, etoken_note=e.note,
                   identity_ok=e.identity_holds())
    else:
        row.update(decode_j=None, total_j=None, idle_j=None, active_j=None, j_per_output_token=None,
                   energy_wh=None, e_in_wh=None, e_out_wh=None, identity_ok=None,
                   etoken_note="energy unavailable on this machine: these are CPU/wall timings only")
    row["energy_source"] = next(iter(ms.values())).source
    return row


def measure_cell(meter: EnergyMeter, gen: Callable, tokenizer, prompts: list[list[int]], task: Task,
                 device: torch.device, min_window_s: float, repeats: int, idle: IdleBaseline) -> tuple[list[dict], torch.Tensor]:
    """All repeats of one (model, path, task, batch size): rows and the greedy outputs (for path comparison)."""
    sync = _sync_for(device)
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    texts = tokenizer.batch_decode(prompts, clean_up_tokenization_spaces=False)
    fns = {
        "preprocess": lambda: tokenizer(texts, add_special_tokens=False)["input_ids"],
        "prefill": lambda: gen(ids, 1),
        "full": lambda: gen(ids, task.output_tokens),
    }
    gen(ids, 1)  # warm-up
    outputs = gen(ids, task.output_tokens)  # warm-up (compiles on the static path) and the reference output
    sync()
    t0 = time.perf_counter()
    gen(ids, task.output_tokens)  # timed after compilation, so the window count is not set by compile time
    sync()
    full_s = max(time.perf_counter() - t0, 1e-6)
    if outputs.shape[1] != task.input_tokens + task.output_tokens:
        raise DataError(f"generate returned {outputs.shape[1] - task.input_tokens} new tokens, expected {task.output_tokens}")
    n_calls = {ph: calls_for_window(fns[ph], min_window_s, sync) for ph in ("preprocess", "prefill")}
    n_calls["full"] = max(1, math.ceil(1.1 * min_window_s / full_s))
    rows = []
    for r in range(repeats):
        ms = {ph: measure_window(meter, fns[ph], n_calls[ph]) for ph in PHASES}
        rows.append({"repeat": r, **phase_row(ms, n_calls, len(prompts), task, idle)})
    return rows, outputs.cpu()


# --- the grid ------------------------------------------------------------------------------------


def run_grid(e: EnergyConfig, seed: int, meter: EnergyMeter, tokenizer, valid: Sequence[Sequence[int]],
             specs: list[ModelSpec], device: torch.device, machine: dict[str, Any],
             progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Rows for every model x path x task x batch size, and the skipped cells with their reasons."""
    from tqdm.auto import tqdm

    dtype = DTYPES[e.dtype] if device.type == "cuda" else torch.float32
    tasks = make_tasks(e.input_tokens, e.max_output_tokens, e.tasks)
    idle = meter.idle_baseline(e.idle_s)
    eos = tokenizer.eos_token_id
    rows: list[dict] = []
    skipped: list[dict] = []
    n_cells = sum(len(("manual-kv",) if s.kind == "metabolic" else e.paths) for s in specs) * len(tasks) * len(e.batch_sizes)
    bar = tqdm(total=n_cells, desc="etokens", unit="cell", disable=not progress)
    for spec in specs:
        try:
            model = load_model(spec, len(tokenizer), eos, device, dtype)
        except AssetError as exc:
            skipped.append({"model": spec.name, "reason": str(exc)})
            bar.update(n_cells // max(1, len(specs)))
            continue
        n_params = count_parameters(model)
        paths = ("manual-kv",) if spec.kind == "metabolic" else e.paths
        reference: dict[tuple[str, int], torch.Tensor] = {}
        for path in paths:
            gen = greedy_generate_fn(model, spec, path, eos)
            for task in tasks:
                for batch_size in e.batch_sizes:
                    prompts = pick_prompts(valid, batch_size, task.input_tokens, seed)
                    cell = {"model": spec.name, "model_kind": spec.kind, "n_params": n_params, "budget": spec.budget,
                            "path": path, "compiled": path == "static-compile" and device.type == "cuda",
                            "dtype": str(dtype).replace("torch.", ""), "task": task.name, "ratio": task.ratio,
                            "input_tokens": task.input_tokens, "output_tokens": task.output_tokens,
                            "batch_size": batch_size, "min_window_s": e.min_window_s}
                    try:
                        cell_rows, outputs = measure_cell(meter, gen, tokenizer, prompts, task, device,
                                                          e.min_window_s, e.repeats, idle)
                    except (RuntimeError, TypeError) as exc:  # e.g. a path this model/device cannot run
                        skipped.append({**cell, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                        bar.update(1)
                        continue
                    key = (task.name, batch_size)
                    same = bool(torch.equal(reference[key], outputs)) if key in reference else None
                    reference.setdefault(key, outputs)
                    # a hash of the greedy outputs lets paths measured in separate runs be compared too
                    digest = artefacts.sha256_bytes(outputs.to(torch.int64).numpy().tobytes())
                    for row in cell_rows:
                        rows.append({**machine, **cell, "same_outputs_as_first_path": same, "outputs_sha256": digest, **row})
                    bar.update(1)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    check_rows(rows)
    return rows, skipped


# --- calibration and physical budgets (GPU only) -------------------------------------------------


def run_calibration(e: EnergyConfig, seed: int, meter: EnergyMeter, tokenizer, valid, token_cost, device: torch.device,
                    progress: bool = True) -> dict[str, Any]:
    """Per-request joules vs semantic cost and tokens; then generation within joule budgets, Hit@10%.

    Semantic cost of a request = sum of the synthetic prior's token costs over its input and output
    tokens (the study's "metabolic tokenizer"; a trained MetabolicGPT-2's calibrated cost can replace
    it). Needs a working energy meter: on a machine without one this returns a `skipped` reason.
    """
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    if not meter.available:
        return {"skipped": f"energy unavailable: {meter.reason}"}
    spec = ModelSpec(e.calib_model, "scratch", shape=SCRATCH_SHAPES[e.calib_model])
    dtype = DTYPES[e.dtype] if device.type == "cuda" else torch.float32
    eos = tokenizer.eos_token_id
    model = load_model(spec, len(tokenizer), eos, device, dtype)
    gen = greedy_generate_fn(model, spec, "default", eos)
    sync = _sync_for(device)
    rng = random.Random(seed + 17)
    points = []
    for i in tqdm(range(e.calib_requests), desc="calibration", disable=not progress):
        t_in = rng.randint(4, e.input_tokens)
        t_out = rng.randint(1, e.max_output_tokens)
        prompt = pick_prompts(valid, 1, t_in, seed + i)
        ids = torch.tensor(prompt, device=device)
        fn = lambda: gen(ids, t_out)  # noqa: E731
        out = fn()
        n = calls_for_window(fn, e.min_window_s, sync)
        m = measure_window(meter, fn, n)
        all_ids = out[0].tolist()
        points.append({"input_tokens": t_in, "output_tokens": t_out, "context_tokens": t_in + t_out,
                       "semantic_cost": float(token_cost[all_ids].sum()), "energy_j": m.energy_j / n,
                       "window_s": m.time_s, "n_calls": n, "batch_size": 1})
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
                out = fn()
                n = calls_for_window(fn, e.min_window_s, sync)
                m = measure_window(meter, fn, n)
                measured.append(m.energy_j / n)
                lengths.append(out.shape[1] - e.input_tokens)
            budgets.append({"predictor": predictor, "fraction": frac, "budget_j": budget_j, "measured_j": measured,
                            "output_tokens": lengths, "hit10": hit_fraction(measured, [budget_j] * len(measured), 10),
                            "batch_size": 1, "min_window_s": e.min_window_s})
    return {"model": spec.name, "points": points, "semantic_cost": "synthetic prior (sum over input and output tokens)",
            "fit_tokens": fit_tokens.__dict__, "fit_cost": fit_cost.__dict__, "budgets": budgets,
            "min_window_s": e.min_window_s}


# --- the stage -----------------------------------------------------------------------------------



def calibrations(root: Path) -> list[dict]:
    return [artefacts.read_json(p) for p in sorted(Path(root).glob(f"*/{CALIBRATION}")) if ".partial" not in p.parent.name]


def measured_model_keys(specs: Sequence[ModelSpec]) -> list[tuple[str, str, str | None]]:
    """(name, source, training fingerprint) per model: a retrained MetabolicGPT-2 changes its
    training folder's manifest fingerprint, and so the e-token stage's key."""
    return [(s.name, s.source, (artefacts.read_manifest(Path(s.source).parent) or {}).get("fingerprint")
             if s.kind == "metabolic" else None) for s in specs]


# Bumped when what is measured changes (2: MetabolicGPT-2 decodes through generate(), not a hand loop).
MEASUREMENT_VERSION = 2


def stage_description(settings: dict, seed: int, corpus_fingerprint: str, model_keys: list, machine: dict) -> dict:
    """What the e-token stage's artefact is made from: a change to any of it measures again.

    `model_keys` holds (name, source, training fingerprint) per measured model, so a retrained
    MetabolicGPT-2 (new manifest fingerprint) is measured again instead of reusing stale rows.
    """
    return {"stage": "etokens", "version": MEASUREMENT_VERSION, "energy": settings, "seed": seed, "corpus": corpus_fingerprint,
            "models": [list(k) for k in model_keys],
            "machine": {k: machine[k] for k in ("host", "device", "gpu_name", "driver", "energy_source")}}



def merge_results(root: Path, extra: Sequence[Path] = ()) -> list[dict]:
    """Every `rows.jsonl` under `root` (one folder per machine and setting) plus `extra` files, as one list.

    Result folders copied from other machines (e.g. the H100 and H200 runs) into `root` merge here;
    each row names its machine, so the table can split by GPU.
    """
    files = sorted(Path(root).glob(f"*/{ROWS}")) if Path(root).is_dir() else []
    files += [Path(p) for p in extra]
    rows: list[dict] = []
    for path in files:
        if ".partial" in str(path.parent.name):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{path} line {i + 1} is not JSON: the file is corrupt; re-copy it from its machine") from None
            rows.append({**row, "results_file": f"{path.parent.name}/{path.name}"})
    check_rows(rows)
    return rows


GROUP = ("gpu_name", "host", "model", "path", "task", "batch_size")
SUMMARY_FIELDS = ("total_j", "preprocess_j", "prefill_j", "decode_j", "active_j", "e_in_wh", "e_out_wh",
                  "j_per_output_token", "total_s_per_query", "prefill_s_per_query", "decode_s_per_query",
                  "output_tokens_per_s")


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
    """Median (and inter-quartile range) over repeats per machine x model x path x task x batch size."""
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
        out.append(entry)
    return out
