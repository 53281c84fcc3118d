"""What the e-token measurements run: the note's four tasks by I/O ratio, their prompts, and the models.

Tasks (the e-tokens note's table, output tokens per input token):
classification 1:0.1, chat/summarisation 1:1, reasoning 1:5, creative writing 1:50. A task gets
`input_tokens` in and round(ratio x in) out; when that exceeds `max_output_tokens` (GPT-2 has 1,024
positions, and long decodes dominate the run time), the input shrinks so the ratio is kept:
in = round(max_out / ratio). Every row records the exact T_in and T_out used.

Prompts are WikiText-2 validation texts (the study's `valid_sequences`), chosen with a seed among
those with at least T_in tokens and cut to exactly T_in tokens, so a batch needs no padding.

Models: GPT-2 architectures with random, seeded weights (energy per query depends on the shapes and
the number of generated tokens, not on the weight values; the output length is fixed with
min_new_tokens = max_new_tokens), `gpt2` from the Hub when it loads, and MetabolicGPT-2 at each
budget level when a trained one exists in the run folder (optional: skipped with a reason otherwise).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from metabolic.core.config import BackboneConfig
from metabolic.core.errors import AssetError, ConfigError, DataError
from metabolic.model.backbone import load_backbone, scratch_model
from metabolic.model.metabolic_gpt2 import SETTINGS_FILE, MetabolicGPT2

log = logging.getLogger(__name__)

# Output tokens per input token, from the e-tokens note's comparison table.
TASK_RATIOS: dict[str, float] = {
    "classification": 0.1,
    "chat": 1.0,
    "reasoning": 5.0,
    "creative": 50.0,
}

# From-scratch GPT-2 shapes (n_layer, n_embd, n_head): the smoke backbone, the gpu-profile backbone
# and GPT-2 small (124M). Random weights: energy does not depend on weight values.
SCRATCH_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "gpu-6x384": (6, 384, 6),
    "gpt2-small-scratch": (12, 768, 12),
}
HUB_MODELS = ("gpt2",)
METABOLIC = "metabolic"
N_POSITIONS = 1024  # GPT-2's context: T_in + T_out must fit


@dataclass(frozen=True)
class Task:
    name: str
    ratio: float  # output tokens per input token (nominal)
    input_tokens: int
    output_tokens: int


def make_tasks(input_tokens: int, max_output_tokens: int, names: Sequence[str] = tuple(TASK_RATIOS)) -> list[Task]:
    """The tasks with their exact token counts (see the module docstring for the cap)."""
    if input_tokens < 1 or max_output_tokens < 1:
        raise ConfigError(f"input_tokens={input_tokens}, max_output_tokens={max_output_tokens}: use values >= 1")
    out = []
    for name in names:
        if name not in TASK_RATIOS:
            raise ConfigError(f"unknown task {name!r}: choose among {', '.join(TASK_RATIOS)}")
        ratio = TASK_RATIOS[name]
        t_in = input_tokens
        t_out = max(1, round(ratio * t_in))
        if t_out > max_output_tokens:
            t_in = max(1, round(max_output_tokens / ratio))
            t_out = min(max_output_tokens, max(1, round(ratio * t_in)))
        if t_in + t_out > N_POSITIONS:
            raise ConfigError(f"task {name}: {t_in} in + {t_out} out exceeds GPT-2's {N_POSITIONS} positions: "
                              f"lower energy.input_tokens or energy.max_output_tokens")
        out.append(Task(name, ratio, t_in, t_out))
    return out


def pick_prompts(sequences: Sequence[Sequence[int]], n: int, input_tokens: int, seed: int) -> list[list[int]]:
    """`n` prompts of exactly `input_tokens` ids: seeded choice among texts that long (with replacement if few)."""
    long_enough = [list(s[:input_tokens]) for s in sequences if len(s) >= input_tokens]
    if not long_enough:
        longest = max((len(s) for s in sequences), default=0)
        raise DataError(f"no validation text has {input_tokens} tokens (longest: {longest}): lower energy.input_tokens "
                        f"or raise corpus.seq_len")
    rng = random.Random(seed * 7919 + input_tokens)
    if n <= len(long_enough):
        return rng.sample(long_enough, n)
    return [rng.choice(long_enough) for _ in range(n)]


@dataclass(frozen=True)
class ModelSpec:
    """One model to measure; `generate_kwargs` are passed to every `generate` call (e.g. a budget)."""

    name: str
    kind: str  # "scratch", "hub" or "metabolic"
    source: str = ""  # Hub id or folder for "hub" / "metabolic"
    shape: Optional[tuple[int, int, int]] = None
    budget: Optional[float] = None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)


def model_specs(names: Sequence[str], run_folder: Path, budgets: Sequence[float]) -> tuple[list[ModelSpec], list[dict]]:
    """Resolve model names into specs; return (specs, skipped) where skipped rows say why."""
    specs: list[ModelSpec] = []
    skipped: list[dict] = []
    for name in names:
        if name in SCRATCH_SHAPES:
            specs.append(ModelSpec(name, "scratch", shape=SCRATCH_SHAPES[name]))
        elif name in HUB_MODELS:
            specs.append(ModelSpec(name, "hub", source=name))
        elif name == METABOLIC:
            folders, why = find_metabolic(run_folder)
            if not folders:
                skipped.append({"model": name, "reason": why})
            for folder in folders:
                levels = list(budgets) or _trained_targets(folder)
                label = f"metabolic[{folder.parent.name}/{folder.name}]"
                if not levels:
                    skipped.append({"model": label, "reason": "no budget levels: set generation.budgets or train.budgets"})
                for b in levels:
                    specs.append(ModelSpec(f"{label}@{b:.3g}", "metabolic", source=str(folder), budget=float(b)))
        else:
            raise ConfigError(f"unknown model {name!r} in energy.models: choose among "
                              f"{', '.join([*SCRATCH_SHAPES, *HUB_MODELS, METABOLIC])}")
    return specs, skipped


def find_metabolic(run_folder: Path) -> tuple[list[Path], str]:
    """Trained MetabolicGPT-2 folders under the run folder (those holding its settings file), or why none."""
    settings = SETTINGS_FILE
    # The training stage keeps each variant's selected checkpoint in train/<variant>/best/ (and the
    # last epoch in .../last/, resumable checkpoints beside them): the "best" ones are measured.
    found = sorted(Path(run_folder).rglob(settings))
    folders = [f.parent for f in found
               if f.parent.name == "best" and not any(p.endswith(".partial") or p == "etokens" for p in f.parts)]
    if not folders:
        return [], "no trained MetabolicGPT-2 in this profile's run folder (run the training stage first)"
    return folders, ""


def _trained_targets(folder: Path) -> list[float]:
    """The target budgets a MetabolicGPT-2 was trained on (its training_info.json), if recorded."""
    import json

    try:
        info = json.loads((Path(folder) / "training_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [float(t) for t in info.get("targets", [])]


def load_model(spec: ModelSpec, vocab_size: int, eos_id: int, device: torch.device, dtype: torch.dtype):
    """The model of `spec` on `device` in `dtype`, eval mode. A Hub model that cannot load is an AssetError."""
    if spec.kind == "scratch":
        n_layer, n_embd, n_head = spec.shape
        model = scratch_model(BackboneConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head), vocab_size, N_POSITIONS, eos_id)
    elif spec.kind == "hub":
        model = load_backbone(spec.source, device="cpu")
    elif spec.kind == "metabolic":
        try:
            model = MetabolicGPT2.from_pretrained(spec.source)
        except Exception as exc:  # noqa: BLE001 - an optional model: report why it did not load
            raise AssetError(f"cannot load MetabolicGPT-2 from {spec.source} ({str(exc).splitlines()[0][:160]})") from None
    else:
        raise ConfigError(f"unknown model kind {spec.kind!r}")
    return model.to(device=device, dtype=dtype).eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
