"""The torchrun rank protocol of the CSC labelling: one build, one committer, every rank labelling.

Under torchrun (`RANK`, `WORLD_SIZE`) the ranks share one CSC cache's labelling (`build_sharded`):
rank 0 holds the artefact's lock and builds in its partial folder as one process would; once it has
made (or resumed) the partial, it sends the partial's path and fingerprint to the others, every rank
labels its missing chunks into the partial (`metabolic.csc.dataset.label_shard`: chunk k goes to rank
k % world), a barrier, then rank 0 merges the chunk files where they lie (its build, which also labels
any still missing) and commits. A final barrier lets the others read the committed cache. A fresh
cache sends no path: nobody labels. Chunks are planned and batched on their own, so labels are
byte-identical to one process's, and a killed sharded run resumes from the chunks every rank saved.
With one process (rank 0 of 1) it is `build_artefact` then load, as for any stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch.distributed as dist

from metabolic.core import artefacts
from metabolic.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

# A rank waits at a barrier for the slowest rank's share, which can take hours on the paper profile;
# torchrun stops every rank when one fails, so a long wait never outlives a crash.
SHARD_TIMEOUT = timedelta(hours=12)


def shard_from_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(rank, world size) of this process under torchrun (`RANK`, `WORLD_SIZE`), else (0, 1)."""
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return 0, 1
    try:
        rank, world = int(environ.get("RANK", "")), int(environ.get("WORLD_SIZE", ""))
    except ValueError:
        raise ConfigError(f"RANK={environ.get('RANK')!r}, WORLD_SIZE={environ.get('WORLD_SIZE')!r} are invalid: "
                          f"start the ranks with torchrun, or unset both for one process") from None
    if not (world >= 1 and 0 <= rank < world):
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world} are invalid: need 0 <= RANK < WORLD_SIZE")
    return rank, world


@contextlib.contextmanager
def shard_group(environ: Mapping[str, str] = os.environ) -> Iterator[tuple[int, int]]:
    """(rank, world size) for the duration, joined to torchrun's process group when world > 1.

    The ranks exchange only a few small messages (no tensors), so the group is gloo on CPU and GPU
    alike; a group the caller already started is used as it is and left running."""
    rank, world = shard_from_env(environ)
    if world == 1 or dist.is_initialized():
        yield rank, world
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world} without {' and '.join(missing)}: start the ranks with "
                          f"torchrun (it sets them), or unset RANK and WORLD_SIZE for one process")
    dist.init_process_group("gloo", timeout=SHARD_TIMEOUT)
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj`, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    dist.barrier()


def build_sharded(folder: Path, description: dict[str, Any], key: str, config_json: str, required: tuple[str, ...], *,
                  build: Callable[[Path], dict[str, Any]], label_shard: Callable[[Path], None], load: Callable[[], T],
                  shard: tuple[int, int]) -> T:
    """The labelled cache in `folder` on rank `shard[0]` of `shard[1]` processes (see the module docstring).

    `build(work)` is rank 0's build (merge every rank's chunks, label what is missing, write the cache);
    `label_shard(work)` labels this rank's chunks into a partial; `load()` reads the committed cache and
    raises `DataError` when it does not hold the sequences asked for (rank 0 then relabels once).
    `key` is the cache's fingerprint: every rank must compute the same one.
    """
    rank, world = shard
    if rank == 0:
        shared: list[Path] = []  # the partial the ranks labelled together (at most one per call)

        def build_with_ranks(work: Path) -> dict[str, Any]:
            if world > 1 and not shared:  # rank 0, holding the lock: the partial exists, with its fingerprint
                shared.append(work)
                broadcast((str(work), key))
                label_shard(work)
                barrier()  # every rank's chunks are saved
            return build(work)

        artefacts.build_artefact(folder, description, build_with_ranks, config_json, required=required)
        try:
            loaded = load()
        except DataError as exc:  # rank 0 alone relabels (the others wait at the last barrier)
            log.warning("%s: rebuilding the CSC cache", exc)
            artefacts.build_artefact(folder, description, build_with_ranks, config_json, required=required, force=True)
            loaded = load()
        if world > 1:
            if not shared:
                broadcast((None, key))  # fresh: nothing to label
            barrier()  # committed
        return loaded
    work, rank0_key = broadcast(None)
    if rank0_key != key:
        raise ConfigError(f"rank {rank} would label other inputs than rank 0 (CSC fingerprint {key[:12]} vs "
                          f"{rank0_key[:12]}): start every rank with the same profile, --set overrides and assets")
    if work is not None:
        label_shard(Path(work))
        barrier()
    barrier()
    return load()
