"""MetabolicGPT-2 (paper IV.D): a GPT-2 backbone with a token-cost model and a budget pathway.

Parts, with shapes (V vocabulary, H hidden size, K cost dimensions):

* cost head g (eq. 12): Linear(H, K) -> s x Softplus, read on per-position hidden states;
* learnable token costs w [V, K] (eq. 13): c_token(v) = s x Softplus(w_v), initialised so that every
  cost is `token_cost_init` (paper: about 0.05), or `token_cost_init` x the synthetic prior
  (mean 1, so the same mean) when a prior is given;
* s = `cost_scale`, proxy units per unit of Softplus. s = 1 is the paper as written. At CSC's
  per-token scale (~1e-2 on short texts, ~2e-3 on 256-token ones) that puts every Softplus on its
  flat tail, where its slope is about the cost itself: gradients reaching the logits are ~100x
  smaller than at an O(1) scale, and an Adam step moves a cost by a fixed fraction of itself. The
  scaled parameterisation sets s to the mean per-token CSC label of the training texts, so the
  logits are O(1) and their learning rate means the same at every CSC scale;
* with `standardise_head` (the scaled parameterisation) the cost head reads standardised inputs:
  hidden states minus a fixed per-dimension mean, over a fixed sd (buffers measured once on the
  training texts before training, `set_head_standardisation`), and embeddings standardised by
  their own per-dimension mean and sd over the vocabulary. GPT-2's final hidden states differ in
  scale by ~7x between dimensions, which leaves a linear head badly conditioned under Adam: with raw
  inputs it barely learns in tens of steps, with standardised ones it reaches a ridge probe's
  held-out rank correlation (README, measured facts);
* `cost_grad_to_backbone=False` (the scaled parameterisation) reads the backbone's states for the
  costs without gradient into the backbone (the budget bias keeps its own): in scaled units L_CSC is
  O(1), and through the states it bent the language model (smoke: validation perplexity +10%);
* vocabulary cost map (eq. 14): C_vocab(v) = max(vocab_cost_min, a_mix c_token(v) + (1 - a_mix) c_head(e_v)),
  e_v the input embedding of v -> `vocab_costs()` [V, K];
* per-token proxy cost of the token at position t in its context: the same mix with the hidden
  state in place of the embedding, c_t = max(vocab_cost_min, a_mix c_token(x_t) + (1 - a_mix) c_head(h_t));
  so C_vocab is exactly the context-free version of the cost that CSC supervises;
* budget encoder (eq. 15-16): u = W_bud log(1 + B / scale), added to the final hidden states
  (after `ln_f`, before the LM head); `per_layer_budget=True` also adds its own projection to the
  residual stream entering every block (the paper's "future work"). W_bud starts at zero, so an
  untrained MetabolicGPT-2 predicts exactly what its backbone predicts;
* buffers: the dual variable lambda [K], calibration a [K] and b [K] (eq. 17), the calibration's
  running statistics, and the budget scale (median total CSC of the training texts).

Two variants (README, measured facts), fixed at construction and saved with the model:

* `faithful` (the paper as written): the cost head reads the hidden states that carry the budget
  bias, so the budget can change cost estimates; training holds the cost to a constant budget.
* `expected-cost` (ours): the cost head reads the hidden states *before* the budget bias, so the
  budget cannot change what a token in context costs; training constrains the expected cost of the
  next-token distribution, sum_t <p(. | x_<t, B), C_vocab>, under budgets that vary per sequence.
  With per-layer injection the hidden states carry the budget, so costs are then read from a second,
  budget-free pass without gradient into the backbone (documented cost: one extra forward pass).

Reading of K (the paper: K = 3, budgets [5.24, 7.48, 9.73] "one per dimension", Table I one row per
budget). We read the K dimensions as K *tiers* of one quantity: every dimension is a proxy for the
same CSC (all are supervised with the same labels) and dimension k is held to budget B_k. A budget
is therefore either a K-vector (the faithful training vector: all tiers at once) or one scalar CSC
budget, which conditions on one level at a time: `budget=[batch]` means "B in every dimension"
(`budget_vector`). Generation conditions on one level per run; its achieved proxy cost is the mean
over the K dimensions (`proxy_total`), which in the expected-cost variant are trained alike.

Public API used by generation (all tensors on the model's device):

    model = MetabolicGPT2.from_pretrained(folder)            # everything restored, eval mode
    out = model(input_ids, budget=torch.tensor([1.4]))       # budget [batch] (one level) or [batch, K]
    out.logits          # [batch, T, V]: next-token logits under the budget
    out.token_costs     # [batch, T, K]: proxy cost of each given token in its context (proxy units)
    out.past_key_values # with use_cache=True, for incremental decoding
    model.vocab_costs() # [V, K]: C_vocab, the cost of each candidate next token (proxy units)
    model.proxy_total(costs)            # [..., K] -> [...]: mean over the K dimensions
    model.proxy_calibration()           # the one proxy <-> CSC map (eq. 17): .to_csc(x), .to_proxy(B)
    model.budget_vector(b, batch=n)     # validated [n, K] conditioning vector (DataError on <= 0, NaN, wrong K)
    model.hidden_and_costs(ids, budget) # forward without the LM head: (hidden [b, T, H], costs, cache)
    model.training_info                 # {"budget_range": [lo, hi], "targets": [...], "variant": ...}
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from metabolic.core.artefacts import atomic_write_bytes, atomic_write_json, read_json
from metabolic.core.budget import ProxyCalibration, affine_or_ratio, proxy_budgets_per_dimension
from metabolic.core.errors import ConfigError, DataError
from metabolic.model.backbone import load_backbone
from metabolic.model.calibration import OnlineAffine

SETTINGS_FILE = "metabolic_config.json"
STATE_FILE = "metabolic.safetensors"
CALIBRATION_FILE = "calibration_state.json"
TRAINING_INFO_FILE = "training_info.json"  # budgets the model was trained on (targets, range)
VARIANTS = ("faithful", "expected-cost")


def inverse_softplus(y: torch.Tensor | float) -> torch.Tensor:
    """x with Softplus(x) = y, for y > 0 (stable for small and large y)."""
    y = torch.as_tensor(y, dtype=torch.float64)
    return torch.where(y > 20, y, torch.log(torch.expm1(y)))


def _cache_argument() -> str:
    from transformers import GPT2Model

    return "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


CACHE_ARG = _cache_argument()


@dataclass(frozen=True)
class MetabolicSettings:
    """Everything that defines the cost and budget parts (saved as `metabolic_config.json`)."""

    variant: Literal["faithful", "expected-cost"] = "expected-cost"
    K: int = 3
    a_mix: float = 0.5
    vocab_cost_min: float = 1e-4  # floor of every proxy cost, in proxy (CSC-like) units (train.vocab_cost_min)
    budget_scale: float = 1.0  # median total CSC of the training texts (eq. 15's "scale")
    per_layer_budget: bool = False
    token_cost_init: float = 0.05  # every cost at initialisation, in proxy units
    calib_ridge: float = 1e-3
    cost_scale: float = 1.0  # s: costs = s x Softplus(logit), proxy units (1 = the paper's parameterisation)
    standardise_head: bool = False  # the cost head reads standardised states / embeddings (the paper: raw)
    cost_grad_to_backbone: bool = True  # cost losses reach the backbone through the states (the paper: yes)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant={self.variant!r} is invalid: choose one of {', '.join(VARIANTS)}")
        if not (isinstance(self.K, int) and self.K >= 1):
            raise ConfigError(f"K={self.K!r} is invalid: use a number of cost dimensions >= 1")
        if not (0 <= self.a_mix <= 1):
            raise ConfigError(f"a_mix={self.a_mix!r} is invalid: use a value in [0, 1]")
        for name in ("budget_scale", "token_cost_init", "cost_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value!r} is invalid: use a finite value > 0")
        if not (math.isfinite(self.vocab_cost_min) and self.vocab_cost_min >= 0):
            raise ConfigError(f"vocab_cost_min={self.vocab_cost_min!r} is invalid: use a finite floor >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetabolicSettings":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DataError(f"{SETTINGS_FILE} has unknown keys {unknown}: it was written by another version of metabolic")
        return cls(**data)


@dataclass
class MetabolicOutput:
    logits: torch.Tensor  # [batch, T, V]
    token_costs: torch.Tensor  # [batch, T, K], proxy units
    hidden: torch.Tensor  # [batch, T, H], final hidden states after the budget bias
    past_key_values: Any = None


class MetabolicGPT2(nn.Module):
    """GPT-2 + cost head + token costs + budget pathway + lambda and calibration buffers (see module doc)."""

    def __init__(self, backbone, settings: MetabolicSettings, prior_cost: Optional[np.ndarray] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.settings = settings
        cfg = backbone.config
        vocab, hidden, k = cfg.vocab_size, cfg.n_embd, settings.K
        dtype = next(backbone.parameters()).dtype
        device = next(backbone.parameters()).device
        self.cost_head = nn.Linear(hidden, k, device=device, dtype=dtype)
        # Zero weights and a bias at Softplus^-1(init / s): every head cost starts at `token_cost_init`.
        unit_init = settings.token_cost_init / settings.cost_scale
        nn.init.zeros_(self.cost_head.weight)
        nn.init.constant_(self.cost_head.bias, float(inverse_softplus(unit_init)))
        if prior_cost is not None:
            prior = torch.as_tensor(np.asarray(prior_cost, dtype=np.float64))
            if prior.shape != (vocab,) or not torch.all(torch.isfinite(prior) & (prior > 0)):
                raise DataError(f"prior cost has shape {tuple(prior.shape)}: give {vocab} finite costs > 0 (one per token)")
            init = inverse_softplus(unit_init * prior / prior.mean())[:, None].expand(vocab, k)
        else:
            init = inverse_softplus(unit_init).expand(vocab, k)
        self.token_cost_logits = nn.Parameter(init.to(device=device, dtype=dtype).clone())
        self.budget_proj = nn.Linear(k, hidden, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.budget_proj.weight)  # u = 0 at the start: the backbone is unchanged
        self.layer_budget_proj = nn.ModuleList()
        if settings.per_layer_budget:
            for _ in range(cfg.n_layer):
                proj = nn.Linear(k, hidden, bias=False, device=device, dtype=dtype)
                nn.init.zeros_(proj.weight)
                self.layer_budget_proj.append(proj)
        self.register_buffer("dual_lambda", torch.zeros(k, dtype=torch.float64, device=device))
        self.register_buffer("calib_a", torch.zeros(k, dtype=torch.float64, device=device))
        self.register_buffer("calib_b", torch.ones(k, dtype=torch.float64, device=device))
        self.register_buffer("budget_ratio", torch.ones(k, dtype=torch.float64, device=device))  # mean CSC / mean proxy
        # The cost head's input standardisation for hidden states (identity until set; see module doc).
        self.register_buffer("head_in_mean", torch.zeros(hidden, dtype=dtype, device=device))
        self.register_buffer("head_in_std", torch.ones(hidden, dtype=dtype, device=device))
        self.calibration_stats = OnlineAffine(k, settings.calib_ridge)
        self.training_info: dict[str, Any] = {}  # e.g. {"budget_range": [lo, hi], "targets": [...]}, set by training
        self._layer_bias: list[torch.Tensor] | None = None
        self._hooks = [block.register_forward_pre_hook(self._make_hook(i)) for i, block in enumerate(backbone.transformer.h)]

    # --- budget pathway ------------------------------------------------------------------------

    def _make_hook(self, index: int):
        def hook(module, args):
            if self._layer_bias is None:
                return None
            return (args[0] + self._layer_bias[index][:, None, :].to(args[0].dtype), *args[1:])

        return hook

    @property
    def device(self) -> torch.device:
        return self.cost_head.weight.device

    def budget_vector(self, budget: Any, batch: int | None = None) -> torch.Tensor:
        """Validate a budget in CSC units and return it as float [batch, K].

        [batch] (or a scalar with `batch`) = one level per sequence, repeated over the K dimensions;
        [batch, K] = one budget per dimension. Budgets must be finite and > 0.
        """
        k = self.settings.K
        b = torch.as_tensor(budget, dtype=torch.float32, device=self.device)
        if b.ndim == 0:
            if batch is None:
                raise DataError(f"budget={float(b)!r} is a scalar: give [batch] or [batch, {k}] budgets, or pass batch=")
            b = b.expand(batch)
        if b.ndim == 1:
            b = b[:, None].expand(-1, k)
        if b.ndim != 2 or b.shape[1] != k:
            raise DataError(f"budget has shape {tuple(b.shape)}: give [batch] or [batch, K={k}] budgets in CSC units")
        if batch is not None and b.shape[0] != batch:
            raise DataError(f"budget has {b.shape[0]} rows for a batch of {batch}: give one budget (row) per sequence")
        if not bool(torch.all(torch.isfinite(b) & (b > 0))):
            bad = b[~(torch.isfinite(b) & (b > 0))][0].item()
            raise DataError(f"budget {bad!r} is invalid: budgets are CSC totals and must be finite and > 0")
        return b

    def encode_budget(self, budget: torch.Tensor) -> torch.Tensor:
        """Eq. (15): log(1 + B / scale), [batch, K]."""
        return torch.log1p(budget / self.settings.budget_scale)

    def budget_inputs(self, budget: Any, batch: int) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Eq. (16)'s budget biases for a batch: u = W_bud log(1 + B / scale) [batch, H], added before the LM
        head, and with `per_layer_budget` one bias [batch, H] per block (else None)."""
        enc = self.encode_budget(self.budget_vector(budget, batch=batch)).to(self.cost_head.weight.dtype)
        layer_bias = [proj(enc) for proj in self.layer_budget_proj] if self.settings.per_layer_budget else None
        return self.budget_proj(enc), layer_bias

    @contextlib.contextmanager
    def conditioned_on(self, budget_csc: torch.Tensor | None):
        """Make `self.backbone`'s logits those of `self(..., budget=budget_csc)` while inside the block.

        A pre-hook on `lm_head` adds `u` per batch row (and the per-layer biases go before every block),
        so `self.backbone.generate()` samples from exactly the MetabolicGPT-2 distribution.
        `budget_csc=None` leaves the backbone unconditioned.
        """
        if budget_csc is None:
            yield
            return
        with torch.no_grad():
            u, layer_bias = self.budget_inputs(torch.as_tensor(budget_csc, dtype=torch.float32), len(budget_csc))

        def add_budget(module, args):
            h = args[0]
            return (h + _rows_2d(u, h.shape[0]).to(h.dtype)[:, None, :], *args[1:])

        handle = self.backbone.lm_head.register_forward_pre_hook(add_budget)
        self._layer_bias = layer_bias
        try:
            yield
        finally:
            handle.remove()
            self._layer_bias = None

    # --- costs ---------------------------------------------------------------------------------

    def scaled_softplus(self, logits: torch.Tensor) -> torch.Tensor:
        """s x Softplus(logits): a cost in proxy units from a logit (s = `cost_scale`)."""
        return self.settings.cost_scale * F.softplus(logits)

    def set_head_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the per-dimension mean and sd [H] that standardise the hidden states the cost head reads."""
        if mean.shape != self.head_in_mean.shape or std.shape != self.head_in_std.shape or not bool(torch.all(std > 0)):
            raise DataError(f"head standardisation needs a mean and a positive sd of shape {tuple(self.head_in_mean.shape)}")
        self.head_in_mean.copy_(mean)
        self.head_in_std.copy_(std)

    def head_costs(self, states: torch.Tensor) -> torch.Tensor:
        """c_head = s x Softplus(g(states)) [..., K] for hidden states [..., H] (standardised when set)."""
        if self.settings.standardise_head:
            states = (states - self.head_in_mean.to(states.dtype)) / self.head_in_std.to(states.dtype)
        return self.scaled_softplus(self.cost_head(states))

    def token_cost_table(self) -> torch.Tensor:
        """c_token(v) = s x Softplus(w_v), [V, K]."""
        return self.scaled_softplus(self.token_cost_logits)

    def mix_costs(self, c_token: torch.Tensor, c_head: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return torch.clamp_min(s.a_mix * c_token + (1.0 - s.a_mix) * c_head, s.vocab_cost_min)

    def costs_at(self, ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Per-token proxy costs [..., K] of tokens `ids` [...] read on hidden `states` [..., H] (module doc)."""
        return self.mix_costs(self.token_cost_table()[ids], self.head_costs(states))

    def vocab_costs(self) -> torch.Tensor:
        """Eq. (14): C_vocab [V, K] in proxy units.

        The embeddings e_v are read detached: they are tied to the LM head, and cost losses must make
        a token cheaper through its cost parameters, not by moving what the LM head predicts.
        """
        wte = self.backbone.transformer.wte.weight.detach()
        if self.settings.standardise_head:  # embeddings by their own statistics (another space than h)
            wte = (wte - wte.mean(0)) / wte.std(0).clamp_min(1e-6)
        return self.mix_costs(self.token_cost_table(), self.scaled_softplus(self.cost_head(wte)))

    def proxy_total(self, costs: torch.Tensor) -> torch.Tensor:
        """One proxy number per item: the mean over the K dimensions ([..., K] -> [...])."""
        return costs.mean(dim=-1)

    def proxy_calibration(self) -> ProxyCalibration:
        """The calibration as one map on sequence totals: the mean of the K (a, b) pairs and of the K ratios
        through `core.budget.affine_or_ratio` (the rule `budget_in_proxy` applies per dimension)."""
        return self.proxy_calibration_for(())[0]

    def proxy_calibration_for(self, budgets_csc) -> tuple[ProxyCalibration, str]:
        """`proxy_calibration` where it maps every one of `budgets_csc` to a spend > 0, else the ratio map; and how."""
        return affine_or_ratio(float(self.calib_a.mean()), float(self.calib_b.mean()), float(self.budget_ratio.mean()),
                               budgets_csc, fit="training calibration")

    def budget_in_proxy(self, budgets_csc: torch.Tensor) -> torch.Tensor:
        """CSC budgets [b, K] in proxy units through each dimension's calibration, (B - a_k) / b_k, floored at 0.

        A dimension whose slope is not positive (proxy and CSC totals not rising together, as on the raw
        scale of short texts) takes the ratio map B / r_k, r_k = mean CSC / mean proxy of the calibration's
        points: without it a constant offset between the two is left for the constraint to push against
        (`core.budget.proxy_budgets_per_dimension`). Identity before any point."""
        dtype = budgets_csc.dtype
        return proxy_budgets_per_dimension(budgets_csc, self.calib_a.to(dtype), self.calib_b.to(dtype),
                                           self.budget_ratio.to(dtype))

    def set_calibration(self, a: np.ndarray, b: np.ndarray) -> None:
        self.calib_a.copy_(torch.as_tensor(a, dtype=torch.float64))
        self.calib_b.copy_(torch.as_tensor(b, dtype=torch.float64))

    def refit_calibration(self) -> None:
        """Refit (a, b) from the running statistics (eq. 21); identity (0, 1) before any point."""
        fit = self.calibration_stats.fit()
        self.set_calibration(fit.a, fit.b)
        c = self.calibration_stats
        ratio = np.divide(c.mean_y, c.mean_x, out=np.ones(c.k), where=(c.mean_x > 0) & (c.mean_y > 0))
        self.budget_ratio.copy_(torch.as_tensor(ratio, dtype=torch.float64))

    # --- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        budget: Any,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> MetabolicOutput:
        """Logits under `budget` (CSC units, [batch] or [batch, K]) and per-token proxy costs."""
        h_budget, token_costs, past = self.hidden_and_costs(input_ids, budget, attention_mask, past_key_values, use_cache)
        return MetabolicOutput(logits=self.backbone.lm_head(h_budget), token_costs=token_costs, hidden=h_budget,
                               past_key_values=past)

    def hidden_and_costs(
        self,
        input_ids: torch.Tensor,
        budget: Any,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`forward` without the LM head: final hidden states under the budget [batch, T, H], per-token
        costs [batch, T, K] and the cache. Training applies the LM head to real positions only."""
        if input_ids.ndim != 2:
            raise DataError(f"input_ids has shape {tuple(input_ids.shape)}: give [batch, T] token ids")
        u, self._layer_bias = self.budget_inputs(budget, input_ids.shape[0])
        try:
            # the cache under the name this transformers release takes (`cache` since 5.2x, which warns on
            # `past_key_values`; the GPU image's 5.17 knows only `past_key_values`), and only when there is one
            cache = {CACHE_ARG: past_key_values} if past_key_values is not None else {}
            out = self.backbone.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **cache)
        finally:
            self._layer_bias = None
        h = out.last_hidden_state
        h_budget = h + u[:, None, :]
        h_cost = h if self.settings.cost_grad_to_backbone else h.detach()
        if self.settings.variant == "faithful":
            cost_states = h_cost + u[:, None, :]  # the paper: costs read on states that carry the budget
        elif self.settings.per_layer_budget:
            with torch.no_grad():  # budget-free states: one extra pass (see module doc)
                cost_states = self.backbone.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            cost_states = h_cost  # before the budget bias: the budget cannot change a token's cost
        token_costs = self.costs_at(input_ids, cost_states)
        return h_budget, token_costs, (out.past_key_values if use_cache else None)

    # --- save / load ---------------------------------------------------------------------------

    def cost_state_dict(self) -> dict[str, torch.Tensor]:
        """Every non-backbone tensor (parameters and buffers)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Backbone via `save_pretrained` plus cost parts, settings and calibration state, each written atomically."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.cost_state_dict().items()}
        atomic_write_bytes(folder / STATE_FILE, save(tensors))
        atomic_write_json(folder / CALIBRATION_FILE, self.calibration_stats.state_dict())
        atomic_write_json(folder / TRAINING_INFO_FILE, self.training_info)
        atomic_write_json(folder / SETTINGS_FILE, asdict(self.settings))  # last: its presence marks a complete save
        return folder

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device | None = None, expected: MetabolicSettings | None = None
    ) -> "MetabolicGPT2":
        """Load a saved MetabolicGPT-2; `expected` settings, when given, must match the saved ones."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / SETTINGS_FILE).is_file() or not (folder / STATE_FILE).is_file():
            raise DataError(f"{folder} is not a saved MetabolicGPT-2 (no {SETTINGS_FILE} or {STATE_FILE}): "
                            f"run the train stage (python -m metabolic run --stages train)")
        settings = MetabolicSettings.from_dict(read_json(folder / SETTINGS_FILE))
        if expected is not None and settings != expected:
            diff = {f.name: (getattr(settings, f.name), getattr(expected, f.name))
                    for f in fields(settings) if getattr(settings, f.name) != getattr(expected, f.name)}
            raise DataError(f"checkpoint {folder} was made with another config (saved vs expected: {diff}): "
                            f"retrain or load it without the expected settings")
        backbone = load_backbone(folder, device=device)
        model = cls(backbone, settings)
        state = load_file(str(folder / STATE_FILE))
        own = model.cost_state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise DataError(f"{folder / STATE_FILE} does not match the model's cost parts (another vocabulary or K?): retrain")
        model.load_state_dict({**model.backbone.state_dict(prefix="backbone."), **state}, strict=True)
        if (folder / CALIBRATION_FILE).is_file():
            model.calibration_stats = OnlineAffine.from_state_dict(read_json(folder / CALIBRATION_FILE))
        model.training_info = read_training_info(folder)
        return model.eval()


def read_training_info(folder: str | Path) -> dict[str, Any]:
    """A saved model's `training_info` (budgets, the cost warm-up, the a_mix choice) without loading it; {} if none."""
    path = Path(folder) / TRAINING_INFO_FILE
    return read_json(path) if path.is_file() else {}


def _rows_2d(values: torch.Tensor, n_rows: int) -> torch.Tensor:
    """`values` [b, H] repeated to `n_rows` rows (each budget row for n_rows / b consecutive batch rows)."""
    if values.shape[0] == n_rows:
        return values
    if n_rows % values.shape[0] == 0:
        return values.repeat_interleave(n_rows // values.shape[0], dim=0)
    raise ConfigError(f"{values.shape[0]} budgets for {n_rows} batch rows: give one budget per prompt")
