"""Where the evaluation's budgets come from, and the budget -> proxy map decoding steers by.

Budgets are scored on what a generation counts (its generated tokens, labelled in the context of
prompt + generation), so they are derived from training texts split the same way: the first
`generation.prompt_tokens` tokens are the prompt, the rest (1..`max_new_tokens` tokens) the
continuation (`continuation_points`, `continuation_totals`). `levels_from_continuations` gives the evaluate
stage, notebook 04 and the explorer (06) their levels, `targets_per_scale` the verified controller's
budgets on each CSC scale; `decoding_calibration` the proxy <-> CSC map steered decoding uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from metabolic.core.budget import affine_or_ratio, length_factor, level_names
from metabolic.core.config import GenerationConfig, TrainConfig
from metabolic.core.errors import DataError
from metabolic.csc.dataset import CSCData
from metabolic.generate.budgeted import model_token_costs
from metabolic.model.calibration import OnlineAffine
from metabolic.train.data import counted_from, prepare_data


@dataclass(frozen=True)
class BudgetLevels:
    """The generation budgets: the evaluate stage, notebook 04 and the explorer (06) use these."""

    budgets: dict[str, float]  # level (low/medium/high, or B0, B1, ...) -> CSC budget
    source: str  # where they come from, in words
    budget_range: tuple[float, float]  # CSC budgets generation accepts (trained and continuation range)
    continuation: np.ndarray  # true CSC totals of the training-text continuations
    training_targets: list[float]  # the training stage's targets (whole texts, every token counted)


@dataclass(frozen=True)
class TrainedBudgets:
    """What training conditions on, on one CSC scale: its K targets and the budget range (min, max) of targets
    and training totals (the `train` stage saves both in selection.json for the scale it trained on)."""

    targets: list[float]
    budget_range: tuple[float, float]


def budgets_training_would_use(csc: CSCData, train: TrainConfig, prompt_tokens: int, scale: str,
                               vocab_size: int) -> TrainedBudgets:
    """`TrainedBudgets` on a scale training did not run on (the explorer's other scale), by the training
    stage's own rule (`prepare_data`); on the trained scale read selection.json instead."""
    data = prepare_data(csc, train, vocab_size=vocab_size, scale=scale, counted_from=counted_from(train, prompt_tokens))
    return TrainedBudgets([float(x) for x in data.targets], data.budget_range)


def levels_from_continuations(csc: CSCData, g: GenerationConfig, budget_quantiles: Sequence[float], scale: str,
                              trained: TrainedBudgets) -> BudgetLevels:
    """`generation.budgets`, else the `budget_quantiles` of the true CSC of training-text continuations
    (first `prompt_tokens` tokens = prompt, 1..max_new_tokens counted): what Table I scores. The range
    generation accepts spans `trained.budget_range` and the continuations."""
    cont = continuation_totals(csc.train_ids, csc.train_csc, g.prompt_tokens, g.max_new_tokens, scale)
    if g.budgets:
        targets, source = list(g.budgets), "generation.budgets"
    else:
        targets = [float(np.quantile(cont, q)) for q in budget_quantiles]
        source = (f"quantiles {list(budget_quantiles)} of the true CSC of {cont.size} training-text continuations "
                  f"(first {g.prompt_tokens} tokens = prompt, 1..{g.max_new_tokens} tokens counted)")
    names = level_names(len(targets))
    low, high = trained.budget_range
    budget_range = (min(low, float(cont.min())), max(high, float(cont.max())))
    return BudgetLevels(dict(zip(names, targets)), source, budget_range, cont, list(trained.targets))


def targets_per_scale(csc: CSCData, g: GenerationConfig, budget_quantiles: Sequence[float], scale: str,
                      budgets: dict[str, float], scales: Sequence[str] | None = None) -> tuple[dict, dict[str, float]]:
    """Budgets per CSC scale (`scales`, default `g.verified_scales`) for the verified rows, and each scale's
    CSC per generated token (the controller's first probe, the token-count rule's rate). The configured
    `scale` keeps the evaluation's budgets; the other is given the same quantiles of its own continuation totals."""
    by_scale, hints = {}, {}
    ones = np.ones(1 + max(max(ids) for ids in csc.train_ids))
    for other in (g.verified_scales if scales is None else scales):
        lengths, totals = continuation_points(csc.train_ids, csc.train_csc, ones, g.prompt_tokens, other,
                                              max_tokens=g.max_new_tokens)
        if totals.size < 3:
            lengths, totals = continuation_points(csc.train_ids, csc.train_csc, ones, g.prompt_tokens, other)
        hints[other] = float(np.median(totals / lengths)) if totals.size else 0.0
        if other == scale:
            by_scale[other] = dict(budgets)
        else:
            by_scale[other] = {name: float(np.quantile(totals, q)) for name, q in zip(budgets, budget_quantiles)}
    return by_scale, hints


def continuation_points(ids_list: Sequence[Sequence[int]], csc_list: Sequence[np.ndarray], token_costs: np.ndarray,
                        prompt_tokens: int, scale: str = "raw", max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(C_vocab spend, true CSC) of each text's continuation after its first `prompt_tokens` tokens.

    The texts' cached labels were computed on the full text, so each point counts exactly what a
    generation counts: the tokens after the prompt, scored in the context of prompt + continuation.
    Texts with no continuation, more than `max_tokens` continuation tokens (when given) or an
    unlabelled continuation token are skipped.
    """
    costs = np.asarray(token_costs, dtype=np.float64)
    xs, ys = [], []
    for ids, lab in zip(ids_list, csc_list):
        lab = np.asarray(lab, dtype=np.float64)
        if len(ids) <= prompt_tokens or not np.all(np.isfinite(lab[prompt_tokens:])):
            continue
        if max_tokens is not None and len(ids) - prompt_tokens > max_tokens:
            continue
        xs.append(float(costs[np.asarray(ids[prompt_tokens:], dtype=np.int64)].sum()))
        ys.append(float(lab[prompt_tokens:].sum() * length_factor(scale, len(ids))))
    return np.asarray(xs), np.asarray(ys)


def continuation_totals(ids_list, csc_list, prompt_tokens: int, max_new_tokens: int, scale: str = "raw") -> np.ndarray:
    """True CSC totals of training-text continuations of 1..max_new_tokens tokens after the first `prompt_tokens`.

    What a generation of that length would be scored on (the same counting rule), hence the natural
    source of generation budgets; falls back to continuations of any length when fewer than 3 fit.
    """
    lengths = np.array([len(x) - prompt_tokens for x in ids_list])
    keep = [(i, l) for i, l in enumerate(lengths) if 1 <= l <= max_new_tokens]
    if len(keep) < 3:
        keep = [(i, l) for i, l in enumerate(lengths) if l >= 1]
    idx = [i for i, _ in keep]
    _, y = continuation_points([ids_list[i] for i in idx], [csc_list[i] for i in idx],
                               np.zeros(1 + max(max(ids_list[i]) for i in idx)) if idx else np.zeros(1),
                               prompt_tokens, scale)
    if y.size < 3:
        raise DataError(f"only {y.size} labelled training texts are longer than generation.prompt_tokens={prompt_tokens}: "
                        f"label more texts or shorten the prompts")
    return y


def fit_continuation_calibration(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, budgets: Sequence[float] = ()):
    """Affine `csc = a + b * proxy` on continuation points (eq. 21's ridge fit).

    If the fit's slope is not positive (proxy and CSC do not rise together on these points, which an
    undertrained cost model can show), a budget cannot be inverted through it: the fallback is the
    ratio map through the origin, b = sum(y) / sum(x), a = 0. The same fallback applies when one of
    `budgets` (CSC) would map to a proxy budget <= 0 (a budget below the intercept). Returns
    (ProxyCalibration, how it was made).
    """
    if x.size < 2 or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise DataError(f"{x.size} continuation points: label more training texts longer than generation.prompt_tokens")
    fit = OnlineAffine(1, ridge).update(x, y).fit()
    return affine_or_ratio(float(fit.a[0]), float(fit.b[0]), float(y.sum() / x.sum()), budgets, fit="ridge")


def sampled_proxy_rate(samples) -> float:
    """Mean proxy cost (C_vocab) per token of a model's own unbudgeted generations.

    What sizes the budgeted decodings' token cap and says whether a level is reachable (`token_cap`): the
    generator's text can be cheaper per token than training text (the cpu run's samples spent ~0.0028 proxy
    per token against ~0.0038 on training continuations), and a cap sized from training text stopped its
    high level at the context's end while reporting it reachable.
    """
    tokens = sum(len(x.generated_ids) for x in samples)
    spent = sum(x.spent_proxy for x in samples)
    if tokens == 0 or not spent > 0:
        raise DataError(f"{len(samples)} unbudgeted samples spent {spent!r} proxy over {tokens} tokens: no rate to "
                        "size the token cap (every sample ended at once?): check the backbone and the prompts")
    return spent / tokens


def decoding_calibration(model, g: GenerationConfig, scale: str, ridge: float, train_ids, train_csc, budgets: Sequence[float]):
    """The calibration (proxy <-> CSC map) steered decoding maps its budgets through (`generation.calibration`:
    the model's own, else a fit on training continuations), and a note on how it was made.

    `ridge` is eq. 21's gamma (`train.calib_ridge`); `scale` the CSC scale of the budgets.
    """
    if g.calibration == "model":
        calibration, how = model.proxy_calibration_for(budgets)
        return calibration, f"model ({how})"
    # The same continuations the budgets come from (1..max_new_tokens tokens), else any length.
    costs = model_token_costs(model).numpy()
    x, y = continuation_points(train_ids, train_csc, costs, g.prompt_tokens, scale, max_tokens=g.max_new_tokens)
    if x.size < 3:
        x, y = continuation_points(train_ids, train_csc, costs, g.prompt_tokens, scale)
    cal, how = fit_continuation_calibration(x, y, ridge, budgets)
    return cal, f"continuation {how} on {x.size} training texts"
