"""Artefacts: atomic writes, fingerprinted reuse, stale/corrupt detection, nothing half-written."""

from __future__ import annotations

import json

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
    artefacts.build_artefact(folder, {"a": 1}, _builder(calls), "{}", required=("payload.txt",))
    artefacts.build_artefact(folder, {"a": 1}, _builder(calls), "{}", required=("payload.txt",))
    assert len(calls) == 1
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
