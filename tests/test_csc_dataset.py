"""The cached CSC dataset (issue 3): resume after an interruption, rebuild on any changed input or a
corrupt file, totals and budget statistics. Real corpus, tokenizer and encoder on tiny inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metabolic.core.errors import ConfigError, DataError

# Five short sequences (<= 8 tokens), one per chunk, so that an interruption can fall between chunks.
CACHE_OVERRIDES = {"corpus.seq_len": 8, "csc.max_sequences": 3, "csc.max_valid_sequences": 2, "csc.chunk_sequences": 1}


@pytest.fixture()
def fresh_data(tiny_cfg, tmp_path, monkeypatch):
    """An empty data root holding only a copy of the tiny profile's corpus artefact (no relabelling shared)."""
    from metabolic.core import artefacts
    from metabolic.core.config import apply_overrides
    from metabolic.pipeline import stages

    stages.corpus(tiny_cfg)
    src = artefacts.run_dir(tiny_cfg.run_name) / "corpus"
    monkeypatch.setenv("METABOLIC_DATA", str(tmp_path))
    shutil.copytree(src, artefacts.run_dir(tiny_cfg.run_name) / "corpus")
    return apply_overrides(tiny_cfg, CACHE_OVERRIDES)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


@pytest.mark.slow
def test_interrupted_run_resumes_and_gives_the_same_labels(fresh_data, monkeypatch, caplog):
    from metabolic.core import artefacts
    from metabolic.csc.labeller import CSCLabeller
    from metabolic.pipeline.stages import csc_labels

    cfg = fresh_data
    folder = artefacts.run_dir(cfg.run_name) / "csc"
    real_groups = CSCLabeller.label_groups
    chunks_done = []

    def killed_after_two_chunks(self, *args, **kwargs):
        for item in real_groups(self, *args, **kwargs):
            if len(chunks_done) == 2:
                raise KeyboardInterrupt("simulated kill")
            chunks_done.append(1)
            yield item

    monkeypatch.setattr(CSCLabeller, "label_groups", killed_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        csc_labels(cfg, progress=False)
    assert not folder.exists()  # nothing half-written where readers look
    partial = folder.with_name("csc.partial")
    saved = sorted((partial / "chunks").glob("*.npz"))
    assert len(saved) == 2 and all(artefacts.hash_path(p).exists() for p in saved)
    data = bytearray(saved[1].read_bytes())
    data[-40] ^= 0xFF  # one flipped byte in the labels: it still loads, but fails its SHA-256
    saved[1].write_bytes(bytes(data))

    resumed_chunks = []

    def counting(self, *args, **kwargs):
        for item in real_groups(self, *args, **kwargs):
            resumed_chunks.append(1)
            yield item

    monkeypatch.setattr(CSCLabeller, "label_groups", counting)
    resumed = csc_labels(cfg, progress=False)
    assert len(resumed_chunks) == 4  # 5 chunks: 1 reused, 1 damaged and 3 missing relabelled
    assert any("chunk" in r.message and "do not match their recorded hash" in r.message for r in caplog.records)
    assert not partial.exists() and (folder / "csc.npz").exists()

    shutil.rmtree(folder)  # an uninterrupted run from scratch gives the same labels
    uninterrupted = csc_labels(cfg, progress=False)
    assert _same(resumed.train_csc, uninterrupted.train_csc) and _same(resumed.valid_csc, uninterrupted.valid_csc)
    assert resumed.fingerprint == uninterrupted.fingerprint
    assert len(resumed.train_ids) == 3 and len(resumed.valid_ids) == 2
    assert [len(c) for c in resumed.train_csc] == [len(x) for x in resumed.train_ids]
    assert all(np.isfinite(c).all() and c.dtype == np.float32 for c in resumed.train_csc)

    # Reused while fresh: no labelling at all.
    resumed_chunks.clear()
    again = csc_labels(cfg, progress=False)
    assert resumed_chunks == [] and _same(again.train_csc, uninterrupted.train_csc)


@pytest.mark.slow
def test_changed_inputs_rebuild_and_corrupt_cache_is_rebuilt(fresh_data, assets_dir, monkeypatch):
    from metabolic.core import artefacts
    from metabolic.core.config import apply_overrides
    from metabolic.csc.labeller import CSCLabeller
    from metabolic.pipeline.stages import csc_labels

    cfg = fresh_data
    base = csc_labels(cfg, progress=False)
    real_groups = CSCLabeller.label_groups
    calls = []

    def counting(self, *args, **kwargs):
        for item in real_groups(self, *args, **kwargs):
            calls.append(1)
            yield item

    monkeypatch.setattr(CSCLabeller, "label_groups", counting)

    # A corrupt data file under a matching manifest is detected and rebuilt, not reused.
    path = artefacts.run_dir(cfg.run_name) / "csc" / "csc.npz"
    path.write_bytes(path.read_bytes()[:100])
    rebuilt = csc_labels(cfg, progress=False)
    assert calls and _same(rebuilt.train_csc, base.train_csc)

    # Another encoder (the fp16 copy of MiniLM: other weights) rebuilds, with different labels.
    calls.clear()
    other = csc_labels(apply_overrides(cfg, {"assets.encoder": str(assets_dir / "all-MiniLM-L6-v2-fp16")}), progress=False)
    assert calls and other.fingerprint != base.fingerprint
    assert not _same(other.train_csc, base.train_csc)
    diff = max(float(np.nanmax(np.abs(a - b))) for a, b in zip(other.train_csc, base.train_csc))
    assert diff < 5e-3  # fp16-rounded weights: close, not identical

    # Any fingerprinted input: the position policy.
    calls.clear()
    subset = csc_labels(apply_overrides(cfg, {"csc.positions": "subset", "csc.positions_per_sequence": 2}), progress=False)
    assert calls and subset.fingerprint not in (base.fingerprint, other.fingerprint)
    assert all((~np.isnan(c)).sum() == min(2, len(c)) for c in subset.train_csc)


def test_stats_and_budgets_follow_the_config(fresh_data):
    from metabolic.core.config import apply_overrides
    from metabolic.csc.dataset import sequence_totals
    from metabolic.pipeline.stages import csc_labels

    data = csc_labels(fresh_data, progress=False)
    totals = np.array([c.sum() for c in data.train_csc], dtype=np.float64)
    s = data.stats
    assert s["scale"] == "raw" and s["n_sequences"] == 3
    np.testing.assert_allclose(s["mean"], totals.mean(), rtol=1e-6)
    np.testing.assert_allclose(s["var"], totals.var(ddof=1), rtol=1e-6)
    np.testing.assert_allclose(s["std"] ** 2, s["var"], rtol=1e-9)
    assert s["budgets"]["low"] <= s["budgets"]["medium"] <= s["budgets"]["high"]
    np.testing.assert_allclose(s["budgets"]["medium"], np.median(totals), rtol=1e-6)
    np.testing.assert_allclose(s["quantiles"][0.25], np.quantile(totals, 0.25), rtol=1e-6)
    flat = np.concatenate(data.train_csc).astype(np.float64)
    np.testing.assert_allclose(s["token_mean"], flat.mean(), rtol=1e-6)

    length = csc_labels(apply_overrides(fresh_data, {"csc.scale": "length"}), progress=False)
    assert length.fingerprint == data.fingerprint  # the scale is read from the same labels
    lengths = np.array([len(x) for x in data.train_ids])
    np.testing.assert_allclose(length.stats["mean"], (totals * lengths).mean(), rtol=1e-6)
    np.testing.assert_allclose(sequence_totals(data.train_csc, "length"), totals * lengths, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=1, max_size=30), st.data())
def test_sequence_totals(values, data):
    from metabolic.csc.dataset import sequence_totals

    c = np.array(values, dtype=np.float32)
    T = c.size
    np.testing.assert_allclose(sequence_totals([c])[0], c.astype(np.float64).sum(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sequence_totals([c], "length")[0], T * c.astype(np.float64).sum(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sequence_totals([c], "length", lengths=[T + 7])[0], (T + 7) * c.astype(np.float64).sum(),
                               rtol=1e-9, atol=1e-12)
    # Partially labelled: mean of the labelled tokens times T (exact when the labels are constant).
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=T, max_size=T)))
    part = np.where(mask, c, np.nan).astype(np.float32)
    expected = c[mask].astype(np.float64).mean() * T if mask.any() else np.nan
    np.testing.assert_allclose(sequence_totals([part])[0], expected, rtol=1e-9, atol=1e-12)
    const = np.where(mask, 0.25, np.nan)
    if mask.any():
        np.testing.assert_allclose(sequence_totals([const])[0], 0.25 * T)


def test_totals_reject_bad_input():
    from metabolic.csc.dataset import csc_stats, sequence_totals

    with pytest.raises(ConfigError, match="scale='words'"):  # a setting: metabolic.core.budget.check_scale
        sequence_totals([np.ones(2)], "words")
    with pytest.raises(DataError, match="one per sequence"):
        sequence_totals([np.ones(2)], "length", lengths=[1, 2])
    with pytest.raises(DataError, match="no sequence has a CSC label"):
        csc_stats([np.full(3, np.nan)], "raw", (0.25, 0.5, 0.75))


@pytest.mark.slow
def test_batch_size_is_not_in_the_cache_key_because_labels_agree_within_1e6(tiny_cfg):
    """csc.batch_size changes only how counterfactuals are padded together, i.e. float rounding: a cache
    labelled at one batch size serves every other (labels agree to < 1e-6 absolute in fp32)."""
    import dataclasses

    from metabolic.pipeline import stages

    sequences = stages.select_for_labelling(tiny_cfg, stages.corpus(tiny_cfg))[1]
    labels = {}
    for batch_size in (3, 16, 256):
        cfg = dataclasses.replace(tiny_cfg, csc=dataclasses.replace(tiny_cfg.csc, batch_size=batch_size))
        labels[batch_size] = np.concatenate(stages.csc_labeller(cfg, device="cpu").label(sequences, progress=False))
    assert labels[3].size == sum(map(len, sequences)) and np.all(np.isfinite(labels[3]))
    for batch_size in (16, 256):
        assert np.max(np.abs(labels[batch_size] - labels[3])) < 1e-6
    # and the stage's description (its cache key) leaves it out on purpose
    assert "batch_size" not in stages.csc_description_keys()
