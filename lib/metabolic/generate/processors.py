"""The budget rules of generation as `transformers` logits processors and a stopping criterion (paper IV.D, V.C).

Small parts with the standard contracts, composable with any other processor or criterion:

- `CostSteeringLogitsProcessor` subtracts `lambda_t * C_vocab / s` from the next-token scores (s = the
  std of C_vocab, so lambda is in nats per typical cost difference whatever C_vocab's scale). `lambda_t`
  is solved per batch row and per step (Newton steps on the tilted distribution) so that the
  expected cost of the next token equals the pace the budget still allows, `(B - spent) / steps_left`:
  a row that is spending too fast is pushed towards cheap tokens (and, only with `two_sided=True`, one
  that is too slow towards dearer ones). `|lambda_t| <= lambda_max` keeps the text close to the model's
  own distribution.
- `BudgetStoppingCriteria` ends a row when its spend is as close to the budget as it is going to get
  (`spent >= B - r/2`, with `r` the row's average cost per generated token), or earlier at a sentence
  end once `spent >= (1 - sentence_slack) * B`.
- `EosForcingLogitsProcessor` holds EOS back in a row until its spend reaches the budget band's lower
  edge (budget forcing, as s1 forces a token budget): without it a small model ends most texts by
  EOS long before any budget, and the budget stop never decides anything.

Spend is measured in proxy units: the sum of `C_vocab[v]` over the *generated* tokens (never the
prompt). Budgets are given in CSC units and mapped to proxy units through the model's affine
calibration `CSC = a + b * proxy` (eq. 17). Which tokens count is the study's shared definition: for a
generation, the generated tokens count, with their CSC measured by the labeller on the full
prompt + generation text; for a training text, all of its tokens count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from metabolic.core.errors import ConfigError, DataError


def as_cost_vector(token_costs: Any, name: str = "token_costs") -> torch.Tensor:
    """C_vocab as a float32 [V] tensor; a `ConfigError` unless it is 1-D, non-empty, finite and >= 0."""
    costs = torch.as_tensor(token_costs, dtype=torch.float32)
    if costs.ndim != 1 or costs.numel() == 0:
        raise ConfigError(f"{name} has shape {tuple(costs.shape)}: give one cost per vocabulary token, shape [V]")
    if not torch.isfinite(costs).all() or (costs < 0).any():
        raise ConfigError(f"{name} must be finite and >= 0 (min {costs.min().item():.4g}): check the model's C_vocab")
    return costs


def as_budgets(budgets: Any, name: str) -> torch.Tensor:
    """Budgets as a float64 1-D tensor; each must be > 0 (inf = unlimited), never NaN."""
    try:
        values = torch.as_tensor(budgets, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{name}={budgets!r} is not a number: give budgets > 0 in CSC units (float('inf') = "
                          f"unlimited), one or one per prompt") from None
    if values.numel() == 0:
        raise ConfigError(f"{name} is empty: give at least one budget")
    if torch.isnan(values).any():
        raise ConfigError(f"{name}={values.tolist()} contains NaN: give budgets > 0 (inf = unlimited)")
    if (values <= 0).any():
        raise ConfigError(f"{name}={values.tolist()} contains a budget <= 0: give budgets > 0 (inf = unlimited)")
    return values


def per_row(values: torch.Tensor, n_rows: int, name: str) -> torch.Tensor:
    """Broadcast per-prompt values to the batch rows (1 value, one per row, or one per prompt repeated)."""
    if values.numel() == n_rows:
        return values
    if values.numel() == 1:
        return values.expand(n_rows)
    if n_rows % values.numel() == 0:  # num_return_sequences > 1: rows of a prompt are contiguous
        return values.repeat_interleave(n_rows // values.numel())
    raise ConfigError(f"{name} has {values.numel()} entries for {n_rows} batch rows: give 1 or one per prompt")


def generated_spend(input_ids: torch.Tensor, token_costs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Proxy spend of each row: sum of `token_costs` over the tokens after `prompt_len`, float64 [B]."""
    gen = input_ids[:, prompt_len:]
    if gen.shape[1] == 0:
        return torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    return token_costs.to(input_ids.device)[gen].double().sum(dim=1)


def stop_rule(spent: torch.Tensor, n_generated: int | torch.Tensor, budget: torch.Tensor,
              at_sentence_end: torch.Tensor, sentence_slack: float) -> torch.Tensor:
    """The stopping rule on one step (pure): True where the row should end now.

    Hard stop when `spent >= budget - r/2` with `r = spent / n_generated` (stopping now is closer to the
    budget than one more average token); soft stop at a sentence end once `spent >= (1 - slack) * budget`.
    """
    n = torch.as_tensor(n_generated, dtype=torch.float64, device=spent.device).clamp(min=1)
    rate = spent / n
    hard = spent >= budget - rate / 2
    soft = at_sentence_end & (spent >= (1.0 - sentence_slack) * budget)
    return hard | soft


class CostSteeringLogitsProcessor(LogitsProcessor):
    """Tilt next-token scores by `-lambda_t * C_vocab` so the expected spend keeps pace with the budget.

    Args:
        token_costs: `C_vocab` as a [V] tensor of proxy costs (>= 0), V = the scores' last dimension.
        budgets_proxy: proxy-unit budget per prompt (or one for all); `inf` = unlimited (no steering).
        prompt_len: length of the (left-padded) prompt; tokens after it are the generation.
        max_new_tokens: the generation's token limit, which sets the pace `(B - spent) / steps_left`.
        lambda_max: bound on `|lambda_t|`, in score units (nats) per `lambda_unit` of cost.
        lambda_unit: the cost unit lambda is measured in (default: the std of `token_costs` over the
            vocabulary), so `lambda_max` means the same tilt whatever the scale of C_vocab.
        newton_steps: Newton iterations solving E_lambda[C] = pace (1 is cheap and enough for pacing;
            each adds one softmax over the vocabulary per step).
        two_sided: also push under-spending rows towards dearer tokens (negative lambda). Off by default:
            on smoke it drove text into repeating rare tokens (judge perplexity x300) without raising
            the true CSC, so by default steering only ever brakes an over-spending row.
    """

    def __init__(self, token_costs: Any, budgets_proxy: Any, prompt_len: int, max_new_tokens: int,
                 lambda_max: float = 5.0, newton_steps: int = 1, two_sided: bool = False,
                 lambda_unit: float | None = None) -> None:
        self.token_costs = as_cost_vector(token_costs)
        if lambda_unit is None:
            lambda_unit = float(self.token_costs.std()) if self.token_costs.numel() > 1 else 0.0
            lambda_unit = lambda_unit if lambda_unit > 0 else max(float(self.token_costs.mean()), 1e-8)
        if not (math.isfinite(lambda_unit) and lambda_unit > 0):
            raise ConfigError(f"lambda_unit={lambda_unit!r} is invalid: use a finite value > 0")
        self.lambda_unit = float(lambda_unit)
        self.budgets = as_budgets(budgets_proxy, "budgets_proxy")
        if not isinstance(prompt_len, int) or prompt_len < 0:
            raise ConfigError(f"prompt_len={prompt_len!r} is invalid: give the prompt's token count (>= 0)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} is invalid: use an int >= 1")
        if not (math.isfinite(lambda_max) and lambda_max >= 0):
            raise ConfigError(f"lambda_max={lambda_max!r} is invalid: use a finite value >= 0")
        if not isinstance(newton_steps, int) or newton_steps < 1:
            raise ConfigError(f"newton_steps={newton_steps!r} is invalid: use an int >= 1")
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens
        self.lambda_max = float(lambda_max)
        self.newton_steps = newton_steps
        self.two_sided = two_sided
        self.last_lambda: torch.Tensor | None = None  # diagnostics: lambda_t of the latest step, [B], on the device
        self._cached: tuple[torch.Tensor, ...] | None = None
        self._max: float | None = None

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(C / lambda_unit, its square, C, the budgets) on `device`, copied there once, not at every token."""
        if self._cached is None or self._cached[0].device != device:
            raw = self.token_costs.to(device)
            costs = raw / self.lambda_unit  # in units of lambda_unit
            self._cached = (costs, costs * costs, raw, self.budgets.to(device))
        return self._cached

    def _max_cost(self, costs: torch.Tensor) -> float:
        if self._max is None:
            self._max = float(costs.max())
        return self._max

    def lambdas(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """lambda_t per row, float32 [B] (pure: depends only on the arguments and the settings)."""
        if scores.ndim != 2 or scores.shape[-1] != self.token_costs.numel():
            raise DataError(
                f"scores have shape {tuple(scores.shape)} but token_costs has {self.token_costs.numel()} entries: "
                f"use the C_vocab of the model that produces these scores"
            )
        n_gen = input_ids.shape[1] - self.prompt_len
        if n_gen < 0:
            raise DataError(f"input has {input_ids.shape[1]} tokens, fewer than prompt_len={self.prompt_len}")
        costs, costs_sq, raw, budgets = self._on(scores.device)
        budget = per_row(budgets, scores.shape[0], "budgets_proxy")
        spent = generated_spend(input_ids, raw, self.prompt_len)
        steps_left = max(self.max_new_tokens - n_gen, 1)
        pace = ((budget - spent) / steps_left / self.lambda_unit).clamp(min=0.0).float()
        lam = torch.zeros(scores.shape[0], dtype=torch.float32, device=scores.device)
        # E[C] <= max C <= pace for every row: the one-sided brake is exactly 0, no softmax needed. On
        # the CPU that check is free and saves the softmax; on an accelerator reading it would stall
        # decoding every token, so there the softmax runs and the check picks 0 on the device.
        under = None if self.two_sided else (pace >= self._max_cost(costs)).all()
        if under is not None and scores.device.type == "cpu" and bool(under):
            return lam
        logits = scores.float()
        low = -self.lambda_max if self.two_sided else 0.0
        for step in range(self.newton_steps):
            tilted = logits if step == 0 else torch.addcmul(logits, lam[:, None], costs[None, :], value=-1.0)
            probs = torch.softmax(tilted, dim=-1)
            mean = probs @ costs
            var = (probs @ costs_sq - mean * mean).clamp(min=0.0)
            # d E_lambda[C] / d lambda = -Var_lambda[C]: a Newton step towards E = pace. A row whose
            # scores are all -inf has no distribution (NaN): it gets lambda 0.
            lam = torch.nan_to_num(lam + (mean - pace) / (var + 1e-8), nan=0.0).clamp(low, self.lambda_max)
        if under is not None:
            lam = torch.where(under, torch.zeros_like(lam), lam)
        return torch.where(torch.isfinite(budget), lam, torch.zeros_like(lam))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lam = self.lambdas(input_ids, scores)
        self.last_lambda = lam.detach()  # stays on the device: the recorder's history is read once, at the end
        costs = self._on(scores.device)[0]
        # A new tensor (scores - lambda * C / lambda_unit): scores are never edited in place.
        return torch.addcmul(scores, lam[:, None].to(scores.dtype), costs[None, :].to(scores.dtype), value=-1.0)


class BudgetStoppingCriteria(StoppingCriteria):
    """End each row at its proxy budget (see `stop_rule`), preferably at a sentence end.

    Args:
        token_costs: `C_vocab` as a [V] tensor of proxy costs (>= 0).
        budgets_proxy: proxy-unit budget per prompt (or one for all); `inf` = never stop on budget.
        prompt_len: length of the (left-padded) prompt.
        sentence_end: bool mask [V] of sentence-ending tokens (None: no soft stop).
        sentence_slack: fraction of the budget that may be left unspent to stop at a sentence end.
    """

    def __init__(self, token_costs: Any, budgets_proxy: Any, prompt_len: int,
                 sentence_end: torch.Tensor | None = None, sentence_slack: float = 0.1) -> None:
        self.token_costs = as_cost_vector(token_costs)
        self.budgets = as_budgets(budgets_proxy, "budgets_proxy")
        if not isinstance(prompt_len, int) or prompt_len < 0:
            raise ConfigError(f"prompt_len={prompt_len!r} is invalid: give the prompt's token count (>= 0)")
        if not (0.0 <= sentence_slack < 1.0):
            raise ConfigError(f"sentence_slack={sentence_slack!r} is invalid: use a fraction in [0, 1)")
        if sentence_end is None:
            sentence_end = torch.zeros(self.token_costs.numel(), dtype=torch.bool)
        sentence_end = torch.as_tensor(sentence_end, dtype=torch.bool)
        if sentence_end.shape != self.token_costs.shape:
            raise ConfigError(f"sentence_end has shape {tuple(sentence_end.shape)}: give a bool mask of shape [V]")
        self.prompt_len = prompt_len
        self.sentence_end = sentence_end
        self.sentence_slack = float(sentence_slack)
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(costs, budgets, sentence-end mask) on `device`, copied there once, not at every token."""
        if self._cached is None or self._cached[0].device != device:
            self._cached = (self.token_costs.to(device), self.budgets.to(device), self.sentence_end.to(device))
        return self._cached

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
        n_gen = input_ids.shape[1] - self.prompt_len
        if n_gen <= 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        costs, budgets, sentence_end = self._on(input_ids.device)
        spent = generated_spend(input_ids, costs, self.prompt_len)
        budget = per_row(budgets, input_ids.shape[0], "budgets_proxy")
        at_end = sentence_end[input_ids[:, -1]]
        return stop_rule(spent, n_gen, budget, at_end, self.sentence_slack)


class EosForcingLogitsProcessor(LogitsProcessor):
    """Budget forcing: EOS cannot be sampled in a row until its proxy spend reaches `floor_proxy`.

    Args:
        token_costs: `C_vocab` as a [V] tensor of proxy costs (>= 0).
        floor_proxy: proxy spend per prompt (or one for all) below which EOS is held back; 0 = never held.
        prompt_len: length of the (left-padded) prompt.
        eos_token_id: the token that ends a text.
    """

    def __init__(self, token_costs: Any, floor_proxy: Any, prompt_len: int, eos_token_id: int) -> None:
        self.token_costs = as_cost_vector(token_costs)
        floor = torch.as_tensor(floor_proxy, dtype=torch.float64).reshape(-1)
        if floor.numel() == 0 or not torch.isfinite(floor).all() or (floor < 0).any():
            raise ConfigError(f"floor_proxy={floor.tolist()} is invalid: give finite proxy spends >= 0, one or one per prompt")
        if not isinstance(eos_token_id, int) or not 0 <= eos_token_id < self.token_costs.numel():
            raise ConfigError(f"eos_token_id={eos_token_id!r} is invalid: give the tokenizer's EOS id (< {self.token_costs.numel()})")
        self.floor = floor
        self.prompt_len = prompt_len
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        costs = self.token_costs.to(input_ids.device)
        spent = generated_spend(input_ids, costs, self.prompt_len)
        hold = spent < per_row(self.floor.to(input_ids.device), input_ids.shape[0], "floor_proxy")
        scores = scores.clone()  # never edited in place: other processors may hold the original
        eos = scores[:, self.eos_token_id]
        scores[:, self.eos_token_id] = torch.where(hold, torch.full_like(eos, -math.inf), eos)
        return scores


class LambdaRecorder(LogitsProcessor):
    """Records the steering processor's lambda_t after each step (returns scores unchanged)."""

    def __init__(self, steering: CostSteeringLogitsProcessor) -> None:
        self.steering = steering
        self.history: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.steering.last_lambda is not None:
            self.history.append(self.steering.last_lambda)
        return scores
