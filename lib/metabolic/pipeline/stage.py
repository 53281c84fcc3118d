"""The stage protocol, its runner and what every stage shares (the tokenizer and encoder of this process).

A stage builds (or reuses) one artefact, `data/<profile>/<folder>/`, from its inputs:

- `description()` names exactly what the artefact is made from; its fingerprint decides reuse (an
  artefact made from the same inputs is reused, a stale or corrupt one rebuilt);
- `build(work)` writes the artefact's files into its partial folder (kept across interruptions, so
  long builds resume) and returns a summary for the manifest;
- `load(folder, key)` reads the finished artefact back into what the stage returns; `key` is the one its
  manifest records, which a later stage's description cites.

`realise(stage, cfg)` runs that protocol through `metabolic.core.artefacts.build_artefact`, and loads each
artefact once per process (again only when its files change). A stage
asks for its inputs by calling the stages before it when it is made, so any notebook can run alone.
One module per stage (`corpus`, `pretrain`, `prior`, `csc`, `train`, `evaluate`, `etokens`) and the
manifest of them all, `metabolic.pipeline.stages`. Below `pipeline` no module unpacks `StudyConfig`: domain code
takes its own config section or plain arguments and never calls a stage.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar, runtime_checkable

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

    def load(self, folder: Path, key: str) -> T: ...


def stage_folder(cfg: StudyConfig, stage: Stage | type[Stage]) -> Path:
    return artefacts.run_dir(cfg.run_name) / stage.folder


def realise(stage: Stage[T], cfg: StudyConfig, force: bool = False) -> T:
    """Build `stage`'s artefact unless a fresh one exists (or `force`), then load it (once per process)."""
    built = artefacts.build_artefact(stage_folder(cfg, stage), stage.description(), stage.build, cfg.to_json(),
                                     required=stage.required, force=force)
    return loaded_once(stage, built, lambda: stage.load(built.folder, built.key))


# memo key -> (the stat signature of its folders when loaded, what `load` returned). Bounded: a test session
# makes hundreds of small runs.
_LOADED: collections.OrderedDict[tuple, tuple[tuple, Any]] = collections.OrderedDict()
_LOADED_MAX = 32


def loaded_once(stage: Any, built: artefacts.Built, load: Callable[[], T]) -> T:
    """`load()` of a committed artefact, or what it returned before in this process while the artefact's files
    are the same files (a stage's later callers, e.g. every stage that needs the corpus, share one load)."""
    return read_once((type(stage).__qualname__, str(built.folder), built.key), (built.folder,), load)


def read_once(memo: tuple, folders: Sequence[Path], load: Callable[[], T]) -> T:
    """`load()`, or what it returned before in this process under `memo` while the files under `folders`
    are the same files (their stat signatures, `artefacts.stat_signature`)."""
    signature = tuple(artefacts.stat_signature(f) for f in folders)
    hit = _LOADED.get(memo)
    if hit is not None and hit[0] == signature:
        _LOADED.move_to_end(memo)
        return hit[1]
    value = load()
    _LOADED[memo] = (signature, value)
    while len(_LOADED) > _LOADED_MAX:
        _LOADED.popitem(last=False)
    return value


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
