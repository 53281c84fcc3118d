"""Stop rules judged on language: fixed WikiText-2 continuations, each rule only picks where to stop.

On a generation, a budget row's Hit@10 mixes two things: how well the rule stops, and what the
generator wrote. Here the text is fixed (a held-out text's continuation after its first
`prompt_tokens` tokens), every allowed stop point of it (word ends, `metabolic.generate.verified.stop_points`)
is labelled exactly on prompt + prefix, and each rule's stop is scored in true CSC:

- `exact`: the labelled stop nearest the budget (what the verified controller does on one candidate);
- `proxy`: the first stop where the calibrated learned spend (C_vocab) meets the budget, by the
  budget stop's own rule (`metabolic.generate.processors.stop_rule`);
- `token_count`: the stop nearest `budget / rate` tokens (rate = true CSC per token of training continuations);
- `random_cut`: a uniformly random stop (seeded);
- `length_fitted`: the one length per budget with the best Hit@10 on labelled *training* continuations,
  applied to the held-out ones: the open-loop ceiling, fitted where a rule may be fitted;
- `length_oracle`: the best one length chosen on the held-out texts themselves, an upper bound for
  any rule that sees only the length.

A continuation that ends before a rule fires stops at its end, as a generation would at its cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from metabolic.core.budget import ProxyCalibration, in_band
from metabolic.core.stats import wilson_interval
from metabolic.generate.budgeted import sentence_end_mask
from metabolic.generate.processors import stop_rule
from metabolic.generate.verified import PrefixLabeller, stop_points

RULES = ("exact", "proxy", "token_count", "random_cut", "length_fitted", "length_oracle")


@dataclass(frozen=True)
class LabelledContinuation:
    """One fixed continuation: its ids, allowed stop points k and the true CSC total of each prefix (raw)."""

    prompt_ids: list[int]
    ids: list[int]
    stops: np.ndarray  # allowed stop points k (tokens kept), ascending
    raw_totals: np.ndarray  # true CSC of the first k tokens, raw scale, one per stop point

    def totals(self, scale: str) -> np.ndarray:
        """Prefix totals on `scale` (length-aware: times the text's length prompt + k)."""
        if scale == "length":
            return self.raw_totals * (len(self.prompt_ids) + self.stops)
        return self.raw_totals


def label_continuations(ids_list: Sequence[Sequence[int]], tokenizer, prefixes: PrefixLabeller, prompt_tokens: int,
                        max_tokens: int, n_texts: int) -> list[LabelledContinuation]:
    """The first `n_texts` texts longer than `prompt_tokens`, their continuation cut to `max_tokens`, with every
    allowed stop labelled (one batched labeller call; `prefixes` memoises)."""
    chosen = [list(ids) for ids in ids_list if len(ids) > prompt_tokens][:n_texts]
    items, requests = [], []
    for ids in chosen:
        prompt, cont = ids[:prompt_tokens], ids[prompt_tokens:prompt_tokens + max_tokens]
        stops, _ = stop_points(tokenizer, cont)
        items.append((prompt, cont, stops))
        requests.extend((prompt, cont[:k]) for k in stops)
    totals, _ = prefixes.totals(requests, "raw")
    out, at = [], 0
    for prompt, cont, stops in items:
        out.append(LabelledContinuation(prompt, cont, stops, np.asarray(totals[at:at + stops.size], dtype=np.float64)))
        at += stops.size
    return out


def _at_length(text: LabelledContinuation, n: float) -> int:
    """Index of the stop point nearest `n` tokens."""
    return int(np.argmin(np.abs(text.stops - n)))


def _proxy_stop(text: LabelledContinuation, costs: np.ndarray, budget_proxy: float, sentence_end: np.ndarray,
                slack: float) -> int:
    """Index of the first stop point where the budget stop fires on the learned spend; the last if none."""
    ids = np.asarray(text.ids, dtype=np.int64)
    last = text.stops - 1  # the last kept token of each stop point
    spent = torch.from_numpy(np.cumsum(costs[ids])[last])
    fired = stop_rule(spent, torch.from_numpy(text.stops), torch.tensor(budget_proxy, dtype=torch.float64),
                      torch.from_numpy(sentence_end[ids[last]]), slack).numpy()  # every stop point at once
    return int(np.argmax(fired)) if fired.any() else text.stops.size - 1


def _length_hits(texts: Sequence[LabelledContinuation], budget: float, scale: str, band: float, n: int) -> float:
    return float(np.mean([in_band(t.totals(scale)[_at_length(t, n)], budget, band) for t in texts]))


def best_length(texts: Sequence[LabelledContinuation], budget: float, scale: str, band: float, max_tokens: int) -> int:
    """The one stop length (1..max_tokens) with the most continuations in band (the shortest on a tie)."""
    hits = [_length_hits(texts, budget, scale, band, n) for n in range(1, max_tokens + 1)]
    return 1 + int(np.argmax(hits))


def _summary(texts: Sequence[LabelledContinuation], picks: Sequence[int], budget: float, scale: str, band: float) -> dict[str, Any]:
    achieved = np.array([t.totals(scale)[i] for t, i in zip(texts, picks)])
    hits = int(np.sum(in_band(achieved, budget, band)))
    return {"Hit@10": 100.0 * hits / len(texts), "Hit@10_ci": [100.0 * v for v in wilson_interval(hits, len(texts))],
            "mean_tokens": float(np.mean([t.stops[i] for t, i in zip(texts, picks)])),
            "mean_csc": float(achieved.mean()), "n": len(texts)}


def judge_stop_rules(train: Sequence[LabelledContinuation], held_out: Sequence[LabelledContinuation],
                     budgets: dict[str, float], scale: str, rate: float, token_costs: np.ndarray,
                     calibration: ProxyCalibration | None, tokenizer, band: float, max_tokens: int, seed: int = 0,
                     sentence_slack: float = 0.1) -> dict[str, Any]:
    """Hit@10 (with Wilson 95% intervals), mean tokens and mean CSC of every rule (`RULES`) per budget level
    on the held-out continuations; `proxy` is left out without a calibration. Also the fitted and oracle lengths."""
    costs = np.asarray(token_costs, dtype=np.float64)
    sentence_end = sentence_end_mask(tokenizer, costs.size).numpy()
    out: dict[str, Any] = {"rules": {}, "length_fitted": {}, "length_oracle": {}, "scale": scale,
                           "n_train": len(train), "n_held_out": len(held_out)}
    for level_index, (level, budget) in enumerate(budgets.items()):
        rng = np.random.default_rng([seed, level_index])
        fitted = best_length(train, budget, scale, band, max_tokens)
        oracle = best_length(held_out, budget, scale, band, max_tokens)
        out["length_fitted"][level], out["length_oracle"][level] = fitted, oracle
        picks = {
            "exact": [int(np.argmin(np.abs(t.totals(scale) - budget))) for t in held_out],
            "token_count": [_at_length(t, budget / rate) for t in held_out],
            "random_cut": [int(rng.integers(0, t.stops.size)) for t in held_out],
            "length_fitted": [_at_length(t, fitted) for t in held_out],
            "length_oracle": [_at_length(t, oracle) for t in held_out],
        }
        if calibration is not None:
            budget_proxy = float(calibration.proxy_budgets([budget])[0])
            picks["proxy"] = [_proxy_stop(t, costs, budget_proxy, sentence_end, sentence_slack) for t in held_out]
        for rule in RULES:
            if rule in picks:
                out["rules"].setdefault(rule, {})[level] = _summary(held_out, picks[rule], budget, scale, band)
    return out
