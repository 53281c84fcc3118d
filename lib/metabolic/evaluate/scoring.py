"""Budget-tracking evaluation (paper V.C, Table I): metrics, achieved costs and the `evaluate` stage.

Metrics are pure functions of arrays (property-tested): MAE, MAPE, Hit@delta and a Table I row.
Which tokens count (shared with training): for a generation, its *generated* tokens (never the
prompt), their CSC measured by re-running the labeller on the full prompt + generation text; for a
training text, all of its tokens. Achieved cost per generation is reported three ways:
- `proxy`: the sum of `C_vocab` over the generated tokens (what steering and stopping spend);
- `calibrated`: `a + b * proxy` through the model's calibration (the CSC the controller aimed at);
- `csc`: the true CSC total from the labeller (the number Table I is about).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from metabolic.core.budget import in_band, length_factor
from metabolic.core.config import GenerationConfig
from metabolic.core.errors import DataError
from metabolic.core.stats import wilson_interval
from metabolic.csc.dataset import sequence_totals
from metabolic.evaluate.budgets import sampled_proxy_rate
from metabolic.generate.budgeted import generate_with_budget, model_token_costs
from metabolic.generate.verified import PrefixLabeller

HIT_DELTAS_PCT = (10, 20, 50)

# Table I of the paper (epoch 13 checkpoint): CSC-space budgets and their metrics, copied verbatim.
PAPER_TABLE1 = {
    "rows": [
        {"Budget": 5.01, "MAE": 1.78, "MAPE": 35.4, "Hit@10": 0.0, "Hit@20": 0.0, "Hit@50": 100.0, "Achieved": 6.2, "Target": 5.01},
        {"Budget": 7.16, "MAE": 0.37, "MAPE": 5.2, "Hit@10": 100.0, "Hit@20": 100.0, "Hit@50": 100.0, "Achieved": 6.79, "Target": 7.16},
        {"Budget": 9.31, "MAE": 2.52, "MAPE": 27.1, "Hit@10": 0.0, "Hit@20": 0.0, "Hit@50": 100.0, "Achieved": 7.4, "Target": 9.31},
    ],
    "average_MAE": 1.556,
}


def _pair(achieved: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(achieved, dtype=np.float64).reshape(-1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if t.size == 1 and a.size != 1:
        t = np.full_like(a, t.item())
    if a.size != t.size:
        raise DataError(f"{a.size} achieved costs for {t.size} targets: give one target per generation (or one for all)")
    if a.size == 0:
        raise DataError("no generations to score: generate at least one sequence per budget")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(t))):
        raise DataError("achieved or target costs contain NaN/inf: drop generations the labeller could not score")
    if np.any(t <= 0):
        raise DataError(f"targets must be > 0 (got min {t.min():.4g}): MAPE and Hit@delta are relative to the target")
    return a, t


def mae(achieved: Any, target: Any) -> float:
    """Mean absolute error between achieved and target totals."""
    a, t = _pair(achieved, target)
    return float(np.mean(np.abs(a - t)))


def mape(achieved: Any, target: Any) -> float:
    """Mean absolute percentage error, in percent of the target."""
    a, t = _pair(achieved, target)
    return float(100.0 * np.mean(np.abs(a - t) / t))


def hit_fraction(achieved: Any, target: Any, delta_pct: float) -> float:
    """The fraction (0..1) of items with |achieved - target| <= delta% of the target (inclusive).

    The Hit@delta rule (`metabolic.core.budget.in_band` with band = delta / 100, the band test the e-token
    stage's joule budgets also use); Table I reports it in percent (`hit_rate`).

    >>> hit_fraction([9.5, 11.5, 10.0, 20.0], [10.0] * 4, 10)
    0.5
    """
    if not (math.isfinite(delta_pct) and delta_pct >= 0):
        raise DataError(f"delta_pct={delta_pct!r} is invalid: use a percentage >= 0")
    a, t = _pair(achieved, target)
    return float(np.mean(in_band(a, t, delta_pct / 100.0)))


def hit_rate(achieved: Any, target: Any, delta_pct: float) -> float:
    """Hit@delta (Table I): percent of generations with |achieved - target| <= delta% of the target (inclusive)."""
    return 100.0 * hit_fraction(achieved, target, delta_pct)


def table_row(achieved: Any, target: Any, budget: float) -> dict[str, Any]:
    """One Table I row: Budget, MAE, MAPE (%), Hit@10/20/50 (%) each with its Wilson 95% interval
    (`Hit@10_ci`, percent), mean Achieved and mean Target, n.

    >>> row = table_row([9.5, 11.5, 10.0, 20.0], 10.0, 10.0)
    >>> row["Hit@10"], [round(x, 1) for x in row["Hit@10_ci"]]
    (50.0, [15.0, 85.0])
    """
    a, t = _pair(achieved, target)
    row: dict[str, Any] = {"Budget": float(budget), "MAE": mae(a, t), "MAPE": mape(a, t)}
    for d in HIT_DELTAS_PCT:
        row[f"Hit@{d}"] = hit_rate(a, t, d)
        hits = int(np.sum(in_band(a, t, d / 100.0)))
        row[f"Hit@{d}_ci"] = [100.0 * v for v in wilson_interval(hits, int(a.size))]
    row.update({"Achieved": float(a.mean()), "Target": float(t.mean()), "n": int(a.size)})
    return row


def distinct_n(token_lists: Iterable[Sequence[int]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over the generations (0 when there is no n-gram)."""
    if n < 1:
        raise DataError(f"distinct-n needs n >= 1 (got {n})")
    grams: Counter = Counter()
    for toks in token_lists:
        toks = list(toks)
        grams.update(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
    total = sum(grams.values())
    return float(len(grams) / total) if total else 0.0


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood); NaN when no token was scored."""
    if n_tokens <= 0:
        return float("nan")
    return float(math.exp(total_nll / n_tokens))


def relative_change(value: float, reference: float) -> float:
    """(value - reference) / reference; NaN when the reference is 0 or not finite."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return float("nan")
    return (value - reference) / reference


# --- achieved costs of generations ------------------------------------------------------------


def csc_of_generations(prefixes: PrefixLabeller, gens, scale: str = "raw",
                       progress: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """True CSC total of each generation: the labeller on prompt + generation ids, generated positions only.

    `prefixes` labels each distinct text once (plain and steered decoding often produce the same
    text). An empty generation spends 0. On the `length` scale each label is multiplied by the full
    text's length T = prompt + generation (`sequence_totals`). NaN when a text is beyond the
    encoder's window. Returns (totals [n], per-token labels of the generated tokens on `scale`).
    """
    generated, _ = prefixes.labels([(g.prompt_ids, g.generated_ids) for g in gens], progress=progress)
    lengths = [len(g.prompt_ids) + len(g.generated_ids) for g in gens]
    totals = sequence_totals(generated, scale, lengths=lengths)
    empty = np.array([len(g.generated_ids) == 0 for g in gens], dtype=bool)
    totals[empty] = 0.0
    per_token = [lab * length_factor(scale, n) for lab, n in zip(generated, lengths)]
    return totals, per_token


class Judge:
    """The fluency judge (a causal LM) scoring generated tokens given their prompt.

    One text at a time, so a text's score never depends on what it is batched with, and each distinct
    (prompt, generation) once: the decodings and the verified rows judge many of the same texts.
    """

    def __init__(self, model) -> None:
        self.model = model
        self._memo: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, int]] = {}

    def _score(self, prompt_ids: tuple[int, ...], generated_ids: tuple[int, ...]) -> tuple[float, int]:
        import torch

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            ids = torch.tensor([list(prompt_ids) + list(generated_ids)], device=device)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            start = len(prompt_ids) - 1
            picked = logp[start:].gather(1, targets[start:, None])[:, 0]
            return float(-picked.sum()), picked.numel()

    def nll(self, gens) -> tuple[np.ndarray, np.ndarray]:
        """Negative log-likelihood (nats) of each generation's tokens given its prompt, and their counts."""
        nll = np.zeros(len(gens))
        count = np.zeros(len(gens), dtype=np.int64)
        for i, g in enumerate(gens):
            if not g.generated_ids:
                continue
            key = (tuple(g.prompt_ids), tuple(g.generated_ids))
            if key not in self._memo:
                self._memo[key] = self._score(*key)
            nll[i], count[i] = self._memo[key]
        return nll, count


def judge_nll(judge, gens) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood (nats) of each generation's tokens given its prompt, under `judge` (a model
    or a `Judge`, whose memo it then shares), and counts."""
    return (judge if isinstance(judge, Judge) else Judge(judge)).nll(gens)


def contextual_proxy(model, gens, budgets_csc: Sequence[float] | None) -> np.ndarray:
    """Sum over generated tokens of the model's in-context proxy cost (cost head + token costs, mean over K)."""
    import torch

    out = np.zeros(len(gens))
    with torch.inference_mode():
        for i, g in enumerate(gens):
            if not g.generated_ids:
                continue
            ids = torch.tensor([list(g.prompt_ids) + list(g.generated_ids)], device=model.device)
            budget = budgets_csc[i] if budgets_csc is not None and math.isfinite(budgets_csc[i]) else model.settings.budget_scale
            costs = model(ids, budget=torch.tensor([float(budget)], device=model.device)).token_costs
            out[i] = float(model.proxy_total(costs)[0, len(g.prompt_ids):].double().sum())
    return out


def fluency(judge, gens) -> dict[str, float]:
    """Fluency proxy of a set of generations: the judge's perplexity (pooled), distinct-1/2, mean length."""
    nll, count = judge_nll(judge, gens)
    toks = [g.generated_ids for g in gens]
    return {
        "judge_ppl": perplexity(float(nll.sum()), int(count.sum())),
        "distinct_1": distinct_n(toks, 1),
        "distinct_2": distinct_n(toks, 2),
        "mean_tokens": float(np.mean([len(t) for t in toks])) if toks else 0.0,
    }


def goal_status(table: dict[str, Any], fluency_tolerance: float = 0.10, hit_goal_pct: float = 90.0) -> dict[str, Any]:
    """The goal on one table: Hit@10 >= 90% per level (true CSC) and fluency kept.

    Fluency is kept when the judge's perplexity is at most `fluency_tolerance` above the unbudgeted
    reference's: one-sided, because a lower perplexity is no loss of fluency (the verified controller
    picks the likeliest in-band candidate, which lowers it); distinct-n is reported beside it.
    """
    hits = {row["level"]: row["csc"]["Hit@10"] for row in table["rows"]}
    change = table["fluency"]["judge_ppl_rel_change"]
    hit_ok = all(h >= hit_goal_pct for h in hits.values())
    fluency_ok = bool(math.isfinite(change) and change <= fluency_tolerance)
    return {"hit10_per_level": hits, "hit_ok": hit_ok, "judge_ppl_rel_change": change, "fluency_ok": fluency_ok,
            "met": hit_ok and fluency_ok}


# --- the `evaluate` stage -----------------------------------------------------------------------

# Bumped when what the stage computes changes, so an artefact from older code is rebuilt.
EVALUATION_VERSION = 7  # 3: verified-controller rows and the cost-model fit; 4: one-sided fluency goal; 5: ceilings, steered verified rows; 6: budget forcing, baselines, stop rules on real text, intervals; 7: token caps from the generator's own proxy rate
# plain: the budget pathway (the paper) + budget forcing and the budget stop; steered: + the steering processor
DECODINGS = ("plain", "steered")
BUDGET_STOPS = ("budget", "sentence")  # stop reasons that mean the budget, not EOS or the cap, ended the text
TABLES_FILE = "tables.json"
GENERATIONS_FILE = "generations.jsonl"


def select_prompts(g: GenerationConfig, tokenizer, valid_ids: Sequence[Sequence[int]]) -> list[str]:
    """Prompts: the first `prompt_tokens` tokens of `n_valid_prompts` seeded validation texts, then the paper's."""
    import random

    usable = [i for i, ids in enumerate(valid_ids) if len(ids) > g.prompt_tokens]
    chosen = sorted(random.Random(g.seed).sample(usable, min(g.n_valid_prompts, len(usable))))
    prompts = [tokenizer.decode(list(valid_ids[i][: g.prompt_tokens])).strip() for i in chosen]
    prompts = [p for p in prompts if p] + [p for p in g.prompts if p.strip()]
    if not prompts:
        raise DataError("no evaluation prompt: raise generation.n_valid_prompts or give generation.prompts")
    return prompts


def _record(g, variant: str, decoding: str, level: str, **extra) -> dict[str, Any]:
    return {"variant": variant, "decoding": decoding, "level": level, "prompt": g.prompt, "text": g.text,
            "generated_ids": g.generated_ids, "budget_requested_csc": g.budget_requested_csc, "budget_csc": g.budget_csc,
            "budget_proxy": g.budget_proxy, "spent_proxy": g.spent_proxy, "stopped_by": g.stopped_by,
            "lambdas": [round(x, 4) for x in g.lambdas], **extra}


def evaluate_variant(model, tokenizer, judge, prefixes: PrefixLabeller, prompts: list[str], budgets: dict[str, float],
                     g: GenerationConfig, scale: str, budget_range: tuple[float, float], variant: str, calibration,
                     calibration_note: str, progress: bool = False) -> tuple[dict, list[dict]]:
    """Generate at every budget level with each decoding, measure achieved costs and fluency; tables + records.

    Both decodings hold EOS back until the band's lower edge and stop on the budget, under a token cap
    sized from the budget at the proxy rate of the model's own unbudgeted samples of the same prompts
    (`sampled_proxy_rate`, `generate_with_budget`); only `steered` also steers.
    """
    costs = model_token_costs(model)
    cal = calibration
    common = dict(temperature=g.temperature, top_k=g.top_k, seed=g.seed,
                  do_sample=True, budget_range=budget_range, calibration=cal, lambda_max=g.lambda_max)
    reference = generate_with_budget(model, tokenizer, prompts, math.inf, steer=False, stop=False, force=False,
                                     max_new_tokens=g.max_new_tokens, **common)
    ref_fluency = fluency(judge, reference)
    proxy_rate = sampled_proxy_rate(reference)
    records = [_record(r, variant, "unbudgeted", "none", token_costs=costs[r.generated_ids].tolist()) for r in reference]
    tables: dict[str, Any] = {}
    for decoding in DECODINGS:
        rows, all_gens = [], []
        for level, budget in budgets.items():
            steered = decoding == "steered"
            gens = generate_with_budget(model, tokenizer, prompts, budget, steer=steered, stop=True, force=True,
                                        band=g.verified_band, max_new_tokens=None, proxy_rate=proxy_rate, **common)
            csc_tot, csc_tok = csc_of_generations(prefixes, gens, scale)
            proxy = np.array([x.spent_proxy for x in gens])
            calibrated = np.array([cal.to_csc(p) for p in proxy])
            context = contextual_proxy(model, gens, [x.budget_csc for x in gens])
            target_csc = np.array([x.budget_csc for x in gens])
            target_proxy = np.array([x.budget_proxy for x in gens])
            ok = np.isfinite(csc_tot)
            rows.append({
                "level": level, "budget_csc": float(budget), "budget_proxy": float(target_proxy.mean()),
                "csc": table_row(csc_tot[ok], target_csc[ok], float(budget)),
                "proxy": table_row(proxy, target_proxy, float(target_proxy.mean())),
                "calibrated": table_row(calibrated, target_csc, float(budget)),
                "contextual_proxy_mean": float(context.mean()),
                "mean_tokens": float(np.mean([len(x.generated_ids) for x in gens])),
                "tokens_needed": float(gens[0].tokens_needed), "max_new_tokens": int(gens[0].max_new_tokens),
                "reachable": bool(all(x.reachable for x in gens)),
                "stopped_by": dict(Counter(x.stopped_by for x in gens)),
                "stopped_on_budget_pct": 100.0 * float(np.mean([x.stopped_by in BUDGET_STOPS for x in gens])),
                "unscored": int((~ok).sum()),
            })
            for x, c, cc, ctx, lab in zip(gens, csc_tot, calibrated, context, csc_tok):
                records.append(_record(x, variant, decoding, level, csc=float(c), calibrated_csc=float(cc),
                                       contextual_proxy=float(ctx), token_costs=costs[x.generated_ids].tolist(),
                                       token_csc=[float(v) for v in lab]))
            all_gens.extend(gens)
        flu = fluency(judge, all_gens)
        # distinct-n per budget level, averaged: pooling the levels would count the same prompt's
        # (often similar) continuations at three budgets as repetition.
        n_levels = len(budgets)
        per_level = [all_gens[i * len(prompts):(i + 1) * len(prompts)] for i in range(n_levels)]
        for n in (1, 2):
            flu[f"distinct_{n}"] = float(np.mean([distinct_n([x.generated_ids for x in lv], n) for lv in per_level]))
        table = {
            "variant": variant, "decoding": decoding, "csc_scale": scale, "n_prompts": len(prompts),
            "rows": rows,
            "average_MAE_csc": float(np.mean([r["csc"]["MAE"] for r in rows])),
            "average_MAE_proxy": float(np.mean([r["proxy"]["MAE"] for r in rows])),
            "fluency": {"budgeted": flu, "unbudgeted": ref_fluency,
                        "judge_ppl_rel_change": relative_change(flu["judge_ppl"], ref_fluency["judge_ppl"])},
            "calibration": {"a": cal.a, "b": cal.b, "how": calibration_note,
                            "model_a": model.proxy_calibration().a, "model_b": model.proxy_calibration().b},
            "proxy_rate": {"per_token": proxy_rate, "tokens": sum(len(r.generated_ids) for r in reference),
                           "how": f"the model's unbudgeted samples of the same prompts (<= {g.max_new_tokens} tokens)"},
        }
        table["goal"] = goal_status(table)
        tables[f"{variant}_{decoding}"] = table
    return tables, records
