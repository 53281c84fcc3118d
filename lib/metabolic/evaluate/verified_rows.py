"""Table I rows for the verified budget controller (`metabolic.generate.verified`), N x scale.

One pool of candidates is sampled per prompt (`max(candidate_counts)` samples, the budget pathway
off), so every row shares it: verified@N uses each prompt's first N samples, every level and both
CSC scales reuse the same labelled prefixes (one `PrefixLabeller`). Per row and level: Table I's
metrics in true CSC, the outcome of each prompt (in band, closest, unreachable), mean tokens, and
the labels each generation needs (encoder texts of its probes, as if it ran alone: the rows share a
memo, so what they actually label depends on their order) and the seconds that takes at the
labelling rate measured over the whole evaluation, plus its share of sampling. Fluency is judged against unbudgeted text of the same
length: each prompt's first sample cut to the length of the text the controller returned.

Steered rows (`SteeredRows`, `verified_steered_n<N>_<scale>`): the same controller on candidates
sampled under `CostSteeringLogitsProcessor` towards each level's budget through the learned costs
(one pool per scale and level), so the tables show whether a cost model that tracks CSC lets fewer
candidates or fewer labels reach the same Hit@10.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from metabolic.evaluate.scoring import distinct_n, goal_status, judge_nll, perplexity, relative_change, table_row
from metabolic.core.budget import ProxyCalibration, in_band
from metabolic.generate.verified import Candidate, PrefixLabeller, VerifiedGeneration, sample_candidates, steering, verify


def _fluency(judge, gens: Sequence[VerifiedGeneration], reference_ids: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Judge perplexity of the returned texts and of unbudgeted samples cut to the same lengths."""
    from types import SimpleNamespace

    same_length = [SimpleNamespace(prompt_ids=g.prompt_ids, generated_ids=list(ref[:len(g.generated_ids)]))
                   for g, ref in zip(gens, reference_ids)]
    nll, n = judge_nll(judge, gens)
    ref_nll, ref_n = judge_nll(judge, same_length)
    ppl, ref_ppl = perplexity(float(nll.sum()), int(n.sum())), perplexity(float(ref_nll.sum()), int(ref_n.sum()))
    return {"judge_ppl": ppl, "judge_ppl_same_length_unbudgeted": ref_ppl, "judge_ppl_rel_change": relative_change(ppl, ref_ppl)}


@dataclass(frozen=True)
class SteeredRows:
    """What the steered rows need: the counts N, the learned costs C_vocab [V] and one budget -> proxy
    calibration per CSC scale (scales without one get no steered rows), and the steering bound."""

    candidate_counts: Sequence[int]
    token_costs: Any
    calibrations: dict[str, ProxyCalibration]
    lambda_max: float = 5.0


def _row(level: str, budget: float, gens: Sequence[VerifiedGeneration]) -> dict[str, Any]:
    achieved = np.array([g.achieved_csc for g in gens])
    ok = np.isfinite(achieved)
    return {
        "level": level, "budget_csc": float(budget),
        "csc": table_row(achieved[ok], budget, float(budget)),
        "mean_tokens": float(np.mean([len(g.generated_ids) for g in gens])),
        "status": dict(Counter(g.status for g in gens)),
        "stop_kind": dict(Counter(g.stop_kind for g in gens)),
        "labels_per_generation": float(np.mean([g.labels_needed for g in gens])),
        "unscored": int((~ok).sum()),
    }


def _records(decoding: str, level: str, gens: Sequence[VerifiedGeneration], variant: str = "verified") -> list[dict]:
    return [{"variant": variant, "decoding": decoding, "level": level, "prompt": g.prompt, "text": g.text,
             "generated_ids": g.generated_ids, "budget_csc": g.budget_csc, "csc": g.achieved_csc, "status": g.status,
             "candidate": g.candidate, "stop_kind": g.stop_kind, "labels": g.labels_needed} for g in gens]


def _table(judge, decoding: str, scale: str, n: int, per_level: dict[str, list[VerifiedGeneration]],
           budgets: dict[str, float], reference: list[list[int]], n_prompts: int, band: float, max_new_tokens: int,
           sampling_s: float) -> dict[str, Any]:
    rows = [_row(level, budgets[level], gens) for level, gens in per_level.items()]
    all_gens = [g for gens in per_level.values() for g in gens]
    flu = _fluency(judge, all_gens, [reference[p] for _ in per_level for p in range(n_prompts)])
    for k in (1, 2):
        flu[f"distinct_{k}"] = float(np.mean([distinct_n([g.generated_ids for g in lv], k) for lv in per_level.values()]))
    table = {"variant": "verified", "decoding": decoding, "csc_scale": scale, "n_candidates": n,
             "n_prompts": n_prompts, "band": band, "max_new_tokens": max_new_tokens, "rows": rows,
             "average_MAE_csc": float(np.mean([r["csc"]["MAE"] for r in rows])),
             "labels_per_generation": float(np.mean([r["labels_per_generation"] for r in rows])),
             "sampling_seconds_per_generation": sampling_s, "fluency": flu}
    table["goal"] = goal_status(table)
    return table


BASELINE_RULES = ("token_count", "random_cut")  # stop rules without labels, on the controller's own candidates


def nearest_stop(stops: np.ndarray, n: float) -> int:
    """The allowed stop point nearest `n` tokens (the shorter one on a tie).

    >>> nearest_stop(np.array([2, 5, 9]), 7.0)
    5
    """
    return int(stops[np.argmin(np.abs(stops - n))])


def baseline_cut(rule: str, candidate: Candidate, budget: float, rate: float, rng: np.random.Generator) -> int:
    """Where a stop rule without labels cuts `candidate`: `token_count` at the stop point nearest
    `budget / rate` tokens (rate = true CSC per token of training continuations), `random_cut` at a
    uniformly random stop point."""
    if rule == "token_count":
        return nearest_stop(candidate.stops, budget / rate)
    if rule == "random_cut":
        return int(rng.choice(candidate.stops))
    raise ValueError(f"rule={rule!r} is unknown: choose one of {', '.join(BASELINE_RULES)}")


def baseline_generations(rule: str, pool: Sequence[Candidate], prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str],
                         tokenizer, budget: float, prefixes: PrefixLabeller, scale: str, rate: float, band: float,
                         seed: int) -> list[VerifiedGeneration]:
    """Baseline `rule` on each prompt's first candidate (the verified rows' pool, same seed), scored in true
    CSC; it labels nothing at decode time (`labels_needed` 0: the labels here only score it)."""
    rng = np.random.default_rng([seed, int(round(budget * 1e6)), BASELINE_RULES.index(rule)])
    first = {c.prompt_index: c for c in pool if c.index == 0}
    cuts = [baseline_cut(rule, first[p], budget, rate, rng) if first[p].stops.size else 0 for p in range(len(prompts))]
    totals, _ = prefixes.totals([(prompt_ids[p], first[p].ids[:k]) for p, k in enumerate(cuts)], scale)
    out = []
    for p, (k, total) in enumerate(zip(cuts, totals)):
        c = first[p]
        status = "in band" if in_band(total, budget, band) else ("below band" if total < budget else "above band")
        out.append(VerifiedGeneration(
            prompt=prompts[p], prompt_ids=list(prompt_ids[p]), generated_ids=c.ids[:k], text=tokenizer.decode(c.ids[:k]),
            budget_csc=float(budget), achieved_csc=float(total), scale=scale, in_band=status == "in band", status=status,
            candidate=0, n_candidates=1, stop_kind="sentence" if k in c.sentence_stops else ("end" if k == len(c.ids) else "word"),
            mean_logprob=c.mean_logprob, probes=0, labels=0, labels_needed=0, seconds=0.0))
    return out


def verified_tables(model, tokenizer, judge, prefixes: PrefixLabeller, prompts: list[str], budgets_by_scale: dict[str, dict[str, float]],
                    rate_hints: dict[str, float], candidate_counts: Sequence[int], *, max_new_tokens: int, band: float,
                    max_probes: int, temperature: float, top_k: int, seed: int,
                    steered: SteeredRows | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Tables keyed `verified_n<N>_<scale>` (and `verified_steered_n<N>_<scale>` with `steered`) and
    the records of the largest N of each kind (see the module docstring).

    Steered rows sample, per scale and level, one pool of `max(steered.candidate_counts)` candidates
    steered towards that level's budget through the learned costs (`metabolic.generate.verified.steering`),
    with the same seed, and verify its first N; their fluency reference is the unsteered first sample.
    """
    n_max = max(candidate_counts)
    t0 = time.perf_counter()
    prompt_ids, pool = sample_candidates(model, tokenizer, prompts, n_max, max_new_tokens, temperature=temperature,
                                         top_k=top_k, seed=seed)
    sampling_s = (time.perf_counter() - t0) / len(prompts)
    first_sample = {c.prompt_index: c.ids for c in pool if c.index == 0}
    reference = [first_sample[p] for p in range(len(prompts))]
    common = dict(band=band, max_probes=max_probes)
    tables: dict[str, Any] = {}
    records: list[dict] = []
    for scale, budgets in budgets_by_scale.items():
        for n in sorted(candidate_counts):
            per_level = {level: verify(pool, prompt_ids, prompts, tokenizer, budget, prefixes, n_candidates=n, scale=scale,
                                       rate_hint=rate_hints[scale], **common) for level, budget in budgets.items()}
            tables[f"verified_n{n}_{scale}"] = _table(judge, f"verified_n{n}", scale, n, per_level, budgets, reference,
                                                      len(prompts), band, max_new_tokens, sampling_s * n / n_max)
            if n == n_max:
                records.extend(r for level, gens in per_level.items() for r in _records(f"verified_n{n}_{scale}", level, gens))
        for rule in BASELINE_RULES:  # the same pool's first sample, cut without labels
            per_level = {level: baseline_generations(rule, pool, prompt_ids, prompts, tokenizer, budget, prefixes, scale,
                                                     rate_hints[scale], band, seed) for level, budget in budgets.items()}
            key = f"baseline_{rule}_{scale}"
            table = _table(judge, rule, scale, 1, per_level, budgets, reference, len(prompts), band, max_new_tokens,
                           sampling_s / n_max)
            tables[key] = {**table, "variant": "baseline", "rate_csc_per_token": rate_hints[scale]}
            records.extend(r for level, gens in per_level.items() for r in _records(key, level, gens, "baseline"))
        if steered is None or scale not in steered.calibrations:
            continue
        s_max = max(steered.candidate_counts)
        pools, steer_s = {}, 0.0
        for level, budget in budgets.items():
            t0 = time.perf_counter()
            processors = steering(model, prompt_ids, np.full(len(prompts), budget), s_max, max_new_tokens,
                                  token_costs=steered.token_costs, calibration=steered.calibrations[scale],
                                  lambda_max=steered.lambda_max)
            pools[level] = sample_candidates(model, tokenizer, prompts, s_max, max_new_tokens, temperature=temperature,
                                             top_k=top_k, seed=seed, logits_processor=processors)[1]
            steer_s += (time.perf_counter() - t0) / len(prompts)
        for n in sorted(steered.candidate_counts):
            per_level = {level: verify(pools[level], prompt_ids, prompts, tokenizer, budget, prefixes, n_candidates=n,
                                       scale=scale, rate_hint=rate_hints[scale], **common) for level, budget in budgets.items()}
            key = f"verified_steered_n{n}_{scale}"
            table = _table(judge, "verified_steered", scale, n, per_level, budgets, reference, len(prompts), band,
                           max_new_tokens, steer_s / len(budgets) * n / s_max)
            table["calibration"] = {"a": steered.calibrations[scale].a, "b": steered.calibrations[scale].b}
            tables[key] = table
            if n == s_max:
                records.extend(r for level, gens in per_level.items() for r in _records(key, level, gens))
    # texts/s over everything this memo labelled (NaN if it labelled nothing: every text came from the memo)
    rate = prefixes.texts / prefixes.seconds if prefixes.seconds > 0 else math.nan
    for table in tables.values():
        for row in table["rows"]:
            row["seconds_per_generation"] = table["sampling_seconds_per_generation"] + row["labels_per_generation"] / rate
        table["seconds_per_generation"] = float(np.mean([r["seconds_per_generation"] for r in table["rows"]]))
        table["labelling_rate_texts_per_s"] = rate
    return tables, records
