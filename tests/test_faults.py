"""Fault injection on the real stages (tiny config): a real kill -9 inside pretraining, CSC labelling, training and
evaluation (e-tokens: test_etokens_grid.py) whose resume ends as the uninterrupted run, kills during a commit,
corrupted artefact files, unreadable checkpoints, diverging runs and disk faults. Each ends in a resume without rework, a
rebuild identical to a clean run, or one line naming the path and the fix; never in lost or silently
wrong work. The commit protocol's own kill sweep is in test_artefacts.py.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES
from kill import kill_9
from metabolic.core import artefacts, resume
from metabolic.core.errors import DivergedError
from metabolic.core.profiles import load_config
from metabolic.model.backbone import scratch_model
from metabolic.pipeline import prior as prior_stage
from metabolic.pipeline import stages
from metabolic.train.pretrain import pretrain
from test_backbone import TINY, _blocks

STAGE_FOLDERS = ("corpus", "backbone", "prior", "csc", "train/faithful")


@pytest.fixture(scope="module")
def clean_run(tiny_cfg) -> Path:
    """The tiny study through the faithful training run (shared with the other tests of the session)."""
    stages.run(tiny_cfg, ["corpus", "pretrain", "prior"])
    stages.train_metabolic(tiny_cfg, "faithful", progress=False)
    return artefacts.run_dir(tiny_cfg.run_name)


@pytest.fixture
def run_copy(clean_run, tmp_path, monkeypatch) -> Path:
    """A private copy of the clean run to damage: METABOLIC_DATA points at it for this test."""
    root = tmp_path / "data"
    for name in STAGE_FOLDERS:
        shutil.copytree(clean_run / name, root / clean_run.name / name)
    monkeypatch.setenv("METABOLIC_DATA", str(root))
    return root / clean_run.name


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip(path: Path, n_bytes: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + n_bytes):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _stage_files(run: Path) -> list[tuple[str, str]]:
    return [(stage, p.relative_to(run / stage).as_posix()) for stage in STAGE_FOLDERS
            for p in sorted((run / stage).rglob("*")) if p.is_file() and p.name != artefacts.MANIFEST]


def test_every_file_of_every_stage_is_verified(run_copy):
    """Flipped bytes or a truncation in any committed file makes its artefact stale, naming the file."""
    files = _stage_files(run_copy)
    assert {"corpus/tokens.pt", "backbone/model.safetensors", "train/faithful/selection.json",
            "train/faithful/metrics.jsonl", "train/faithful/best/metabolic.safetensors"} <= {f"{s}/{n}" for s, n in files}
    for i, (stage, name) in enumerate(files):
        path, folder = run_copy / stage / name, run_copy / stage
        key = artefacts.read_manifest(folder)["fingerprint"]
        original = path.read_bytes()
        for damage, why in ((_flip, "sha256 mismatch"), (_truncate, "bytes")):
            if damage is _flip and len(original) < 40:
                continue
            damage(path)
            assert artefacts.staleness(folder, key) == (
                f"{name} changed since it was committed (sha256 mismatch)" if why == "sha256 mismatch"
                else f"{name} has {path.stat().st_size} bytes, not the {len(original)} it was committed with")
            path.write_bytes(original)
        assert artefacts.staleness(folder, key) is None


REBUILDS = {
    "backbone": lambda cfg: stages.pretrain_backbone(cfg, progress=False),
    "prior": lambda cfg: stages.energy_prior(cfg),
}


# The cases: corpus/tokens.pt with 16 flipped bytes (reused before, 5 training ids went
# negative) and truncated train files are covered by the test above; these rebuild for real (the
# cheap stages) and check that the rebuild equals the clean run byte for byte.
@pytest.mark.parametrize("stage, name, damage, why", [
    ("backbone", "model.safetensors", _flip, "sha256 mismatch"),
    ("prior", "prior.npz", _truncate, "bytes"),
])
def test_a_damaged_artefact_is_rebuilt_identical_with_one_line(tiny_cfg, run_copy, caplog, stage, name, damage, why):
    path = run_copy / stage / name
    clean = _sha(path)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="metabolic.core.artefacts"):
        REBUILDS[stage](tiny_cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "metabolic.core.artefacts"]
    assert len(lines) == 1 and name in lines[0] and why in lines[0] and "rebuilding" in lines[0]
    assert _sha(path) == clean  # the rebuild equals the clean run, byte for byte
    assert artefacts.staleness(run_copy / stage, artefacts.read_manifest(run_copy / stage)["fingerprint"]) is None


@pytest.mark.parametrize("kill_at", [1, 2])  # the old folder renamed away; the new one moved into place
def test_a_kill_while_a_stage_commits_loses_no_work(tiny_cfg, run_copy, monkeypatch, kill_at):
    clean = _sha(run_copy / "prior" / "prior.npz")
    _flip(run_copy / "prior" / "prior.npz")  # so that the stage rebuilds and commits over an old folder
    builds, real_build = [], prior_stage.build_prior
    monkeypatch.setattr(prior_stage, "build_prior", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    real_replace, seen = os.replace, []

    def replace(src, dst):
        if Path(src).is_dir():
            seen.append(dst)
            if len(seen) == kill_at:
                raise _Killed
        return real_replace(src, dst)

    monkeypatch.setattr(artefacts.os, "replace", replace)
    with pytest.raises(_Killed):
        stages.energy_prior(tiny_cfg)
    monkeypatch.setattr(artefacts.os, "replace", real_replace)
    stages.energy_prior(tiny_cfg)  # the rerun adopts the finished partial
    assert len(builds) == 1 and _sha(run_copy / "prior" / "prior.npz") == clean
    assert sorted(p.name for p in run_copy.iterdir() if not p.name.startswith(".") or p.is_dir()) == \
        sorted(n.split("/")[0] for n in STAGE_FOLDERS)


class _Killed(BaseException):
    """Stands for a kill -9: nothing after it runs."""


@pytest.mark.parametrize("damage, why", [(_flip, "its bytes do not match their recorded hash"),
                                         (_truncate, "its bytes do not match their recorded hash")])
def test_a_damaged_checkpoint_is_never_loaded_and_pretraining_resumes_from_the_one_before(tmp_path, caplog, damage, why):
    train, valid = _blocks(0, 10), _blocks(1, 4)
    full = pretrain(scratch_model(TINY, 100, 8, 0), train, valid, TINY, tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        pretrain(scratch_model(TINY, 100, 8, 0), train, valid, TINY, tmp_path / "b", progress=False, stop_after_steps=4)
    newest = tmp_path / "b" / "checkpoint.pt"
    assert (tmp_path / "b" / "checkpoint.prev.pt").is_file()
    damage(newest)  # flipped bytes load without error: only the hash tells
    with caplog.at_level(logging.WARNING, logger="metabolic.core.resume"):
        resumed = pretrain(scratch_model(TINY, 100, 8, 0), train, valid, TINY, tmp_path / "b", progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "metabolic.core.resume"]
    assert lines[0] == f"checkpoint {newest} is damaged ({why}): discarded, never loaded"
    assert lines[1].startswith("resuming from the checkpoint before it") and len(lines) == 2
    assert resumed.metrics == full.metrics  # the uninterrupted run's numbers, from the last good state


def test_checkpoints_verify_their_bytes_and_fall_back_in_order(tmp_path, caplog):
    path = tmp_path / "c.pt"
    assert resume.load_checkpoint(path) is None
    resume.save_checkpoint(path, {"step": 1})
    resume.save_checkpoint(path, {"step": 2})
    assert resume.load_checkpoint(path) == {"step": 2}
    (tmp_path / "c.pt.sha256").unlink()  # a checkpoint without its hash is not trusted either
    with caplog.at_level(logging.WARNING, logger="metabolic.core.resume"):
        assert resume.load_checkpoint(path) == {"step": 1}
    assert "it has no recorded hash" in caplog.records[0].getMessage() and not path.exists()
    _flip(tmp_path / "c.prev.pt", 4)
    assert resume.load_checkpoint(path) is None and not any(tmp_path.iterdir())  # nothing good: from the beginning
    resume.save_checkpoint(path, {"step": 3})
    resume.remove_checkpoint(path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stage, overrides, message", [
    ("pretrain", {"backbone.lr": 1e30}, "pretraining at step "),
    ("train", {"train.lr": 1e30}, "training diverged at step 1 "),
])
def test_a_diverging_run_stops_with_one_line_and_commits_nothing(run_copy, stage, overrides, message):
    cfg = load_config("smoke", {**TINY_OVERRIDES, **overrides})
    folder = run_copy / ("backbone" if stage == "pretrain" else "train/faithful")
    before = {p: _sha(p) for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(DivergedError, match=message) as info:
        if stage == "pretrain":
            stages.pretrain_backbone(cfg, progress=False)
        else:
            stages.train_metabolic(cfg, "faithful", progress=False)
    assert "\n" not in str(info.value) and "lower " in str(info.value)
    assert not folder.with_name(folder.name + ".partial").exists()  # no NaN weights, no dead partial
    assert {p: _sha(p) for p in folder.rglob("*") if p.is_file()} == before  # the previous run is untouched


# --- disk faults through the CLI ---------------------------------------------------------------

# Injected where the OS would raise them: a read-only file system refuses to create files and folders;
# a full disk fails when written data is flushed to it (every artefact write here ends in fsync).
_INJECT = textwrap.dedent("""
    import errno, os, sys
    data = os.environ["METABOLIC_DATA"]
    code = getattr(errno, os.environ["FAULT_ERRNO"])

    def inside(path):
        return os.path.abspath(os.fsdecode(path)).startswith(data)

    real_open, real_mkdir, real_fsync = os.open, os.mkdir, os.fsync
    def fault_open(path, flags, *a, **k):
        if inside(path) and code == errno.EROFS and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *a, **k)
    def fault_mkdir(path, *a, **k):
        if inside(path) and code == errno.EROFS and not os.path.exists(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_mkdir(path, *a, **k)
    def fault_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if inside(path) and code == errno.ENOSPC:
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)
    os.open, os.mkdir, os.fsync = fault_open, fault_mkdir, fault_fsync
    import builtins
    real_builtin_open = builtins.open
    def fault_builtin_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and inside(file) and code == errno.EROFS and set(mode) & set("wax+"):
            raise OSError(code, os.strerror(code), os.fsdecode(file))
        return real_builtin_open(file, mode, *a, **k)
    builtins.open = fault_builtin_open
    from metabolic.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("fault, fix", [
    ("EROFS", "point METABOLIC_DATA (and METABOLIC_FIGURES) at a writable folder"),
    ("ENOSPC", "free space or point METABOLIC_DATA at a larger disk"),
])
def test_disk_faults_are_one_line_exit_2_and_leave_no_temporary_files(tmp_path, fault, fix):
    data = tmp_path / "data"
    (data / "smoke").mkdir(parents=True)
    env = {**os.environ, "METABOLIC_DATA": str(data), "METABOLIC_FIGURES": str(tmp_path / "fig"), "FAULT_ERRNO": fault}
    proc = subprocess.run([sys.executable, "-c", _INJECT, "run", "--stages", "corpus"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"({fault})" in lines[0] and fix in lines[0] and str(data) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not [p for p in data.rglob("*") if p.is_file() and p.name.endswith(".tmp")]  # nothing half-written
    assert not (data / "smoke" / "corpus").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions; the injected EROFS case covers it")
def test_a_folder_without_write_permission_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        env = {**os.environ, "METABOLIC_DATA": str(data), "METABOLIC_FIGURES": str(tmp_path / "fig")}
        proc = subprocess.run([sys.executable, "-m", "metabolic", "run", "--stages", "corpus"], capture_output=True,
                              text=True, env=env, timeout=300)
    finally:
        data.chmod(0o755)
    assert proc.returncode == 2 and "(EACCES)" in proc.stderr and "Traceback" not in proc.stderr


def test_os_errors_that_are_not_disk_faults_keep_their_traceback():
    from metabolic.core.errors import os_fault_message

    assert os_fault_message(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
    assert os_fault_message(OSError(errno.ENOSPC, "No space left on device", "/d/f")) == (
        "cannot write /d/f: No space left on device (ENOSPC): the disk is full: free space or point METABOLIC_DATA "
        "at a larger disk, then rerun (finished work is kept)")


def test_a_kill_between_the_csc_merge_and_its_commit_keeps_the_merged_labels(tiny_cfg, run_copy, monkeypatch):
    """SIGKILL after the chunks are merged into csc.npz (and deleted) and before the manifest: the rerun
    reuses the merged labels instead of labelling every text again, and commits the same cache."""
    from metabolic.pipeline import csc as csc_stage

    clean = _sha(run_copy / "csc" / "csc.npz")
    shutil.rmtree(run_copy / "csc")
    real_stats, calls = csc_stage.csc_stats, []

    def killed_after_merge(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(csc_stage, "csc_stats", killed_after_merge)
    with pytest.raises(_Killed):
        stages.csc_labels(tiny_cfg, progress=False)
    partial = run_copy / "csc.partial"
    assert (partial / "csc.npz").is_file() and not (partial / "chunks").exists()  # merged, chunks gone
    monkeypatch.setattr(csc_stage, "csc_stats", real_stats)
    real_label = csc_stage.label_split
    monkeypatch.setattr(csc_stage, "label_split", lambda *a, **k: calls.append(1) or real_label(*a, **k))
    stages.csc_labels(tiny_cfg, progress=False)
    assert calls == [] and _sha(run_copy / "csc" / "csc.npz") == clean  # nothing relabelled, the same labels


# The evaluate stage at its smallest: the paper's prompt alone, short texts, one stop-rule text per split (most
# of its time is labelling the generations).
EVALUATE_OVERRIDES = {"generation.n_valid_prompts": 0, "generation.max_new_tokens": 6, "generation.stop_rule_texts": 1,
                      "generation.verified_candidates": (1,), "generation.verified_max_new_tokens": 8,
                      "generation.verified_scales": ("length",), "generation.verified_steered_candidates": ()}


def test_a_killed_evaluation_resumes_per_table_and_ends_as_an_uninterrupted_one(clean_run, monkeypatch):
    from metabolic.pipeline import evaluate as evaluate_stage

    overrides = {**TINY_OVERRIDES, **EVALUATE_OVERRIDES}
    cfg = load_config("smoke", overrides)
    uninterrupted = stages.evaluate_budgets(cfg, progress=False)
    folder = artefacts.run_dir(cfg.run_name) / "evaluation"
    shutil.rmtree(folder)

    kill_9("evaluate_budgets", overrides, "metabolic.pipeline.evaluate.save_checkpoint", 2)  # both tables saved
    parts = folder.with_name("evaluation.partial") / evaluate_stage.PARTS
    saved = sorted(p.name for p in parts.glob("*.pt"))
    assert saved == ["table1_expected-cost.pt", "table1_faithful.pt"] and not folder.exists()
    _flip(parts / "table1_faithful.pt", 4)  # a damaged part is recomputed, never loaded

    calls = []
    monkeypatch.setattr(evaluate_stage, "evaluate_variant", _counting(evaluate_stage.evaluate_variant, calls))
    resumed = stages.evaluate_budgets(cfg, progress=False)
    assert calls == ["faithful"]  # the intact table was reused, the damaged one and the rest were computed
    assert not folder.with_name("evaluation.partial").exists() and not (folder / evaluate_stage.PARTS).exists()
    assert _without_timings(resumed) == _without_timings(uninterrupted)


def test_a_killed_pretraining_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tiny_cfg, run_copy, caplog):
    folder = run_copy / "backbone"
    clean = {p.relative_to(folder): _sha(p) for p in folder.rglob("*") if p.is_file() and p.name != artefacts.MANIFEST}
    shutil.rmtree(folder)
    kill_9("pretrain_backbone", TINY_OVERRIDES, "metabolic.core.resume.save_checkpoint", 1)  # step 2 of 4 kept
    assert (folder.with_name("backbone.partial") / "checkpoint.pt").is_file() and not folder.exists()
    with caplog.at_level(logging.INFO, logger="metabolic.train.pretrain"):
        stages.pretrain_backbone(tiny_cfg, progress=False)
    assert "resuming pretraining at step 2 of 4" in [r.getMessage() for r in caplog.records]
    resumed = {p.relative_to(folder): _sha(p) for p in folder.rglob("*") if p.is_file() and p.name != artefacts.MANIFEST}
    assert resumed == clean  # weights and metrics byte for byte


def test_a_killed_labelling_resumes_at_its_first_missing_chunk_and_ends_as_an_uninterrupted_one(run_copy, monkeypatch):
    overrides = {**TINY_OVERRIDES, "csc.chunk_sequences": 2}  # 3 train + 2 valid chunks
    cfg = load_config("smoke", overrides)
    kill_9("csc_labels", overrides, "metabolic.core.artefacts.write_hashed", 1)  # the first chunk kept
    chunks = run_copy / "csc.partial" / "chunks"
    assert sorted(p.name for p in chunks.glob("*.npz")) == ["train-00000.npz"]
    written, real_write = [], artefacts.write_hashed
    monkeypatch.setattr(artefacts, "write_hashed", lambda path, data: written.append(Path(path).name) or real_write(path, data))
    stages.csc_labels(cfg, progress=False)
    assert written == ["train-00001.npz", "train-00002.npz", "valid-00000.npz", "valid-00001.npz"]  # the rest, once
    resumed = _sha(run_copy / "csc" / "csc.npz")
    shutil.rmtree(run_copy / "csc")
    stages.csc_labels(cfg, progress=False)
    assert resumed == _sha(run_copy / "csc" / "csc.npz")  # the uninterrupted labels, byte for byte


def test_a_killed_training_resumes_after_its_last_epoch_and_ends_as_an_uninterrupted_one(tiny_cfg, clean_run, run_copy,
                                                                                       caplog):
    folder = run_copy / "train" / "faithful"
    shutil.rmtree(folder)
    # train.variant names the variant the child trains; the run's key holds the variant either way
    kill_9("train_metabolic", {**TINY_OVERRIDES, "train.variant": "faithful"}, "metabolic.core.resume.save_checkpoint", 1)
    assert (folder.with_name("faithful.partial") / "checkpoint.pt").is_file() and not folder.exists()
    with caplog.at_level(logging.INFO, logger="metabolic.train.loop"):
        stages.train_metabolic(tiny_cfg, "faithful", progress=False)
    assert "resuming faithful training after epoch 1 of 2" in [r.getMessage() for r in caplog.records]
    clean = clean_run / "train" / "faithful"
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file() and p.name != artefacts.MANIFEST)
    assert files == sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != artefacts.MANIFEST)
    assert {f: _sha(folder / f) for f in files} == {f: _sha(clean / f) for f in files}  # models, metrics, selection


def _counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(args[9])  # the variant
        return function(*args, **kwargs)

    return counted


def _without_timings(combined):
    """Tables minus what measures this machine's speed (seconds, labelling rates)."""
    import json

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if "seconds" not in k and "rate_texts" not in k}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return json.loads(json.dumps(strip(combined)))


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk for the library writers (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "full"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode}); the test below covers "
                    "the same conversion with safetensors' own exception")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("writer", ["safetensors", "numpy"])
def test_a_library_writer_on_a_full_disk_names_the_folder(full_disk, writer):
    import numpy as np
    from metabolic.core.errors import os_fault_message

    def build(work):
        if writer == "safetensors":  # transformers' save_pretrained raises SafetensorError, naming no file
            scratch_model(TINY, vocab_size=2000, n_positions=32, eos_id=0).save_pretrained(work)
        else:  # numpy's write raises OSError(28) without a file name
            with open(work / "prior.npz", "wb") as fh:
                np.savez(fh, cost=np.zeros(100_000))

    with pytest.raises(OSError) as info:
        artefacts.build_artefact(full_disk / "stage", {"writer": writer}, build)
    where = str(full_disk / "stage.partial")
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, where)
    assert os_fault_message(info.value).startswith(f"cannot write {where}: No space left on device (ENOSPC): the disk is full")


def test_safetensors_disk_errors_name_the_folder_and_others_pass_through(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(OSError) as info, artefacts.naming_faults(tmp_path):
        raise SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
    assert (info.value.errno, info.value.filename) == (errno.EROFS, str(tmp_path))
    with pytest.raises(SafetensorError, match="os error 2\\)"), artefacts.naming_faults(tmp_path):
        raise SafetensorError("Error while deserializing: No such file or directory (os error 2)")  # not a disk fault
    with pytest.raises(OSError) as info, artefacts.naming_faults(tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device", "/named/already")
    assert info.value.filename == "/named/already"
