"""The verified budget controller: the exact CSC labeller in the decoding loop (issue 12).

A learned proxy cannot tell where a continuation's true CSC meets a budget: at a fixed length the
true CSC of a continuation varies far more than a ±10% band is wide (DESIGN.md). So the controller
checks the truth. For each prompt it samples `n_candidates` continuations, finds on each the stop
point whose true CSC (labelled exactly, on prompt + prefix) is nearest the budget, and keeps the
best candidate:

1. **Candidates.** `n_candidates` samples per prompt from the model's own distribution (optionally
   steered by the learned costs towards the budget), with EOS held back so that the budget, not an
   early end, decides how long a text may grow; up to `max_new_tokens` tokens each.
2. **Stop points.** A candidate may stop after token k only at a word end (the next token starts a
   new word or is punctuation) or at its last token; sentence ends are preferred among equals.
3. **Search, labelling only where a stop is plausible.** Prefix CSC is roughly, not strictly,
   increasing in k. Each round labels one prefix per searching candidate, all candidates of all
   prompts in one batched labeller call: the first probe at `budget / rate_hint` tokens, then a
   secant step inside the first bracket [f(k_lo) < B <= f(k_hi)], or a proportional step outwards
   while no bracket exists. A candidate stops searching when a probe lands in the band, its
   bracket has no unlabelled stop point left, it cannot move further out, or after `max_probes`.
   Prefix totals are memoised by ids, so nothing is labelled twice (across rounds, candidates and
   calls that share the memo, e.g. the budget levels of one evaluation).
4. **Choice.** Band membership first, then likelihood (the candidate's mean token log-probability
   under the sampling distribution). Candidates are searched in likelihood order, in waves of 1, 1,
   2, 4, ...: a wave starts only when the earlier ones found nothing in the band, so the choice is
   the same as searching all of them, at a fraction of the labels.
5. **Honest outcome.** Every result says whether it is in the band; when no candidate can reach
   the budget (all too cheap at their full length, or all too dear at their first stop point) the
   status says `unreachable`, never silently returning a far-off text as if it were a hit.

Totals are on the labeller's raw scale (`scale="raw"`: sum of CSC_t over the generated tokens) or
the length-aware scale (`scale="length"`: that sum times T = prompt + prefix tokens), the same
counting rule as Table I (`metabolic.evaluate.scoring.csc_of_generations`); the scale and the band
test are `metabolic.core.budget`'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
from transformers import LogitsProcessorList

from metabolic.core.budget import ProxyCalibration, above_band, below_band, check_scale, in_band, length_factor
from metabolic.core.errors import ConfigError
from metabolic.generate.budgeted import (
    SENTENCE_END_CHARS,
    check_context,
    check_sampling,
    encode_prompts,
    is_metabolic,
    model_token_costs,
    prepare_generate,
)
from metabolic.generate.processors import CostSteeringLogitsProcessor

# Rows (prompts x candidates) per generate() call when sampling candidates: generate keeps every step's
# scores, [rows, V] floats each (the cpu profile's 192 x 8 rows x 50,257 x 40 steps asked for 12 GB).
MAX_SAMPLING_ROWS = 128
STATUSES = ("in band", "closest below", "closest above", "unreachable below", "unreachable above")


@dataclass
class Candidate:
    """One sampled continuation and what the search learnt about it."""

    prompt_index: int
    index: int  # sampling order within its prompt
    ids: list[int]
    mean_logprob: float
    stops: np.ndarray  # allowed stop points k (tokens kept), ascending
    sentence_stops: frozenset[int]
    labelled: dict[int, float] = field(default_factory=dict)  # k -> prefix CSC total
    searching: bool = True


@dataclass
class VerifiedGeneration:
    """The controller's answer for one prompt: the chosen stop of the chosen candidate, verified."""

    prompt: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    budget_csc: float
    achieved_csc: float  # true CSC of the kept tokens (the labeller's number, on `scale`)
    scale: str
    in_band: bool
    status: str  # one of STATUSES
    candidate: int  # which sample was kept (sampling order)
    n_candidates: int
    stop_kind: str  # "sentence", "word" or "end"
    mean_logprob: float
    probes: int  # prefixes labelled for this prompt (all candidates)
    labels: int  # encoder texts labelled for this prompt in this call (memo hits cost nothing)
    labels_needed: int  # encoder texts its probes need without a memo (the cost of running it alone)
    seconds: float  # wall time of the call (sampling + labelling) divided by its prompts


class PrefixLabeller:
    """Exact CSC labels of the generated tokens of (prompt, continuation) pairs, batched and memoised.

    `labels(requests)` labels, in one `CSCLabeller.label_generated` call, every request not seen before: the
    generated positions of prompt + continuation (the prompt's tokens are context, never counted).
    `totals(requests, scale)` sums them on either scale. One instance shared by several calls (budget
    levels, candidate counts, scales, decodings that produce the same text) labels each text once.
    """

    def __init__(self, labeller) -> None:
        self.labeller = labeller
        self.memo: dict[tuple[tuple[int, ...], int], np.ndarray] = {}  # (full ids, prompt length) -> labels
        self.texts = 0  # encoder texts labelled (full texts + counterfactuals), for the cost report
        self.seconds = 0.0  # wall time spent in the labeller: texts / seconds is the labelling rate of this run

    def labels(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
               progress: bool = False) -> tuple[list[np.ndarray], list[int]]:
        """(float32 CSC of each generated token, encoder texts this call spent on it) per request."""
        keys = [(tuple(p) + tuple(g), len(p)) for p, g in requests]
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        cost = dict.fromkeys(todo, 0)
        if todo:
            t0 = time.perf_counter()
            labels = self.labeller.label_generated([full[:n] for full, n in todo], [full[n:] for full, n in todo],
                                                   progress=progress)
            self.seconds += time.perf_counter() - t0
            for key, lab in zip(todo, labels):
                self.memo[key] = lab
                cost[key] = lab.size + 1  # the full text and one counterfactual per counted token
                self.texts += cost[key]
        spent = [cost.pop(k, 0) for k in keys]  # charged to the first request of a key
        return [self.memo[k].copy() for k in keys], spent

    def totals(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
               scale: str = "raw") -> tuple[list[float], list[int]]:
        """(total on `scale`, encoder texts this call spent on it) per request; a memo hit costs 0.

        NaN when a token could not be labelled (a text beyond the encoder's window)."""
        check_scale(scale)
        labels, spent = self.labels(requests)
        totals = []
        for (p, g), lab in zip(requests, labels):
            values = lab.astype(np.float64)
            total = float(values.sum()) if np.all(np.isfinite(values)) else math.nan
            totals.append(total * length_factor(scale, len(p) + len(g)))
        return totals, spent


def stop_points(tokenizer, ids: Sequence[int]) -> tuple[np.ndarray, frozenset[int]]:
    """Allowed stop points k (1..len) of a continuation, and those that end a sentence.

    k is allowed when the next token starts a new word (leading space or newline) or is not a word
    piece at all (punctuation), or when k is the whole continuation.
    """
    ids = list(ids)
    if not ids:
        return np.zeros(0, dtype=np.int64), frozenset()
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = [tokenizer.convert_tokens_to_string([p]) for p in pieces]
    stops, sentence = [], set()
    for k in range(1, len(ids) + 1):
        nxt = texts[k] if k < len(ids) else ""
        if k == len(ids) or not nxt or not nxt[0].isalnum():
            stops.append(k)
            if texts[k - 1].rstrip().endswith(SENTENCE_END_CHARS):
                sentence.add(k)
    return np.asarray(stops, dtype=np.int64), frozenset(sentence)


def next_probe(c: Candidate, budget: float, band: float, rate_hint: float | None) -> int | None:
    """The next prefix length to label for candidate `c`, or None when its search is over (pure)."""
    stops = c.stops
    if stops.size == 0:
        return None
    points = sorted((k, f) for k, f in c.labelled.items() if math.isfinite(f))
    if any(in_band(f, budget, band) for _, f in points):
        return None
    unlabelled = np.array([k for k in stops if k not in c.labelled], dtype=np.int64)
    if unlabelled.size == 0:
        return None
    if not points:
        guess = budget / rate_hint if rate_hint and rate_hint > 0 else stops[-1] / 2
        return int(unlabelled[np.argmin(np.abs(unlabelled - guess))])
    for (k0, f0), (k1, f1) in zip(points, points[1:]):  # the first bracket, if any
        if f0 < budget <= f1:
            inside = unlabelled[(unlabelled > k0) & (unlabelled < k1)]
            if inside.size == 0:
                return None
            guess = k0 + (budget - f0) * (k1 - k0) / max(f1 - f0, 1e-12)
            return int(inside[np.argmin(np.abs(inside - guess))])
    if all(f < budget for _, f in points):  # still too cheap: grow, proportionally to the way there
        k, f = points[-1]
        further = unlabelled[unlabelled > k]
        if further.size == 0:
            return None
        guess = k * budget / f if f > 0 else 2 * k
        return int(further[np.argmin(np.abs(further - max(guess, k + 1)))])
    k, f = points[0]  # too dear already: shrink
    nearer = unlabelled[unlabelled < k]
    if nearer.size == 0:
        return None
    return int(nearer[np.argmin(np.abs(nearer - min(k * budget / f, k - 1)))])


def _best_point(c: Candidate, budget: float) -> tuple[int, float]:
    """The labelled stop of `c` nearest the budget (sentence ends win ties within the band)."""
    finite = [(k, f) for k, f in c.labelled.items() if math.isfinite(f)]
    return min(finite, key=lambda kf: (abs(kf[1] - budget), kf[0] not in c.sentence_stops, kf[0]))


def _validate(budgets: Any, n_prompts: int, n_candidates: Any, band: Any, max_probes: Any) -> np.ndarray:
    """Budgets as one float per prompt, after checking the controller's settings."""
    try:
        values = np.asarray(budgets, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ConfigError(f"budget_csc={budgets!r} is not a number: give finite budgets > 0 in CSC units, one or one "
                          f"per prompt") from None
    if values.size == 1:
        values = np.full(n_prompts, values.item())
    if values.size != n_prompts:
        raise ConfigError(f"{values.size} budgets for {n_prompts} prompts: give one budget, or one per prompt")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ConfigError(f"budget_csc={values.tolist()} is invalid for verified generation: give finite budgets > 0 "
                          f"(an unlimited budget has nothing to verify: use plain generation)")
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, (int, np.integer)) or n_candidates < 1:
        raise ConfigError(f"n_candidates={n_candidates!r} is invalid: use an int >= 1")
    if not (isinstance(band, (int, float)) and 0 < band < 1):
        raise ConfigError(f"band={band!r} is invalid: use a relative tolerance in (0, 1), e.g. 0.1 for ±10%")
    if isinstance(max_probes, bool) or not isinstance(max_probes, int) or max_probes < 1:
        raise ConfigError(f"max_probes={max_probes!r} is invalid: use an int >= 1")
    return values


@torch.inference_mode()
def sample_candidates(model, tokenizer, prompts: Sequence[str], n_candidates: int, max_new_tokens: int, *,
                      temperature: float = 1.0, top_k: int = 50, seed: int | None = 0,
                      logits_processor: LogitsProcessorList | None = None) -> tuple[list[list[int]], list[Candidate]]:
    """`n_candidates` sampled continuations per prompt (EOS held back), with their mean token log-probs.

    The prompts left-padded, `num_return_sequences=n_candidates`, in `generate()` calls of at most
    `MAX_SAMPLING_ROWS` rows (chunk k seeded `seed + k`; one call, as before, when the prompts fit, or
    with a `logits_processor`, which is built for all rows). A MetabolicGPT-2 samples through its
    backbone (the budget pathway off).
    """
    check_sampling(temperature, top_k, max_new_tokens)
    prompt_ids = encode_prompts(tokenizer, prompts)
    check_context(model.backbone if is_metabolic(model) else model, prompt_ids, max_new_tokens)
    per_call = len(prompt_ids) if logits_processor is not None else max(1, MAX_SAMPLING_ROWS // n_candidates)
    candidates = []
    for k, first in enumerate(range(0, len(prompt_ids), per_call)):
        call = prepare_generate(model, tokenizer, prompt_ids[first:first + per_call], max_new_tokens, do_sample=True,
                                temperature=temperature, top_k=top_k, seed=None if seed is None else seed + k)
        out = call.generate(min_new_tokens=max_new_tokens, num_return_sequences=n_candidates,
                            logits_processor=logits_processor or LogitsProcessorList(), output_scores=True,
                            return_dict_in_generate=True)
        gen = out.sequences[:, call.prompt_len:]
        logp = call.lm.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float().cpu()
        del out  # the scores: [rows, V] per step
        for row in range(gen.shape[0]):
            ids = gen[row].tolist()
            stops, sentence = stop_points(tokenizer, ids)
            finite = logp[row][torch.isfinite(logp[row])]
            candidates.append(Candidate(prompt_index=first + row // n_candidates, index=row % n_candidates, ids=ids,
                                        mean_logprob=float(finite.mean()) if finite.numel() else -math.inf,
                                        stops=stops, sentence_stops=sentence))
    return prompt_ids, candidates


def search(candidates: Sequence[Candidate], prompt_ids: Sequence[Sequence[int]], budgets: np.ndarray,
           prefixes: PrefixLabeller, band: float = 0.10, rate_hint: float | None = None,
           max_probes: int = 6, scale: str = "raw") -> tuple[list[int], list[int], list[int]]:
    """Run the stop-point search on `candidates` (in place); return (probes, texts labelled, texts
    needed without the memo) per prompt.

    Each prompt's candidates are searched in likelihood order, in waves of 1, 1, 2, 4, ... (the most
    likely first): a wave starts only when the earlier ones found nothing in the band, and within a
    wave a candidate less likely than an in-band one stops. Every round labels one prefix per
    searching candidate of every prompt in one batched call.
    """
    probes = [0] * len(prompt_ids)
    texts = [0] * len(prompt_ids)
    needed = [0] * len(prompt_ids)
    by_prompt: dict[int, list[Candidate]] = {}
    for c in candidates:
        c.searching = True
        by_prompt.setdefault(c.prompt_index, []).append(c)
    for group in by_prompt.values():
        group.sort(key=lambda c: (-c.mean_logprob, c.index))
    active = dict.fromkeys(by_prompt, 1)  # how many of each prompt's candidates are in play
    while True:
        requests, owners = [], []
        for p, group in by_prompt.items():
            B = float(budgets[p])
            while True:
                wave = group[:active[p]]
                best_in_band = next((c for c in wave if _in_band(c, B, band)), None)
                for c in wave:
                    if best_in_band is not None and (c is best_in_band or c.mean_logprob <= best_in_band.mean_logprob):
                        c.searching = False  # a more likely in-band candidate is already found
                    elif c.searching and (len(c.labelled) >= max_probes or next_probe(c, B, band, rate_hint) is None):
                        c.searching = False
                if best_in_band is not None or any(c.searching for c in wave) or active[p] >= len(group):
                    break
                active[p] = min(len(group), 2 * active[p])  # nothing in band yet: the next wave
            for c in group[:active[p]]:
                if c.searching:
                    k = next_probe(c, B, band, rate_hint)
                    requests.append((prompt_ids[p], c.ids[:k]))
                    owners.append((c, k))
        if not requests:
            return probes, texts, needed
        totals, spent = prefixes.totals(requests, scale)
        for (c, k), total, n_texts in zip(owners, totals, spent):
            c.labelled[k] = total
            probes[c.prompt_index] += 1
            texts[c.prompt_index] += n_texts
            needed[c.prompt_index] += k + 1  # the full text and one counterfactual per counted token


def _in_band(c: Candidate, budget: float, band: float) -> bool:
    return any(bool(in_band(f, budget, band)) for f in c.labelled.values())


def choose(group: Sequence[Candidate], budget: float, band: float) -> tuple[Candidate | None, int, float, str]:
    """(candidate, k, total, status) for one prompt: band membership first, then likelihood."""
    labelled = [c for c in group if any(math.isfinite(f) for f in c.labelled.values())]
    if not labelled:
        return None, 0, math.nan, "unreachable below"
    in_band = [c for c in labelled if _in_band(c, budget, band)]
    if in_band:
        c = max(in_band, key=lambda c: (c.mean_logprob, -c.index))
        k, f = _best_point(c, budget)
        return c, k, f, "in band"
    c, (k, f) = min(((c, _best_point(c, budget)) for c in labelled), key=lambda cp: (abs(cp[1][1] - budget), cp[0].index))
    if f < budget:
        # Unreachable when every candidate was labelled at its full length and still fell short.
        full = [c.labelled.get(int(c.stops[-1])) for c in labelled if c.stops.size]
        unreachable = all(v is not None and math.isfinite(v) and below_band(v, budget, band) for v in full)
        return c, k, f, "unreachable below" if unreachable else "closest below"
    first = [c.labelled.get(int(c.stops[0])) for c in labelled if c.stops.size]
    unreachable = all(v is not None and math.isfinite(v) and above_band(v, budget, band) for v in first)
    return c, k, f, "unreachable above" if unreachable else "closest above"


def verify(pool: Sequence[Candidate], prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str], tokenizer,
           budget_csc: float | Sequence[float], prefixes: PrefixLabeller, *, n_candidates: int | None = None,
           band: float = 0.10, scale: str = "raw", rate_hint: float | None = None, max_probes: int = 6,
           sampling_seconds: float = 0.0) -> list[VerifiedGeneration]:
    """Search and choose on a sampled `pool` (from `sample_candidates`), using its first `n_candidates`
    samples per prompt (default: all). The pool is not modified, so one pool serves several budgets,
    scales and candidate counts, and `prefixes` shares their labels."""
    n_pool = 1 + max((c.index for c in pool), default=0)
    n = n_pool if n_candidates is None else n_candidates
    budgets = _validate(budget_csc, len(prompts), n, band, max_probes)
    if n > n_pool:
        raise ConfigError(f"n_candidates={n} but the pool holds {n_pool} per prompt: sample at least {n}")
    check_scale(scale)
    candidates = [replace(c, labelled={}, searching=True) for c in pool if c.index < n]
    t0 = time.perf_counter()
    probes, texts, needed = search(candidates, prompt_ids, budgets, prefixes, band, rate_hint, max_probes, scale)
    seconds = sampling_seconds + (time.perf_counter() - t0) / len(prompts)  # the call's time, shared evenly
    results = []
    for p, prompt in enumerate(prompts):
        group = [c for c in candidates if c.prompt_index == p]
        c, k, f, status = choose(group, float(budgets[p]), band)
        kept = c.ids[:k] if c is not None else []
        kind = "sentence" if c is not None and k in c.sentence_stops else ("end" if c is not None and k == len(c.ids) else "word")
        results.append(VerifiedGeneration(
            prompt=prompt, prompt_ids=list(prompt_ids[p]), generated_ids=kept, text=tokenizer.decode(kept),
            budget_csc=float(budgets[p]), achieved_csc=float(f), scale=scale, in_band=status == "in band", status=status,
            candidate=c.index if c is not None else -1, n_candidates=n, stop_kind=kind,
            mean_logprob=c.mean_logprob if c is not None else -math.inf, probes=probes[p], labels=texts[p], labels_needed=needed[p],
            seconds=seconds))
    return results


def steering(model, prompt_ids: Sequence[Sequence[int]], budgets_csc: np.ndarray, n_candidates: int, max_new_tokens: int, *,
             token_costs: Any = None, calibration: ProxyCalibration | None = None,
             lambda_max: float = 5.0) -> LogitsProcessorList:
    """The candidates' sampler steered towards each prompt's budget through the learned costs.

    A `CostSteeringLogitsProcessor` over `n_candidates` rows per prompt (left-padded prompts), paced
    to spend the proxy budget `calibration.to_proxy(B)` over `max_new_tokens` tokens; `token_costs`
    and `calibration` default to a MetabolicGPT-2's own C_vocab and training calibration.
    """
    if token_costs is None or calibration is None:
        if not is_metabolic(model):
            raise ConfigError("steer=True on a plain language model needs token_costs and calibration")
        token_costs = model_token_costs(model) if token_costs is None else token_costs
        calibration = model.proxy_calibration() if calibration is None else calibration
    proxy = calibration.proxy_budgets(budgets_csc)
    return LogitsProcessorList([CostSteeringLogitsProcessor(token_costs, np.repeat(proxy, n_candidates),
                                                            max(len(p) for p in prompt_ids), max_new_tokens,
                                                            lambda_max=lambda_max)])


def generate_verified(model, tokenizer, labeller, prompts: Sequence[str] | str, budget_csc: float | Sequence[float], *,
                      n_candidates: int = 4, band: float = 0.10, max_new_tokens: int = 64, scale: str = "raw",
                      temperature: float = 1.0, top_k: int = 50, seed: int | None = 0, rate_hint: float | None = None,
                      max_probes: int = 6, steer: bool = False, token_costs: Any = None,
                      calibration: ProxyCalibration | None = None, lambda_max: float = 5.0,
                      prefixes: PrefixLabeller | None = None) -> list[VerifiedGeneration]:
    """Generate a continuation of each prompt whose true CSC is within `band` of `budget_csc`.

    `labeller` is a `metabolic.csc.labeller.CSCLabeller`. `rate_hint` (CSC per generated token on `scale`)
    places the first probe; None starts in the middle. With `steer=True` the candidates are sampled
    under `CostSteeringLogitsProcessor` towards the budget through the learned costs (a
    MetabolicGPT-2's own, or `token_costs` + `calibration`). Pass one `prefixes` to several calls to
    share labels. See the module docstring; `sample_candidates` + `verify` do the same in two steps.

    >>> gens = generate_verified(model, tok, labeller, ["The river"], 0.2, n_candidates=4)  # doctest: +SKIP
    >>> gens[0].in_band, gens[0].achieved_csc, gens[0].status  # doctest: +SKIP
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_sampling(temperature, top_k, max_new_tokens)  # before any work, as every generation function
    prompt_ids = encode_prompts(tokenizer, prompts)  # empty prompts are a DataError before any work
    budgets = _validate(budget_csc, len(prompts), n_candidates, band, max_probes)
    processors = (steering(model, prompt_ids, budgets, n_candidates, max_new_tokens, token_costs=token_costs,
                           calibration=calibration, lambda_max=lambda_max) if steer else LogitsProcessorList())
    t0 = time.perf_counter()
    prompt_ids, pool = sample_candidates(model, tokenizer, prompts, n_candidates, max_new_tokens, temperature=temperature,
                                         top_k=top_k, seed=seed, logits_processor=processors)
    return verify(pool, prompt_ids, prompts, tokenizer, budgets, prefixes or PrefixLabeller(labeller), band=band,
                  scale=scale, rate_hint=rate_hint, max_probes=max_probes,
                  sampling_seconds=(time.perf_counter() - t0) / len(prompts))
