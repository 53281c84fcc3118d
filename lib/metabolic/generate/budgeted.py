"""Budget-conditioned generation through `transformers`' `generate()` (paper IV.D, V.C).

`generate_with_budget` composes the budget rules of `metabolic.generate.processors` (steering, the
budget stop, budget forcing; spend, budgets and calibration are defined there) with `generate()`.

Documented behaviour on edge cases:
- `budget_csc = inf` means unlimited: the criterion never fires and steering is a no-op for that row,
  so with steering off the output is token-for-token identical to plain `generate()`.
- A budget <= 0 or NaN, an empty prompt or an empty prompt list raise `ConfigError` / `DataError`.
- A finite budget outside `budget_range` (the range the model was trained on) is clamped to it with
  a warning; the `Generation` records both the requested and the used budget.
- A prompt that leaves no room for `max_new_tokens` in the model's context raises `DataError`.
- `max_new_tokens=None` sizes the token cap from the budget: `TOKEN_CAP_HEADROOM` x the tokens the
  proxy budget needs at `proxy_rate` (proxy per generated token), at most what the context leaves. A
  budget that needs more tokens than the context leaves is not reachable; `Generation.reachable` says so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from metabolic.core.budget import ProxyCalibration
from metabolic.core.errors import ConfigError, DataError
from metabolic.generate.processors import (
    BudgetStoppingCriteria,
    CostSteeringLogitsProcessor,
    EosForcingLogitsProcessor,
    LambdaRecorder,
    as_budgets,
    as_cost_vector,
    per_row,
    stop_rule,
)

log = logging.getLogger(__name__)

# Characters that end a sentence when a token's decoded text ends with one of them.
SENTENCE_END_CHARS = (".", "!", "?")
# A budget-sized token cap allows this many times the tokens the budget needs at the average proxy rate:
# a text dearer per token than average stops on its budget earlier, a cheaper one has room to reach it.
TOKEN_CAP_HEADROOM = 2.0


@functools.lru_cache(maxsize=4)
def _sentence_end_ids_cached(key: int, tokenizer_ref: Any) -> tuple[int, ...]:
    tok = tokenizer_ref
    ids = []
    for i in range(len(tok)):
        text = tok.decode([i]).rstrip()
        if text.endswith(SENTENCE_END_CHARS):
            ids.append(i)
    return tuple(ids)


def sentence_end_ids(tokenizer) -> tuple[int, ...]:
    """Ids of tokens whose decoded text ends a sentence ('.', '!' or '?', trailing spaces ignored)."""
    return _sentence_end_ids_cached(id(tokenizer), tokenizer)


def sentence_end_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = [i for i in sentence_end_ids(tokenizer) if i < vocab_size]
    mask[ids] = True
    return mask


def token_cap(budgets_proxy: Any, proxy_rate: float, room: int | None) -> tuple[int, list[float]]:
    """(max_new_tokens, tokens each budget needs): `TOKEN_CAP_HEADROOM` x the most any finite budget
    needs at `proxy_rate` proxy per token, at least 1, at most `room` (the context left; None = no limit).
    An unlimited budget needs `room` tokens.

    >>> token_cap([0.1, 0.2], 0.01, room=48)
    (40, [10.0, 20.0])
    >>> token_cap([0.5], 0.01, room=48)
    (48, [50.0])
    """
    if not (isinstance(proxy_rate, (int, float)) and math.isfinite(proxy_rate) and proxy_rate > 0):
        raise ConfigError(f"proxy_rate={proxy_rate!r} is invalid: give the mean proxy cost per generated token (> 0)")
    values = torch.as_tensor(budgets_proxy, dtype=torch.float64).reshape(-1).tolist()
    needed = [v / proxy_rate if math.isfinite(v) else float(room if room is not None else math.inf) for v in values]
    cap = max(1, math.ceil(TOKEN_CAP_HEADROOM * max(needed))) if all(math.isfinite(n) for n in needed) else room
    if cap is None:
        raise ConfigError("an unlimited budget needs a token limit: pass max_new_tokens or use a model with a known context")
    return (min(cap, room) if room is not None else cap), needed


def kept_lengths(gen_ids: torch.Tensor, token_costs: torch.Tensor, budgets_proxy: torch.Tensor,
                 sentence_end: torch.Tensor | None, sentence_slack: float, eos_token_id: int | None,
                 budget_stop: bool = True) -> list[tuple[int, str]]:
    """Replay the stopping rule on finished generations: (tokens kept, why it ended) per row.

    Rows that ended early are padded by `generate()`; this finds where each really ended. An EOS
    token ends the text and is not kept. Reasons: "budget", "sentence", "eos", "max_new_tokens".
    """
    costs = token_costs.to(gen_ids.device)
    n_rows, n_cols = gen_ids.shape
    budgets = per_row(budgets_proxy.to(gen_ids.device), n_rows, "budgets_proxy")
    if sentence_end is None:
        sentence_end = torch.zeros(costs.numel(), dtype=torch.bool)
    out = []
    cum = costs[gen_ids].double().cumsum(dim=1) if n_cols else torch.zeros(n_rows, 0, dtype=torch.float64)
    for row in range(n_rows):
        kept, why = n_cols, "max_new_tokens"
        for t in range(n_cols):
            token = int(gen_ids[row, t])
            if eos_token_id is not None and token == eos_token_id:
                kept, why = t, "eos"
                break
            if budget_stop:
                b = budgets[row : row + 1]
                at_end = sentence_end[token : token + 1].to(gen_ids.device)
                hard = stop_rule(cum[row, t : t + 1], t + 1, b, torch.zeros_like(at_end), sentence_slack)
                if bool(hard):
                    kept, why = t + 1, "budget"
                    break
                if bool(stop_rule(cum[row, t : t + 1], t + 1, b, at_end, sentence_slack)):
                    kept, why = t + 1, "sentence"
                    break
        out.append((kept, why))
    return out


@dataclass
class Generation:
    """One budgeted generation: ids, text and the budget it was asked for (CSC) and given (CSC, proxy)."""

    prompt: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str  # the generated continuation only
    budget_requested_csc: float
    budget_csc: float  # after clamping to the trained range
    budget_proxy: float
    spent_proxy: float  # sum of C_vocab over the generated tokens
    stopped_by: str
    lambdas: list[float] = field(default_factory=list)  # lambda_t per step (steering only)
    floor_proxy: float = 0.0  # spend below which EOS was held back (budget forcing; 0 = not forced)
    tokens_needed: float = math.nan  # tokens the proxy budget needs at the average proxy rate (NaN: no rate given)
    max_new_tokens: int = 0  # the token cap this generation ran under
    reachable: bool = True  # False when the budget needs more tokens than the context leaves


def _context_size(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# Sampling temperatures outside this range overflow or underflow the softmax of float32 scores (1e-300 and
# 1e300 gave "probability tensor contains inf/nan"), so they are refused with the range in the message.
TEMPERATURE_RANGE = (1e-2, 1e2)


def check_sampling(temperature: Any, top_k: Any, max_new_tokens: Any, *, tokens_may_be_none: bool = False) -> None:
    """The one check of the sampling arguments every public generation function takes: a `ConfigError`
    naming the value, the rule and the fix."""
    lo, hi = TEMPERATURE_RANGE
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not lo <= temperature <= hi:
        raise ConfigError(f"temperature={temperature!r} is invalid: use a number in [{lo:g}, {hi:g}] (1.0 samples the "
                          f"model as it is)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r} is invalid: use an int >= 0 (0 = off)")
    if max_new_tokens is None and tokens_may_be_none:
        return
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} is invalid: use an int >= 1"
                          + (", or None to size it from the budget" if tokens_may_be_none else ""))


def check_context(lm, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """`DataError` when the longest prompt plus `max_new_tokens` exceeds the model's context."""
    context = _context_size(lm)
    longest = max(len(p) for p in prompt_ids)
    if context is not None and max_new_tokens >= context:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is not below the model's context of {context} tokens: "
                          f"use at most {context - longest} for this prompt")
    if context is not None and longest + max_new_tokens > context:
        raise DataError(
            f"a prompt has {longest} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
            f"context of {context}: shorten the prompt to <= {context - max_new_tokens} tokens or lower max_new_tokens"
        )


def _clamp_budgets(budgets: torch.Tensor, budget_range: tuple[float, float] | None) -> torch.Tensor:
    if budget_range is None:
        return budgets
    lo, hi = float(budget_range[0]), float(budget_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ConfigError(f"budget_range={budget_range!r} is invalid: give (low, high) with 0 < low <= high")
    finite = torch.isfinite(budgets)
    clamped = torch.where(finite, budgets.clamp(lo, hi), budgets)
    changed = finite & (clamped != budgets)
    if changed.any():
        # 4 significant digits: the message lands in checked notebook outputs, full floats would not reproduce
        log.warning("budgets %s are outside the trained range [%.4g, %.4g] CSC: clamped to %s",
                    [float(f"{x:.4g}") for x in budgets[changed].tolist()], lo, hi,
                    [float(f"{x:.4g}") for x in clamped[changed].tolist()])
    return clamped


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; an empty list or an empty prompt is a `DataError`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise DataError("no prompts given: pass at least one non-empty prompt")
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"prompt {i} ({p!r}) is empty: give some text to continue")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"prompt {i} holds {p[exc.start:exc.end]!r} at character {exc.start}, which is not text "
                            f"(a lone surrogate): remove it or decode the input as UTF-8") from None
        ids.append(tokenizer(p, add_special_tokens=False)["input_ids"])
    return ids


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (GPT-2 has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [n, longest], left padded: every row's generation starts at column `longest`.

    >>> left_pad([[5, 6], [7]], pad_id=0)[0].tolist()
    [[5, 6], [0, 7]]
    """
    longest = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), longest), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, longest - len(ids):] = 1
    return input_ids, attention


def is_metabolic(model) -> bool:
    """True for a MetabolicGPT-2 (a backbone plus `vocab_costs` and a budget pathway)."""
    return hasattr(model, "vocab_costs") and hasattr(model, "backbone") and hasattr(model, "budget_proj")


def model_token_costs(model) -> torch.Tensor:
    """C_vocab of a MetabolicGPT-2 as one proxy number per token: the mean over K, float32 [V] on CPU."""
    with torch.no_grad():
        return model.proxy_total(model.vocab_costs()).detach().float().cpu()


@dataclass
class GenerateCall:
    """One `generate()` call of the study, set up the same way everywhere (`prepare_generate`)."""

    lm: Any  # the language model that generates (a MetabolicGPT-2's backbone)
    prompt_len: int  # columns of the left-padded prompts: every row's generation starts here
    kwargs: dict[str, Any]  # input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id (+ sampling)
    overrides: dict[str, Any]  # the caller's generate_kwargs, applied last

    def generate(self, **extra: Any):
        """`lm.generate(...)` with the prepared arguments, `extra` (processors, ...) and the caller's overrides."""
        return self.lm.generate(**{**self.kwargs, **extra, **self.overrides})


def prepare_generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, do_sample: bool = True,
                     temperature: float = 1.0, top_k: int = 50, seed: int | None = 0,
                     generate_kwargs: dict[str, Any] | None = None) -> GenerateCall:
    """The prompts left-padded on the generating model's device (a MetabolicGPT-2 generates through its
    backbone), GPT-2's pad id, the sampling settings when sampling, and the seed set (when given)."""
    lm = model.backbone if is_metabolic(model) else model
    device = next(lm.parameters()).device
    pad_id = pad_token_id(tokenizer)
    input_ids, attention = left_pad(prompt_ids, pad_id)
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
                  do_sample=do_sample, pad_token_id=pad_id)
    if do_sample:
        kwargs.update(temperature=float(temperature), top_k=int(top_k))
    if seed is not None:
        torch.manual_seed(seed)
    return GenerateCall(lm=lm, prompt_len=input_ids.shape[1], kwargs=kwargs, overrides=dict(generate_kwargs or {}))


@dataclass(frozen=True)
class BudgetPlan:
    """Per prompt: the budgets one budgeted generation runs under, and its token limits."""

    requested: torch.Tensor  # [n] float64 CSC budgets as asked (inf = unlimited)
    used: torch.Tensor  # [n] float64 CSC budgets clamped to the trained range
    proxy: torch.Tensor  # [n] float64 the used budgets in proxy units
    floors: torch.Tensor  # [n] float64 proxy spend below which EOS is held back (0 = never)
    needed: list[float]  # tokens each proxy budget needs at `proxy_rate` (NaN: no rate given)
    room: int | None  # tokens the context leaves after the longest prompt (None: no known context)
    max_new_tokens: int  # the token cap

    @property
    def pace_tokens(self) -> int:
        """The tokens steering paces the budget over: those the budgets need, not the cap (a cap with
        headroom would brake early); the cap when a need is unknown."""
        if all(math.isfinite(n) for n in self.needed):
            return max(1, min(self.max_new_tokens, math.ceil(max(self.needed))))
        return self.max_new_tokens


def plan_budgets(budget_csc: Any, calibration: ProxyCalibration, lm, prompt_ids: Sequence[Sequence[int]], *,
                 budget_range: tuple[float, float] | None, band: float, proxy_rate: float | None,
                 max_new_tokens: int | None) -> BudgetPlan:
    """Validate `budget_csc` (one or one per prompt), clamp it to `budget_range`, map it to proxy units, and
    size the token cap (`token_cap` when `proxy_rate` is given) within `lm`'s context."""
    requested = as_budgets(budget_csc, "budget_csc")
    requested = per_row(requested, len(prompt_ids), "budget_csc").clone()
    used = _clamp_budgets(requested, budget_range)
    budgets_proxy = torch.from_numpy(calibration.proxy_budgets(used.numpy()))
    context = _context_size(lm)
    room = None if context is None else context - max(len(p) for p in prompt_ids)
    needed = [math.nan] * len(prompt_ids)
    if proxy_rate is not None:
        cap, needed = token_cap(budgets_proxy, proxy_rate, room)
        max_new_tokens = cap if max_new_tokens is None else max_new_tokens
    check_context(lm, prompt_ids, max_new_tokens)
    # Budget forcing: the proxy image of the band's lower edge; 0 (never held) where that edge is below the
    # calibration's intercept or the budget is unlimited.
    floors = torch.tensor([max(calibration.to_proxy((1 - band) * float(b)), 0.0) if math.isfinite(b) else 0.0
                           for b in used.tolist()], dtype=torch.float64)
    return BudgetPlan(requested=requested, used=used, proxy=budgets_proxy, floors=floors, needed=needed, room=room,
                      max_new_tokens=max_new_tokens)


def _costs_and_calibration(model, token_costs: Any, calibration: ProxyCalibration | None) -> tuple[Any, ProxyCalibration]:
    """The caller's C_vocab and calibration, else a MetabolicGPT-2's own; a plain LM must be given both."""
    metabolic = is_metabolic(model)
    if token_costs is None:
        if not metabolic:
            raise ConfigError("token_costs is required for a plain language model: pass C_vocab as a [V] tensor")
        token_costs = model_token_costs(model)
    if calibration is None:
        if not metabolic:
            raise ConfigError("calibration is required for a plain language model: pass ProxyCalibration(a, b)")
        calibration = model.proxy_calibration()
    return token_costs, calibration


def _generations(prompts: list[str], prompt_ids: Sequence[Sequence[int]], gen: torch.Tensor,
                 ends: list[tuple[int, str]], history: torch.Tensor | None, tokenizer, costs: torch.Tensor,
                 plan: BudgetPlan, forced: bool) -> list[Generation]:
    """One `Generation` per row of `gen` [n, new tokens], cut where `kept_lengths` says it ended."""
    results = []
    for row, (kept, why) in enumerate(ends):
        ids = gen[row, :kept].tolist()
        results.append(Generation(
            prompt=prompts[row], prompt_ids=list(prompt_ids[row]), generated_ids=ids,
            text=tokenizer.decode(ids), budget_requested_csc=float(plan.requested[row]), budget_csc=float(plan.used[row]),
            budget_proxy=float(plan.proxy[row]), spent_proxy=float(costs[ids].double().sum()) if ids else 0.0,
            stopped_by=why, lambdas=history[row, :kept].tolist() if history is not None else [],
            floor_proxy=float(plan.floors[row]) if forced else 0.0, tokens_needed=float(plan.needed[row]),
            max_new_tokens=int(plan.max_new_tokens), reachable=not (plan.room is not None and plan.needed[row] > plan.room),
        ))
    return results


@torch.inference_mode()
def generate_with_budget(
    model,
    tokenizer,
    prompts: Sequence[str] | str,
    budget_csc: float | Sequence[float],
    *,
    token_costs: Any = None,
    calibration: ProxyCalibration | None = None,
    condition: bool = True,
    max_new_tokens: int | None = 64,
    steer: bool = True,
    stop: bool = True,
    force: bool = True,
    band: float = 0.1,
    proxy_rate: float | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 50,
    seed: int | None = 0,
    budget_range: tuple[float, float] | None = None,
    lambda_max: float = 5.0,
    two_sided: bool = False,
    sentence_slack: float = 0.1,
    generate_kwargs: dict[str, Any] | None = None,
) -> list[Generation]:
    """Generate a continuation of each prompt that spends `budget_csc` (CSC units; inf = unlimited).

    Runs `model.generate()` with the steering processor (if `steer`) and the budget stopping criterion
    (if `stop`) appended to the defaults. `model` is anything with `.generate(input_ids=..., ...)`
    (a `GPT2LMHeadModel`), or a `MetabolicGPT2`: then `token_costs` and `calibration` default to the
    model's own, and (if `condition`) its backbone generates under the budget pathway for each row's
    (finite) CSC budget, see `MetabolicGPT2.conditioned_on`. `token_costs` is `C_vocab` [V] in proxy units.

    With `force` (budget forcing), EOS is held back in a row until its spend reaches the proxy image of
    the band's lower edge, `(1 - band) x budget_csc`, so that the budget, not an early EOS, ends the
    text. `proxy_rate` (mean proxy cost per generated token, e.g. `evaluate.budgets.sampled_proxy_rate` of the
    model's unbudgeted samples) paces the steering over the tokens the budget needs and, with
    `max_new_tokens=None`, sizes the token cap
    (`token_cap`); the `Generation` records the tokens needed, the cap and whether the budget was reachable.
    """
    metabolic = is_metabolic(model)
    token_costs, calibration = _costs_and_calibration(model, token_costs, calibration)
    prompt_ids = encode_prompts(tokenizer, prompts)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_sampling(temperature, top_k, max_new_tokens, tokens_may_be_none=True)
    if max_new_tokens is None and proxy_rate is None:
        raise ConfigError("max_new_tokens=None sizes the cap from the budget: pass proxy_rate (proxy per generated token)")
    if not (isinstance(band, (int, float)) and 0 <= band < 1):
        raise ConfigError(f"band={band!r} is invalid: use a relative tolerance in [0, 1), e.g. 0.1 for ±10%")
    plan = plan_budgets(budget_csc, calibration, model.backbone if metabolic else model, prompt_ids,
                        budget_range=budget_range, band=band, proxy_rate=proxy_rate, max_new_tokens=max_new_tokens)
    costs = as_cost_vector(token_costs)
    call = prepare_generate(model, tokenizer, prompt_ids, plan.max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_k=top_k, seed=seed, generate_kwargs=generate_kwargs)
    sentence_end = sentence_end_mask(tokenizer, costs.numel())
    processors = LogitsProcessorList()
    recorder = None
    if steer:
        steering = CostSteeringLogitsProcessor(costs, plan.proxy, call.prompt_len, plan.pace_tokens, lambda_max=lambda_max,
                                               two_sided=two_sided)
        recorder = LambdaRecorder(steering)
        processors.extend([steering, recorder])
    forced = force and tokenizer.eos_token_id is not None and bool((plan.floors > 0).any())
    if forced:
        processors.append(EosForcingLogitsProcessor(costs, plan.floors, call.prompt_len, int(tokenizer.eos_token_id)))
    criteria = StoppingCriteriaList()
    if stop:
        criteria.append(BudgetStoppingCriteria(costs, plan.proxy, call.prompt_len, sentence_end, sentence_slack))
    finite = bool(torch.isfinite(plan.used).all())
    conditioned = plan.used.float() if (metabolic and condition and finite) else None
    if metabolic and condition and not finite:
        log.info("an unlimited budget has no budget-pathway input: generating unconditioned")
    with (model.conditioned_on(conditioned) if metabolic else contextlib.nullcontext()):
        output = call.generate(logits_processor=processors, stopping_criteria=criteria)
    gen = output[:, call.prompt_len:].cpu()
    ends = kept_lengths(gen, costs, plan.proxy, sentence_end, sentence_slack, tokenizer.eos_token_id, budget_stop=stop)
    history = torch.stack(recorder.history, dim=1).cpu() if recorder is not None and recorder.history else None
    return _generations(prompts, prompt_ids, gen, ends, history, tokenizer, costs, plan, forced)


def plain_generate(model, tokenizer, prompts: Sequence[str] | str, *, max_new_tokens: int = 64, do_sample: bool = True,
                   temperature: float = 1.0, top_k: int = 50, seed: int | None = 0,
                   generate_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Plain `generate()` on the same left-padded batch as `generate_with_budget` (the reference).

    For a MetabolicGPT-2 this is its backbone without any budget input (unbudgeted generation).
    """
    check_sampling(temperature, top_k, max_new_tokens)
    prompt_ids = encode_prompts(tokenizer, prompts)
    check_context(model.backbone if is_metabolic(model) else model, prompt_ids, max_new_tokens)
    call = prepare_generate(model, tokenizer, prompt_ids, max_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, seed=seed, generate_kwargs=generate_kwargs)
    with torch.inference_mode():
        return call.generate().cpu()
