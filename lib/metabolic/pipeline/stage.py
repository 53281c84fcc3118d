"""The stage protocol, its runner and what every stage shares (the tokenizer and encoder of this process).

A stage builds (or reuses) one artefact, `data/<profile>/<folder>/`, from its inputs:

- `description()` names exactly what the artefact is made from; its fingerprint decides reuse (an
  artefact made from the same inputs is reused, a stale or corrupt one rebuilt);
- `build(work)` writes the artefact's files into its partial folder (kept across interruptions, so
  long builds resume) and returns a summary for the manifest;
- `load(folder)` reads the finished artefact back into what the stage returns.

`realise(stage, cfg)` runs that protocol through `metabolic.core.artefacts.build_artefact`. A stage
asks for its inputs by calling the stages before it when it is made, so any notebook can run alone.
One module per stage (`corpus`, `pretrain`, `prior`, `csc`, `train`, `evaluate`, `etokens`) and the
manifest of them all, `metabolic.pipeline.stages`. Only `pipeline` unpacks `StudyConfig`: domain code
takes its own config section or plain arguments and never calls a stage.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from metabolic.core import artefacts
from metabolic.core.assets import load_encoder, load_tokenizer
from metabolic.core.config import StudyConfig
from metabolic.csc.dataset import encoder_weights_sha256

T = TypeVar("T", covariant=True)


@runtime_checkable
class Stage(Protocol[T]):
    """One artefact under `data/<profile>/<folder>/` (see the module docstring)."""

    folder: str  # relative to the run folder, e.g. "corpus" or "train/faithful"
    required: tuple[str, ...]  # files that must exist for the artefact to count as finished

    def description(self) -> dict[str, Any]: ...

    def build(self, work: Path) -> dict[str, Any]: ...

    def load(self, folder: Path) -> T: ...


def stage_folder(cfg: StudyConfig, stage: Stage) -> Path:
    return artefacts.run_dir(cfg.profile) / stage.folder


def realise(stage: Stage[T], cfg: StudyConfig, force: bool = False) -> T:
    """Build `stage`'s artefact unless a fresh one exists (or `force`), then load it."""
    folder = stage_folder(cfg, stage)
    artefacts.build_artefact(folder, stage.description(), stage.build, cfg.to_json(), required=stage.required,
                             force=force)
    return stage.load(folder)


# --- shared by stages and notebooks: loaded once per process ------------------------------------


@functools.lru_cache(maxsize=4)
def tokenizer(spec: str):
    """`load_tokenizer(spec)`, loaded once per process."""
    return load_tokenizer(spec)


@functools.lru_cache(maxsize=2)
def encoder(spec: str, device: str):
    """`load_encoder(spec, device)`, loaded once per process (stages and notebooks share it)."""
    return load_encoder(spec, device).value


@functools.lru_cache(maxsize=2)
def encoder_sha256(spec: str, device: str) -> str:
    """The weights hash of the process's cached encoder (it is never trained, so it never changes)."""
    return encoder_weights_sha256(encoder(spec, device))


def tokenizer_fingerprint(tok) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser)."""
    return artefacts.sha256_bytes(tok.backend_tokenizer.to_str().encode("utf-8"))
