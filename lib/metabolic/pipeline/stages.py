"""The study's stages, in data-flow order: each builds (or reuses) one artefact under `data/<profile>/`.

    corpus -> pretrain -> prior -> csc -> train -> evaluate -> etokens

One module per stage (`metabolic.pipeline.corpus`, `pretrain`, `prior`, `csc`, `train`, `evaluate`,
`etokens`), each a `metabolic.pipeline.stage.Stage` (description, build, load) run by `realise`. This
module is their manifest: `STAGES` in pipeline order, `run`, and the stage functions notebooks and
`python -m metabolic run` call (`stages.corpus(cfg)`, `stages.csc_labels(cfg)`, ...). A stage asks for
its inputs by calling the stages before it, so any notebook can run alone; an artefact made from the
same inputs (same fingerprint) is reused, a stale or corrupt one is rebuilt. The loaded tokenizer and
encoder are kept once per process (`metabolic.pipeline.stage`): stages and notebooks share them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from metabolic.core.config import StudyConfig
from metabolic.core.errors import ConfigError
from metabolic.pipeline.corpus import CorpusData, corpus, train_sequences, valid_sequences
from metabolic.pipeline.csc import csc_description_keys, csc_labeller, csc_labels, select_for_labelling
from metabolic.pipeline.etokens import EtokenResults, etokens_plan, measure_etokens
from metabolic.pipeline.evaluate import budget_levels, evaluate_budgets, evaluation, read_generations, verified_targets
from metabolic.pipeline.pretrain import BackboneData, pretrain_backbone
from metabolic.pipeline.prior import PriorData, energy_prior
from metabolic.pipeline.stage import tokenizer_fingerprint
from metabolic.pipeline.train import StageInputs, stage_inputs, train_metabolic, train_variants

log = logging.getLogger(__name__)

# What notebooks, benchmarks and the CLI reach through `stages.<name>`.
__all__ = [
    "STAGES", "select", "run", "CorpusData", "corpus", "train_sequences", "valid_sequences", "BackboneData", "pretrain_backbone",
    "PriorData", "energy_prior", "csc_labeller", "csc_labels", "csc_description_keys", "select_for_labelling",
    "StageInputs", "stage_inputs", "train_metabolic", "train_variants", "evaluation", "evaluate_budgets", "read_generations",
    "budget_levels", "verified_targets", "EtokenResults", "measure_etokens", "etokens_plan", "tokenizer_fingerprint",
]

# The stages in pipeline order: each reads only the artefacts of the stages above it.
STAGES: dict[str, Callable[[StudyConfig], Any]] = {
    "corpus": corpus,
    "pretrain": pretrain_backbone,
    "prior": energy_prior,
    "csc": csc_labels,
    "train": train_variants,
    "evaluate": evaluate_budgets,
    "etokens": measure_etokens,  # last: it also measures the trained MetabolicGPT-2 when it exists
}


def select(spec: str) -> list[str]:
    """The stages `spec` names, in the order given: comma-separated names or ranges of `STAGES`' order
    (`a..b`, `..b` from the first, `a..` to the last); "" is every stage. Scripts name ranges, so the
    pipeline's order is written only in `STAGES`.

    >>> select("..csc"), select("train.."), select("csc,evaluate")
    (['corpus', 'pretrain', 'prior', 'csc'], ['train', 'evaluate', 'etokens'], ['csc', 'evaluate'])
    """
    order = list(STAGES)
    if not spec.strip():
        return order
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        first, dots, last = item.partition("..")
        ends = [first or order[0], last or order[-1]] if dots else [first]
        for name in ends:
            if name not in STAGES:
                raise ConfigError(f"unknown stage {name!r} in --stages {spec!r}: choose among {', '.join(order)}")
        if order.index(ends[0]) > order.index(ends[-1]):
            raise ConfigError(f"--stages {item!r} runs backwards: {ends[0]} comes after {ends[-1]} "
                              f"({' -> '.join(order)}); write {ends[-1]}..{ends[0]}")
        names += order[order.index(ends[0]):order.index(ends[-1]) + 1]
    if not names:  # "," names no stage: never read as "all of them"
        raise ConfigError(f"--stages {spec!r} names no stage: give stage names or ranges (..evaluate) separated by "
                          "commas, or leave --stages out for all of them")
    return names


def run(cfg: StudyConfig, stages: list[str] | None = None) -> dict[str, float]:
    """Run `stages` (default: all, in order) and return each stage's wall time in seconds."""
    names = list(STAGES) if not stages else stages
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}: choose among {', '.join(STAGES)}")
    timings: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        STAGES[name](cfg)
        timings[name] = time.perf_counter() - t0
        log.info("stage %s done in %.1f s", name, timings[name])
    return timings
