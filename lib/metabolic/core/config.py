"""Study configuration: one frozen, validated dataclass per stage, composed into `StudyConfig`.

Every value a stage reads lives here, with its unit and a why-comment where the choice matters.
Named profiles (`smoke`, `cpu`, `gpu`, `paper`) are in `metabolic.core.profiles`; overrides use dotted keys,
`"train.epochs=3"` on the CLI or `{"train.epochs": 3}` from a papermill parameter.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from metabolic.core.budget import SCALES, Scale
from metabolic.core.errors import ConfigError


def _require(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def _finite(section: str, obj: Any) -> None:
    """Every float of a section (and of its tuples) is finite: no value of the study means infinity or NaN."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section}.{f.name}={value!r} is invalid: use a finite number")


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value is not None and value > 0, f"{section}.{name}", value, "use a value > 0")


def _finite_positive_tuple(key: str, values: tuple, allow_empty: bool = False) -> None:
    _require(allow_empty or len(values) > 0, key, values, "give at least one value")
    for v in values:
        _require(
            isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
            key,
            values,
            "every entry must be a finite number > 0",
        )


@dataclass(frozen=True)
class AssetsConfig:
    """Where the three public assets come from (see `metabolic.core.assets` for the resolution order)."""

    # Hub dataset id and config of WikiText-2; offline, `$METABOLIC_ASSETS/wikitext-2` is used.
    wikitext_dataset: str = "Salesforce/wikitext"
    wikitext_config: str = "wikitext-2-raw-v1"
    # "auto": the assets folder when METABOLIC_ASSETS is set, else the Hub via `datasets`.
    wikitext_source: Literal["auto", "hub", "assets"] = "auto"
    tokenizer: str = "gpt2"  # Hub id or a folder that `from_pretrained` loads
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"  # Hub id or a folder

    def __post_init__(self) -> None:
        _finite("assets", self)
        for name in ("wikitext_dataset", "wikitext_config", "tokenizer", "encoder"):
            _require(bool(getattr(self, name).strip()), f"assets.{name}", getattr(self, name), "give a non-empty id or folder")


@dataclass(frozen=True)
class CorpusConfig:
    """WikiText-2 texts (non-empty lines), GPT-2 tokenized, capped and subsampled per profile."""

    seq_len: int = 256  # tokens per text; the paper caps at 256 (excluding the final label token)
    max_train_texts: Optional[int] = None  # None = all 23,767 training texts
    max_valid_texts: Optional[int] = None  # None = all 2,461 validation texts
    min_tokens: int = 2  # texts shorter than this carry no next-token target and no counterfactual
    seed: int = 0  # subsampling seed: the same seed picks the same texts on every machine

    def __post_init__(self) -> None:
        _finite("corpus", self)
        _positive("corpus", self, "seq_len", "min_tokens")
        _require(self.seq_len >= self.min_tokens, "corpus.seq_len", self.seq_len, f"must be >= corpus.min_tokens={self.min_tokens}")
        for name in ("max_train_texts", "max_valid_texts"):
            v = getattr(self, name)
            _require(v is None or v > 0, f"corpus.{name}", v, "use None (all texts) or a count > 0")


@dataclass(frozen=True)
class BackboneConfig:
    """The GPT-2 backbone: a Hub id / folder (`source`), or pretrained from scratch by notebook 00."""

    # "pretrain": train the architecture below on the corpus; anything else is passed to
    # `GPT2LMHeadModel.from_pretrained` (Hub id such as "gpt2", or a local folder).
    source: str = "pretrain"
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 2
    block_size: int = 64  # pretraining packs texts (joined by <|endoftext|>) into blocks of this many tokens
    # What pretraining reads: "profile" = the profile's training texts (corpus.max_train_texts, capped at
    # corpus.seq_len); "all" = every WikiText-2 training text, whole (the CSC and Lagrangian stages still
    # use the profile's texts).
    corpus: Literal["profile", "all"] = "profile"
    batch_size: int = 8  # blocks per optimiser step
    epochs: int = 1
    max_steps: Optional[int] = None  # cap on optimiser steps (None = epochs decide)
    lr: float = 1e-3  # peak AdamW learning rate; small from-scratch models tolerate a high one
    warmup_steps: int = 10  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50  # steps between validation-perplexity evaluations (also at the end)
    max_eval_blocks: int = 64  # validation blocks per evaluation (bounded so evaluation stays cheap)
    checkpoint_every: int = 100  # steps between resumable checkpoints
    seed: int = 0

    def __post_init__(self) -> None:
        _finite("backbone", self)
        _require(bool(self.source.strip()), "backbone.source", self.source, 'use "pretrain", a Hub id or a folder')
        _positive("backbone", self, "n_layer", "n_embd", "n_head", "block_size", "batch_size", "epochs", "lr",
                  "eval_every", "max_eval_blocks", "checkpoint_every", "grad_clip")
        _require(self.corpus in ("profile", "all"), "backbone.corpus", self.corpus, 'use "profile" or "all"')
        # sizes no machine of this study could train (GPT-2 XL is 48 x 1600): n_embd = 131072 asked for 26 GB at once
        _require(self.n_embd <= 8192, "backbone.n_embd", self.n_embd, "use <= 8192 (GPT-2 small is 768, XL 1600)")
        _require(self.n_layer <= 96, "backbone.n_layer", self.n_layer, "use <= 96 (GPT-2 small has 12, XL 48)")
        _require(self.block_size <= 8192, "backbone.block_size", self.block_size, "use <= 8192 tokens (GPT-2 has 1024)")
        _require(self.n_embd % self.n_head == 0, "backbone.n_embd", self.n_embd, f"must be divisible by backbone.n_head={self.n_head}")
        _require(self.max_steps is None or self.max_steps > 0, "backbone.max_steps", self.max_steps, "use None or > 0")
        _require(self.warmup_steps >= 0, "backbone.warmup_steps", self.warmup_steps, "use >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "backbone.min_lr_ratio", self.min_lr_ratio, "use a ratio in [0, 1]")
        _require(self.weight_decay >= 0, "backbone.weight_decay", self.weight_decay, "use >= 0")


@dataclass(frozen=True)
class PriorConfig:
    """Synthetic energy prior, paper eq. (8): alpha / (f(v) + eps) + beta * len(v), mean 1, floor c_min."""

    alpha: float = 1e-6  # weight of rarity; f is a relative frequency, so alpha/f(v) ~ 1 for a hapax in ~1M tokens
    beta: float = 0.1  # weight of decoded character length
    eps: float = 1e-9  # numerical guard only: unseen tokens are handled by `unseen_pseudo_count`
    # Unseen tokens (count 0) are counted as if seen this many times, so they cost what the rarest
    # observed tokens cost and never more (with f = 0, alpha/eps would dwarf the whole vocabulary).
    unseen_pseudo_count: float = 1.0
    c_min: float = 0.3  # floor: no token is almost free
    heading_penalty: float = 1.0  # added (after scaling) to heading/metadata-like tokens, see prior.py
    apply_heading_penalty: bool = True

    def __post_init__(self) -> None:
        _finite("prior", self)
        _positive("prior", self, "alpha", "eps", "unseen_pseudo_count")
        # alpha / f(v) with f down to ~1e-7 and beta x a token's length are summed in float64 and normalised:
        # beyond ~1e3 the normalisation cannot converge (alpha = 1e300 overflowed it)
        _require(self.alpha <= 1e3, "prior.alpha", self.alpha, "use a weight in (0, 1e3]; the default 1e-6 weighs a hapax ~1")
        _require(0 <= self.beta <= 1e3, "prior.beta", self.beta, "use a weight in [0, 1e3] per character")
        _require(0 <= self.c_min < 1, "prior.c_min", self.c_min, "use a floor in [0, 1): the mean is normalised to 1")
        _require(self.heading_penalty >= 0, "prior.heading_penalty", self.heading_penalty, "use >= 0")


@dataclass(frozen=True)
class CSCConfig:
    """Counterfactual semantic cost labels (paper IV.C, V.A)."""

    max_sequences: int = 20000  # training texts labelled (the paper: CSC statistics over 20000 samples)
    max_valid_sequences: int = 500  # validation texts labelled (evaluation and calibration)
    positions: Literal["all", "subset"] = "all"  # label every position, or a seeded subset per text
    positions_per_sequence: int = 32  # with positions="subset"
    # Counterfactual texts per encoder batch. Not in the CSC cache key: labels at any batch size agree
    # to < 1e-6 (padding changes float rounding only; see pipeline.csc.csc_description_keys).
    batch_size: int = 256
    precision: Literal["fp32", "tf32", "fp16"] = "fp32"  # reduced precision only on CUDA (see csc.py)
    scale: Scale = "raw"  # "length": T x CSC_t, totals that grow with content (metabolic.core.budget)
    seed: int = 0
    # Sequences per resumable chunk of the cache: an interrupted labelling run loses at most one chunk.
    chunk_sequences: int = 32

    def __post_init__(self) -> None:
        _finite("csc", self)
        _positive("csc", self, "max_sequences", "max_valid_sequences", "positions_per_sequence", "batch_size",
                  "chunk_sequences")


@dataclass(frozen=True)
class TrainConfig:
    """MetabolicGPT-2 Lagrangian training (paper IV.D-IV.G, V.B)."""

    variant: Literal["faithful", "expected-cost"] = "expected-cost"
    K: int = 3  # cost dimensions
    # Target budgets in CSC space; empty = derive low/medium/high from the CSC statistics (paper V.B).
    budgets: tuple[float, ...] = ()
    budget_quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)  # low/medium/high when budgets are derived
    epochs: int = 15
    batch_size: int = 8
    lr: float = 8e-6
    cost_lr_multiplier: float = 100.0  # cost parameters learn faster than the backbone (paper V.B)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mu: float = 0.15  # dual learning rate, eq. (23)
    lambda_max: float = 100.0
    beta_csc: float = 1.0
    beta_constr: float = 0.01
    entropy_reg: float = 0.025
    repetition_penalty: float = 0.5
    vocab_aux_weight: float = 0.5
    a_mix: float = 0.5  # mix of learnable token costs and head costs in C_vocab, eq. (14)
    # The a_mix values the cost warm-up chooses from by cross-validation over training texts (held-out
    # Spearman; metabolic.train.loop.choose_a_mix): few labelled texts cannot identify a free cost per
    # token id, and how much of the table to use is a property of the data. Empty (or no warm-up): a_mix.
    a_mix_choices: tuple[float, ...] = (0.0, 0.25, 0.5)
    token_cost_init: float = 0.05  # Softplus outputs of the learnable token costs at initialisation
    calib_ridge: float = 1e-3  # gamma in eq. (21)
    calib_refit_every: int = 10  # steps between refits of (a, b)
    curriculum_start: float = 1.5  # first epoch's budgets are this multiple of the targets
    per_layer_budget: bool = False  # inject the budget bias in every block (paper's future work)
    # Floor of every proxy cost (eq. 14's c_min) in proxy units, which CSC supervision keeps near CSC
    # units (~1e-3 per token): the prior's c_min = 0.3 is in prior units (mean 1) and would dwarf CSC.
    vocab_cost_min: float = 1e-4
    token_cost_from_prior: bool = False  # initialise token costs as token_cost_init x the synthetic prior
    # Start every cost at the mean per-token CSC label of the training cache instead of token_cost_init:
    # 0.05 (the paper's) is ~4x the smoke labels and ~28x the 256-token ones, so training would open
    # far over every budget and lambda would saturate before the costs could fall.
    token_cost_init_from_csc: bool = False
    # How costs are parameterised (metabolic.model.metabolic_gpt2). "paper": eq. 12-13 as written,
    # Softplus outputs in CSC units, L_CSC in CSC units^2, cost parameters at lr x cost_lr_multiplier
    # (V.B): at CSC's per-token scale (~1e-2) the Softplus slope is about the cost itself, so the costs
    # barely move (the learned costs collapsed into a token counter). "scaled": cost = s x Softplus(z),
    # s the mean per-token training label, L_CSC in units of s^2, every cost starting at s, and the
    # cost head and token costs at `cost_lr` (absolute: the logits are O(1) at every CSC scale).
    cost_parameterisation: Literal["paper", "scaled"] = "scaled"
    # Adam step of the cost logits in the Lagrangian training under "scaled" (~ relative change of a cost per
    # step): small, because the warm-up below has fitted them already and the joint steps, on states the
    # language model keeps moving, only perturbed that fit at larger steps (smoke: Spearman 0.54 -> 0.47 at 0.01).
    cost_lr: float = 0.003
    # Epochs of L_CSC alone on the cost parameters (backbone frozen) before the Lagrangian training
    # (metabolic.train.loop.warm_up_costs), at `cost_warmup_lr` (the scaled parameterisation's Adam step):
    # 0 = none, the paper.
    cost_warmup_epochs: int = 20
    cost_warmup_lr: float = 0.03
    # L_CSC (eq. 18): "mse" as the paper; "log-mse" the squared error of log(cost + 0.05 s) against
    # log(label + 0.05 s). CSC is heavy-tailed (sd/mean ~2.5 per token), so the plain squared error is
    # ruled by a few large labels: held-out Spearman 0.52 with "mse" vs 0.56 with "log-mse" (README).
    csc_loss: Literal["mse", "log-mse"] = "log-mse"
    # What a budget counts in training. "continuation": the tokens after the first generation.prompt_tokens,
    # the rule generation and Table I use, so the budget pathway learns the budgets it is given later
    # (totals, targets, the budget scale and the constrained costs all count that span). "text": every
    # token of the training text (the paper, whose training budgets 5-9 are not its generation budgets 1.1-1.65).
    budget_span: Literal["text", "continuation"] = "continuation"
    seed: int = 0

    def __post_init__(self) -> None:
        _finite("train", self)
        _positive("train", self, "K", "epochs", "batch_size", "lr", "cost_lr_multiplier", "cost_lr", "cost_warmup_lr", "grad_clip",
                  "mu", "lambda_max", "calib_refit_every", "token_cost_init", "curriculum_start")
        for name in ("weight_decay", "beta_csc", "beta_constr", "entropy_reg", "repetition_penalty",
                     "vocab_aux_weight", "calib_ridge"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "use >= 0")
        _require(0 <= self.a_mix <= 1, "train.a_mix", self.a_mix, "use a value in [0, 1]")
        _require(all(0 <= a <= 1 for a in self.a_mix_choices), "train.a_mix_choices", self.a_mix_choices,
                 "use values in [0, 1], or () to keep train.a_mix")
        _require(self.cost_warmup_epochs >= 0, "train.cost_warmup_epochs", self.cost_warmup_epochs, "use >= 0 (0 = none)")
        _require(math.isfinite(self.vocab_cost_min) and self.vocab_cost_min >= 0, "train.vocab_cost_min",
                 self.vocab_cost_min, "use a finite floor >= 0")
        if self.budgets:
            _finite_positive_tuple("train.budgets", self.budgets)
            _require(len(self.budgets) == self.K, "train.budgets", self.budgets, f"give K={self.K} budgets")
        _require(all(0 < q < 1 for q in self.budget_quantiles), "train.budget_quantiles",
                 self.budget_quantiles, "use quantiles in (0, 1)")


@dataclass(frozen=True)
class GenerationConfig:
    """Budget-conditioned generation and its evaluation (paper V.C, VI.C)."""

    # CSC-space budgets. Empty: the evaluation, notebook 04 and the explorer take the train.budget_quantiles
    # of the true CSC of training-text continuations (metabolic.evaluate.budgets.levels_from_continuations); the
    # e-token stage measures a MetabolicGPT-2 at train.budgets, else at the targets it was trained on.
    budgets: tuple[float, ...] = ()
    prompts: tuple[str, ...] = ("The future of artificial intelligence",)
    n_valid_prompts: int = 32  # prompts taken from the validation split, seeded
    # Independent samples per prompt at every level (rows of one generate() call): Table I's n per level is
    # prompts x samples_per_prompt.
    samples_per_prompt: int = 1
    # Labelled continuations per split (training, held-out validation) on which the stop rules are judged on
    # fixed text (metabolic.evaluate.stop_rules): every word-end prefix of each is labelled; 0 = none.
    stop_rule_texts: int = 100
    prompt_tokens: int = 16  # tokens of each validation text used as its prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0
    # Budget -> proxy map for steered decoding. "continuation": refit on training texts split like a
    # generation (first prompt_tokens tokens = prompt, the rest counted), the same token-counting rule
    # Table I scores; "model": the training calibration (whole texts, all tokens counted).
    calibration: Literal["continuation", "model"] = "continuation"
    lambda_max: float = 5.0  # bound on |lambda_t| of the steering processor (score units per proxy unit)
    # The verified controller (metabolic.generate.verified), evaluated for each candidate count N and
    # both CSC scales. Its candidates may grow past max_new_tokens: the budget, checked by the
    # labeller, decides where each stops (the model's context still bounds prompt + continuation).
    verified_candidates: tuple[int, ...] = (1, 2, 4, 8)
    verified_max_new_tokens: int = 128
    verified_band: float = 0.10  # the band the controller aims for (Hit@10 asks for +-10%)
    verified_max_probes: int = 6  # prefixes labelled per candidate at most
    verified_scales: tuple[str, ...] = SCALES  # ("raw", "length")
    # The verified controller on candidates steered towards the budget by the learned costs: N per row
    # (empty = no steered rows); one pool per scale and level, so each N costs sampling and labels.
    verified_steered_candidates: tuple[int, ...] = (1, 2, 4)

    def __post_init__(self) -> None:
        _finite("generation", self)
        _positive("generation", self, "lambda_max")
        if self.budgets:
            _finite_positive_tuple("generation.budgets", self.budgets)
        _positive("generation", self, "prompt_tokens", "max_new_tokens", "temperature", "verified_max_new_tokens",
                  "verified_max_probes")
        _require(self.n_valid_prompts >= 0, "generation.n_valid_prompts", self.n_valid_prompts, "use >= 0")
        # the explorer and the paper's examples continue prompts[0]: at least one, none empty
        _require(len(self.prompts) > 0 and all(isinstance(p, str) and p.strip() for p in self.prompts),
                 "generation.prompts", self.prompts, 'give at least one non-empty prompt, e.g. ("The river",)')
        _require(isinstance(self.samples_per_prompt, int) and self.samples_per_prompt >= 1, "generation.samples_per_prompt",
                 self.samples_per_prompt, "use an int >= 1")
        _require(isinstance(self.stop_rule_texts, int) and self.stop_rule_texts >= 0, "generation.stop_rule_texts",
                 self.stop_rule_texts, "use an int >= 0 (0 = no stop-rule table)")
        _require(self.top_k >= 0, "generation.top_k", self.top_k, "use >= 0 (0 = off)")
        _require(len(self.verified_candidates) > 0 and all(isinstance(n, int) and n >= 1 for n in self.verified_candidates),
                 "generation.verified_candidates", self.verified_candidates, "give candidate counts >= 1, e.g. (1, 2, 4, 8)")
        _require(all(isinstance(n, int) and n >= 1 for n in self.verified_steered_candidates),
                 "generation.verified_steered_candidates", self.verified_steered_candidates,
                 "give candidate counts >= 1, e.g. (1, 2, 4), or () for no steered rows")
        _require(0 < self.verified_band < 1, "generation.verified_band", self.verified_band, "use a fraction in (0, 1)")
        _require(len(self.verified_scales) > 0 and set(self.verified_scales) <= set(SCALES),
                 "generation.verified_scales", self.verified_scales, f"choose among {', '.join(SCALES)}")


@dataclass(frozen=True)
class EnergyConfig:
    """e-token measurements (the e-tokens note)."""

    min_window_s: float = 1.0  # NVML's counter moves in ~100 ms steps: shorter windows read noise
    repeats: int = 5
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    input_tokens: int = 64
    idle_s: float = 1.0  # idle baseline window, measured next to (before) each generation cell
    # windows shorter than NVML's counter update period are flagged and warned about (RAPL's: 1 ms); zeus
    # polls power itself on GPUs without the counter (metabolic.energy.meter)
    counter_period_s: float = 0.1
    gpu_index: int = 0
    # Cap on output tokens: the 1:50 task shrinks its input instead (GPT-2 has 1,024 positions, and
    # long decodes dominate the run time); every row records the exact T_in and T_out.
    max_output_tokens: int = 512
    tasks: tuple[str, ...] = ("classification", "chat", "reasoning", "creative")  # metabolic.energy.workloads.TASK_RATIOS
    # metabolic.energy.workloads: random-weight GPT-2 shapes (energy does not depend on weight values),
    # "gpt2" from the Hub when it loads, "metabolic" = the trained MetabolicGPT-2 at each budget level.
    models: tuple[str, ...] = ("tiny", "gpu-6x384", "gpt2-small-scratch", "gpt2", "metabolic")
    # HF generate() with its dynamic KV cache, and HF's own static cache (generate(cache_implementation=
    # "static")), whose decode step generate compiles itself on CUDA (metabolic.energy.measurement).
    paths: tuple[str, ...] = ("default", "static")
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"  # on CUDA; CPU runs fp32
    joule_fit_model: str = "gpt2-small-scratch"  # model of the semantic-cost -> joules fit (the joule fit)
    joule_fit_requests: int = 32  # requests of varied T_in / T_out measured for the joule fit
    budget_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # joule budgets as fractions of the joule fit's largest request
    budget_prompts: int = 8  # prompts generated per joule budget (Hit@10% over them)
    joule_fit: bool = True  # run the joule fit and joule budgets (needs an energy meter); off to split a long run into parts
    # "auto": measure unless this machine has no energy meter and results with energy are already in
    # data/<profile>/etokens/ (copied from a GPU machine); then only merge them. "always" / "never" force it.
    measure: Literal["auto", "always", "never"] = "auto"
    # One part of the grid per run: stop before the next unit whose estimated end lies beyond this many
    # seconds after the stage started, keeping every unit measured; a rerun measures the next part.
    # None: the whole grid in one run (metabolic.energy.plan).
    part_seconds: Optional[float] = None
    # Unit keys this run measures (fnmatch patterns such as "cell-gpu-6x384-*-chat-b1"), in the grid's
    # order; () = every unit. Like part_seconds it only splits one grid into runs, so it is not in the
    # grid's fingerprint: the units it leaves out stay for later runs (scripts/gpu_results.sh measures
    # a slice first, scripts/gpu_etokens.sh the rest).
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _finite("energy", self)
        _require(self.part_seconds is None or (math.isfinite(self.part_seconds) and self.part_seconds > 0),
                 "energy.part_seconds", self.part_seconds, "use None (the whole grid in one run) or seconds > 0")
        _positive("energy", self, "min_window_s", "repeats", "input_tokens", "idle_s", "counter_period_s",
                  "max_output_tokens", "joule_fit_requests", "budget_prompts")
        _require(len(self.batch_sizes) > 0 and all(b > 0 for b in self.batch_sizes), "energy.batch_sizes",
                 self.batch_sizes, "give batch sizes > 0")
        _require(self.gpu_index >= 0, "energy.gpu_index", self.gpu_index, "use an NVML GPU index >= 0")
        _require(len(self.models) > 0, "energy.models", self.models, "name at least one model")
        _require(len(self.tasks) > 0, "energy.tasks", self.tasks, "name at least one task")
        _require(len(self.paths) > 0 and set(self.paths) <= {"default", "static"}, "energy.paths",
                 self.paths, "choose among 'default' and 'static' (HF's static cache, compiled by generate on CUDA)")
        _require(self.joule_fit_model in ("tiny", "gpu-6x384", "gpt2-small-scratch"), "energy.joule_fit_model",
                 self.joule_fit_model, "choose tiny, gpu-6x384 or gpt2-small-scratch")
        _require(self.joule_fit_requests >= 4, "energy.joule_fit_requests", self.joule_fit_requests,
                 "use >= 4 (3 parameters are fitted)")
        _require(all(0 < f <= 1 for f in self.budget_fractions), "energy.budget_fractions", self.budget_fractions,
                 "use fractions in (0, 1]")


@dataclass(frozen=True)
class StudyConfig:
    """The whole study for one profile: one section per stage."""

    profile: str = "smoke"
    seed: int = 0
    # The run's folder under data/ and figures/ when it is not the profile's own: a study run with overrides is
    # `<profile>+<hash>` (`metabolic.core.runs.run_name`, set by `report.notebook.setup`), so it never overwrites
    # the profile's default run. "" = the profile's run. Not an override key.
    run: str = ""
    assets: AssetsConfig = field(default_factory=AssetsConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    csc: CSCConfig = field(default_factory=CSCConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def section(self, name: str) -> Any:
        return getattr(self, name)

    @property
    def run_name(self) -> str:
        """The run's folder name under data/ and figures/ (`artefacts.run_dir`, `figures_dir`)."""
        return self.run or self.profile


SECTIONS = ("assets", "corpus", "backbone", "prior", "csc", "train", "generation", "energy")
TOP_LEVEL = ("profile", "seed")


# --- overrides -------------------------------------------------------------------------------

# Keys renamed since (old dotted key -> new): an override with the old one fails naming the new one, and a
# saved config (`from_dict`) reads its value under the new one. "calibration" alone is the proxy <-> CSC map.
RENAMED = {
    "energy.calib_model": "energy.joule_fit_model",
    "energy.calib_requests": "energy.joule_fit_requests",
    "energy.calibrate": "energy.joule_fit",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert `value` (a CLI string or a papermill literal) to the field type `tp`, or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    fix = f"e.g. --set {key}=<{_type_name(tp)}>"
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is invalid: choose one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            try:
                parsed = ast.literal_eval(text) if text else ()
            except (ValueError, SyntaxError):
                parsed = tuple(p.strip() for p in text.split(",") if p.strip())
            value = parsed if isinstance(parsed, (tuple, list)) else (parsed,)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list, {fix}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(key, item_tp, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} has the wrong type: expected true or false")
    if tp in (int, float):
        return _number(key, tp, value, fix)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected a string")
    return value


def _number(key: str, tp: type, value: Any, fix: str) -> Any:
    """An int or float from a number or a string; booleans and fractional values for ints are rejected."""
    if not isinstance(value, bool):
        if isinstance(value, str):
            try:
                return tp(value.strip())
            except ValueError:
                pass
        elif tp is float and isinstance(value, (int, float)):
            return float(value)
        elif tp is int and isinstance(value, int):
            return value
        elif tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {tp.__name__}, {fix}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_override_strings(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parse CLI overrides `["train.epochs=3", ...]` into a dict; values stay strings."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is invalid: write it as section.key=value, e.g. train.epochs=3")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def apply_overrides(config: StudyConfig, overrides: Mapping[str, Any] | None) -> StudyConfig:
    """Return a new config with dotted-key overrides applied; every section is re-validated."""
    if not overrides:
        return config
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides={overrides!r} is invalid: give a dict such as {{'train.epochs': 3}}")
    per_section: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    top_types = _field_types(StudyConfig)
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            top[parts[0]] = _coerce(key, top_types[parts[0]], value)
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(
                f"unknown override key {key!r}: use section.key with a section among {', '.join(SECTIONS)}"
            )
        section, name = parts
        cls = type(getattr(config, section))
        types_ = _field_types(cls)
        if name not in types_ and key in RENAMED:
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"{key} was renamed {RENAMED[key]}: use {RENAMED[key]}={shown}")
        if name not in types_:
            raise ConfigError(
                f"unknown override key {key!r}: {section} has {', '.join(sorted(types_))}"
            )
        per_section.setdefault(section, {})[name] = _coerce(key, types_[name], value)
    changes: dict[str, Any] = dict(top)
    for section, values in per_section.items():
        changes[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **changes)


def from_dict(data: Mapping[str, Any]) -> StudyConfig:
    """Rebuild a config from `to_dict()` output (e.g. a saved `study_config.json`; keys renamed since it was
    saved are read under their new names, `RENAMED`)."""
    kwargs: dict[str, Any] = {k: data[k] for k in TOP_LEVEL if k in data}
    for section in SECTIONS:
        if section in data:
            cls = type(getattr(StudyConfig(), section))
            types_ = _field_types(cls)
            named = {RENAMED.get(f"{section}.{k}", f"{section}.{k}").split(".")[1]: v for k, v in data[section].items()}
            values = {k: _coerce(f"{section}.{k}", types_[k], v) for k, v in named.items() if k in types_}
            kwargs[section] = cls(**values)
    return StudyConfig(**kwargs)
