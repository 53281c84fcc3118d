"""Artefacts: atomic writes, fingerprinted reuse, stale/corrupt detection, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from metabolic.core import artefacts


def _builder(calls, payload="x"):
    def build(work):
        calls.append(work)
        (work / "payload.txt").write_text(payload)
        return {"n": len(calls)}

    return build


def test_fresh_artefact_is_reused_and_stale_one_rebuilt(tmp_path):
    folder, calls = tmp_path / "stage", []
    built = artefacts.build_artefact(folder, {"a": 1}, _builder(calls), "{}", required=("payload.txt",))
    assert artefacts.build_artefact(folder, {"a": 1}, _builder(calls), "{}", required=("payload.txt",)) == built
    assert len(calls) == 1 and built == (folder, artefacts.read_manifest(folder)["fingerprint"])
    assert json.loads((folder / artefacts.CONFIG_FILE).read_text()) == {}
    artefacts.build_artefact(folder, {"a": 2}, _builder(calls, "y"), required=("payload.txt",))
    assert len(calls) == 2 and (folder / "payload.txt").read_text() == "y"
    assert not folder.with_name("stage.partial").exists()


@pytest.mark.parametrize("damage", ["corrupt_manifest", "missing_file"])
def test_corrupt_artefact_is_rebuilt(tmp_path, damage):
    folder, calls = tmp_path / "stage", []
    artefacts.build_artefact(folder, {"a": 1}, _builder(calls), required=("payload.txt",))
    if damage == "corrupt_manifest":
        (folder / artefacts.MANIFEST).write_text("{not json")
    else:
        (folder / "payload.txt").unlink()
    artefacts.build_artefact(folder, {"a": 1}, _builder(calls), required=("payload.txt",))
    assert len(calls) == 2 and (folder / "payload.txt").exists()


def test_failed_build_leaves_previous_artefact_untouched(tmp_path):
    folder, calls = tmp_path / "stage", []
    artefacts.build_artefact(folder, {"a": 1}, _builder(calls, "old"))

    def boom(work):
        (work / "payload.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        artefacts.build_artefact(folder, {"a": 2}, boom)
    assert (folder / "payload.txt").read_text() == "old"
    assert artefacts.read_manifest(folder)["n"] == 1


def test_partial_work_is_resumed_only_for_the_same_inputs(tmp_path):
    folder = tmp_path / "stage"
    seen = []

    def interrupted(work):
        (work / "chunk-0").write_text("done")
        raise KeyboardInterrupt

    def resume(work):
        seen.append(sorted(p.name for p in work.iterdir() if not p.name.startswith(".")))

    with pytest.raises(KeyboardInterrupt):
        artefacts.build_artefact(folder, {"a": 1}, interrupted)
    artefacts.build_artefact(folder, {"a": 1}, resume)
    assert seen == [["chunk-0"]]
    with pytest.raises(KeyboardInterrupt):
        artefacts.build_artefact(tmp_path / "other", {"a": 1}, interrupted)
    artefacts.build_artefact(tmp_path / "other", {"a": 9}, resume)  # other inputs: partial work discarded
    assert seen[-1] == []


def test_atomic_write_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "f.json"
    artefacts.atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        artefacts.atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=5))
def test_fingerprint_ignores_key_order(d):
    reordered = dict(reversed(list(d.items())))
    assert artefacts.fingerprint(d) == artefacts.fingerprint(reordered)


class _Killed(BaseException):
    """Stands for a kill -9 at one instruction: nothing after it runs (not even `except Exception`)."""


@pytest.mark.parametrize("existing", [False, True])  # first build, or a rebuild over a stale artefact
@pytest.mark.parametrize("kill_at", [1, 2, 3])  # the k-th os.replace of the commit (3 = none left: after it)
def test_a_kill_during_the_commit_loses_no_work(tmp_path, monkeypatch, existing, kill_at):
    folder, calls = tmp_path / "stage", []
    if existing:
        artefacts.build_artefact(folder, {"a": 0}, _builder(calls, "old"))
    real_replace, seen = artefacts.os.replace, []

    def replace(src, dst):
        if Path(src).is_dir():  # the commit's folder renames (file writes also use os.replace)
            seen.append((src, dst))
            if len(seen) == kill_at:
                raise _Killed
        return real_replace(src, dst)

    monkeypatch.setattr(artefacts.os, "replace", replace)
    monkeypatch.setattr(artefacts.shutil, "rmtree", _killing_rmtree(artefacts.shutil.rmtree, kill_at, seen))
    try:
        artefacts.build_artefact(folder, {"a": 1}, _builder(calls, "new"))
    except _Killed:
        pass
    monkeypatch.undo()
    n_builds = len(calls)
    artefacts.build_artefact(folder, {"a": 1}, _builder(calls, "new"))  # the rerun
    assert len(calls) == n_builds  # adopted or reused: never built again
    assert (folder / "payload.txt").read_text() == "new" and artefacts.read_manifest(folder)["n"] == n_builds
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["stage"]  # no leftovers


def _killing_rmtree(real, kill_at, seen):
    """rmtree that dies when the commit's renames are done and `kill_at` points past them."""
    def rmtree(path, *args, **kwargs):
        if str(path).endswith(".old") and len(seen) + 1 == kill_at:
            raise _Killed
        return real(path, *args, **kwargs)
    return rmtree


def test_waiting_on_a_lock_says_so(tmp_path, caplog):
    import fcntl
    import logging

    from metabolic.core import artefacts as art

    lock = tmp_path / ".stage.lock"
    with open(lock, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        import threading

        def release():
            fcntl.flock(holder, fcntl.LOCK_UN)

        timer = threading.Timer(0.3, release)
        timer.start()
        with caplog.at_level(logging.INFO, logger="metabolic.core.artefacts"):
            with art._exclusive(lock):
                pass
        timer.join()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"waiting for another process building {tmp_path / 'stage'} (lock {lock})"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metabolic.core.artefacts"), art._exclusive(lock):
        pass
    assert caplog.records == []  # a free lock is taken without a word


def test_reuse_only_reads_a_fresh_artefact_and_refuses_to_build(tmp_path):
    from metabolic.core.errors import StaleArtefactError

    built = []
    build = _builder(built, "1")
    folder = tmp_path / "stage"
    with artefacts.reuse_only(), pytest.raises(StaleArtefactError, match=r"stage is absent.*rerun the stages"):
        artefacts.build_artefact(folder, {"a": 1}, build)
    assert not built and not folder.exists() and not (tmp_path / "stage.partial").exists()
    artefacts.build_artefact(folder, {"a": 1}, build)
    with artefacts.reuse_only():
        assert artefacts.build_artefact(folder, {"a": 1}, build).folder == folder  # fresh: read, not built
        with pytest.raises(StaleArtefactError, match=r"stale \(made from other inputs\)"):
            artefacts.build_artefact(folder, {"a": 2}, build)
    assert len(built) == 1 and (folder / "payload.txt").read_text() == "1"
    artefacts.build_artefact(folder, {"a": 2}, build)  # outside the block, a stale artefact is rebuilt as ever
    assert len(built) == 2


def test_a_stage_is_loaded_once_per_process_until_its_files_change(tmp_path):
    from metabolic.pipeline.stage import loaded_once

    folder, loads = tmp_path / "stage", []
    built = artefacts.build_artefact(folder, {"a": 1}, _builder([]), required=("payload.txt",))

    def load():
        loads.append(1)
        return (folder / "payload.txt").read_text()

    stage = object()
    assert loaded_once(stage, built, load) == loaded_once(stage, built, load) == "x" and len(loads) == 1
    (folder / "payload.txt").write_text("zz")  # other bytes now: loaded again
    assert loaded_once(stage, built, load) == "zz" and len(loads) == 2
