"""CSC labelling sharded across processes with torchrun (issue 13, item 3), on CPU with gloo: a killed
sharded run resumes under `torchrun -m metabolic run --stages csc`, labelling only the chunks that are
missing, and gives a cache byte-identical to one process's. Real corpus, tokenizer and encoder on the tiny cache config of test_csc_dataset."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

# Five sequences of <= 8 tokens, one per chunk: train chunks 0-2, valid chunks 0-1.
CACHE_OVERRIDES = {"corpus.seq_len": 8, "csc.max_sequences": 3, "csc.max_valid_sequences": 2, "csc.chunk_sequences": 1}


@pytest.fixture()
def one_process(tiny_cfg, tmp_path, monkeypatch):
    """The tiny cache labelled by one process (in this one), and a data root holding only its corpus."""
    from metabolic.core import artefacts
    from metabolic.core.config import apply_overrides
    from metabolic.pipeline import stages

    stages.corpus(tiny_cfg)
    corpus = artefacts.run_dir(tiny_cfg.run_name) / "corpus"
    monkeypatch.setenv("METABOLIC_DATA", str(tmp_path / "single"))
    shutil.copytree(corpus, artefacts.run_dir(tiny_cfg.run_name) / "corpus")
    cfg = apply_overrides(tiny_cfg, CACHE_OVERRIDES)
    data = stages.csc_labels(cfg, progress=False)
    sharded = tmp_path / "sharded"
    shutil.copytree(corpus, sharded / tiny_cfg.profile / "corpus")
    return cfg, data, sharded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data_root: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m metabolic run --profile smoke --stages csc` on the tiny cache config."""
    overrides = [a for k, v in {**TINY_OVERRIDES, **CACHE_OVERRIDES}.items() for a in ("--set", f"{k}={v}")]
    full_env = {**os.environ, "METABOLIC_DATA": str(data_root)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "metabolic", "run", "--profile", "smoke", "--stages", "csc", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def _rank(rank: int, port: int, data_root: Path, cfg, record: Path, kill: bool) -> None:
    """One rank, in torchrun's environment.
    Writes to `record` the chunks `label_shard` labelled per split and the chunks the labeller labelled;
    with `kill`, fails right after saving its first chunk."""
    import json

    from metabolic.csc.labeller import CSCLabeller
    from metabolic.pipeline import csc as csc_stage
    from metabolic.pipeline import stages

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), METABOLIC_DATA=str(data_root))
    seen: dict = {"shard": {}, "chunks_labelled": 0}
    real_groups, real_shard = CSCLabeller.label_groups, csc_stage.label_shard

    def watched_groups(self, *args, **kwargs):
        for item in real_groups(self, *args, **kwargs):
            seen["chunks_labelled"] += 1
            record.write_text(json.dumps(seen))
            yield item  # label_split saves the chunk before asking for the next
            if kill:
                raise RuntimeError(f"rank {rank} killed after one chunk (test)")

    def watched_shard(labeller, name, *args, **kwargs):
        seen["shard"][name] = real_shard(labeller, name, *args, **kwargs)
        record.write_text(json.dumps(seen))
        return seen["shard"][name]

    CSCLabeller.label_groups = watched_groups  # in this rank's process only
    csc_stage.label_shard = watched_shard
    record.write_text(json.dumps(seen))
    stages.csc_labels(cfg, progress=False)


def _two_ranks(cfg, data_root: Path, records: Path, kill_rank: int | None = None) -> list[int]:
    """Run ranks 0 and 1 as fresh (spawned) processes; when one fails, stop the other (as torchrun does). Exit codes."""
    import multiprocessing

    records.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, data_root, cfg, records / f"rank{r}.json", r == kill_rank))
             for r in (0, 1)]
    for p in procs:
        p.start()
    while all(p.exitcode in (None, 0) for p in procs) and any(p.exitcode is None for p in procs):
        for p in procs:
            p.join(timeout=0.05)
    for p in procs:
        if p.exitcode is None:
            p.terminate()
        p.join(timeout=60)
    return [p.exitcode for p in procs]


@pytest.mark.slow
def test_killed_sharded_run_resumes_with_torchrun_byte_identical_to_one_process(one_process, tmp_path):
    """Two ranks (spawned) label the tiny cache until rank 1 fails after its first chunk; torchrun with
    two ranks then resumes: each missing chunk is labelled once, on rank k % 2, no saved one again, and
    the committed csc.npz is byte for byte the one-process one."""
    import json

    from metabolic.core import artefacts

    cfg, single, root = one_process
    assert _two_ranks(cfg, root, tmp_path / "killed", kill_rank=1)[1] == 1
    assert not (root / "smoke" / "csc").exists()  # nothing committed
    saved = {p.stem for p in (root / "smoke" / "csc.partial" / "chunks").glob("*.npz")}
    # Rank 1 saved its first chunk (train 1) and died before its second (valid 1); rank 0 owns the
    # others and may have saved some of them before it was stopped.
    assert "train-00001" in saved and "valid-00001" not in saved
    assert json.loads((tmp_path / "killed" / "rank1.json").read_text()) == {"shard": {}, "chunks_labelled": 1}

    proc = _torchrun(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = re.findall(r"CSC (train|valid): rank (\d) of 2 labelled chunks \[([\d, ]*)\]", proc.stderr)
    assert sorted((name, int(r)) for name, r, _ in shards) == [("train", 0), ("train", 1), ("valid", 0), ("valid", 1)]
    labelled = {r: [f"{name}-{int(k):05d}" for name, rank, ks in shards if int(rank) == r for k in ks.split(",") if k.strip()]
                for r in (0, 1)}
    everything = {f"train-{k:05d}" for k in range(3)} | {f"valid-{k:05d}" for k in range(2)}
    assert sorted(labelled[0] + labelled[1]) == sorted(everything - saved)  # each missing chunk once, no saved one
    assert all(int(c[-5:]) % 2 == r for r in (0, 1) for c in labelled[r])  # chunk k on rank k % 2
    # Rank 0's merge found every chunk: it relabelled none.
    assert "CSC train: resuming, 3 of 3 chunks" in proc.stderr and "CSC valid: resuming, 2 of 2 chunks" in proc.stderr
    folder = root / "smoke" / "csc"
    assert (folder / "csc.npz").read_bytes() == (single.folder / "csc.npz").read_bytes()
    assert not folder.with_name("csc.partial").exists()
    assert artefacts.read_manifest(folder)["fingerprint"] == single.fingerprint


def test_shard_from_env_reads_torchrun_and_rejects_bad_values():
    from metabolic.core.errors import ConfigError
    from metabolic.csc.sharding import shard_from_env

    assert shard_from_env({}) == (0, 1)  # outside torchrun: one process, as always
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)
    for env in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "0"}, {"RANK": "x", "WORLD_SIZE": "2"},
                {"WORLD_SIZE": "2"}):
        with pytest.raises(ConfigError, match="RANK="):
            shard_from_env(env)


def test_cli_under_torchrun_shards_only_the_csc_stage(monkeypatch, capsys):
    from metabolic import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["run", "--profile", "smoke", "--stages", "corpus,csc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only the csc stage is sharded" in err and "--stages csc" in err


def test_ranks_without_a_rendezvous_address_are_told_to_use_torchrun():
    from metabolic.core.errors import ConfigError
    from metabolic.csc.sharding import shard_group

    env = {"RANK": "0", "WORLD_SIZE": "2"}
    with pytest.raises(ConfigError, match="without MASTER_ADDR and MASTER_PORT: start the ranks with torchrun"):
        with shard_group(env):
            pass
