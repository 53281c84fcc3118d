"""WikiText-2 loading (both sources), tokenisation, subsampling and packing."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from metabolic.core.config import AssetsConfig
from metabolic.core.errors import DataError
from metabolic.data.corpus import (
    load_corpus,
    non_empty_texts,
    pack_blocks,
    pack_ids,
    select_sequences,
    subsample_indices,
    unpack_ids,
)


def test_offline_release_has_the_papers_split_sizes(assets_dir):
    corpus = load_corpus(AssetsConfig())
    assert (len(corpus.train), len(corpus.validation)) == (23767, 2461)
    assert corpus.source == "assets" and corpus.train[0] == "= Valkyria Chronicles III ="


def test_datasets_source_has_the_papers_split_sizes(assets_dir, tmp_path):
    """The `datasets` path on a local copy laid out like the Hub repo (parquet per config, README configs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "wikitext"
    (repo / "wikitext-2-raw-v1").mkdir(parents=True)
    for split, name in (("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")):
        # The Hub's rows keep the trailing newline and the empty lines, as here.
        lines = [line + "\n" for line in (assets_dir / "wikitext-2" / name).read_text(encoding="utf-8").split("\n")[:-1]]
        pq.write_table(pa.table({"text": lines}), repo / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: train\n    path: wikitext-2-raw-v1/train-*\n"
        "  - split: validation\n    path: wikitext-2-raw-v1/validation-*\n"
        "  - split: test\n    path: wikitext-2-raw-v1/test-*\n---\n"
    )
    corpus = load_corpus(AssetsConfig(wikitext_dataset=str(repo), wikitext_source="hub"))
    assert (len(corpus.train), len(corpus.validation)) == (23767, 2461)
    assert corpus.source == "hub" and corpus.train[0] == "= Valkyria Chronicles III ="


def test_empty_corpus_is_a_clear_error(monkeypatch, tmp_path, assets_dir):
    folder = tmp_path / "assets" / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("\n \n\n")
    shutil.copy(assets_dir / "wikitext-2" / "valid.txt", folder / "valid.txt")
    monkeypatch.setenv("METABOLIC_ASSETS", str(tmp_path / "assets"))
    with pytest.raises(DataError, match="train split from .* has no non-empty lines"):
        load_corpus(AssetsConfig())


def test_non_empty_texts_strips_and_drops_blank_lines():
    assert non_empty_texts([" = A = \n", "\n", "   ", " b c "]) == ["= A =", "b c"]


@given(st.integers(0, 500), st.one_of(st.none(), st.integers(1, 600)), st.integers(0, 10))
def test_subsample_is_sorted_unique_seeded(n, k, seed):
    idx = subsample_indices(n, k, seed)
    assert idx == sorted(set(idx)) and len(idx) == (n if k is None else min(n, k))
    assert all(0 <= i < n for i in idx) and idx == subsample_indices(n, k, seed)


@given(st.lists(st.lists(st.integers(0, 50256), max_size=8), max_size=8))
def test_pack_unpack_round_trip(ids):
    assert unpack_ids(*pack_ids(ids)) == ids


def test_select_sequences_caps_filters_and_is_deterministic():
    ids = [[1] * n for n in range(0, 40)]
    seqs = select_sequences(ids, max_texts=10, seq_len=16, min_tokens=4, seed=3)
    assert len(seqs) == 10 and all(4 <= len(s) <= 16 for s in seqs)
    assert seqs == select_sequences(ids, 10, 16, 4, 3)
    with pytest.raises(DataError, match="corpus.min_tokens=100"):
        select_sequences(ids, 10, 200, 100, 0)


def test_pack_blocks_joins_with_eos_and_drops_the_remainder():
    blocks = pack_blocks([[1, 2, 3], [4, 5]], block_size=3, eos_id=0)
    assert torch.equal(blocks, torch.tensor([[1, 2, 3], [0, 4, 5]]))
    with pytest.raises(DataError, match="backbone.block_size=64"):
        pack_blocks([[1]], 64, 0)


def test_corpus_texts_are_read_once_until_their_files_change(tmp_path, monkeypatch):
    """Every stage asks for the corpus: its texts and hashes are read once per process, and read again
    (with new hashes) when a source file is replaced."""
    from metabolic.data import corpus as corpus_module
    from metabolic.pipeline.corpus import corpus_texts

    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for name, text in (("train.txt", "A first text.\nA second text.\n"), ("valid.txt", "Held out.\n"), ("test.txt", "Test.\n")):
        (folder / name).write_text(text, encoding="utf-8")
    reads = []
    real = corpus_module._load_from_assets
    monkeypatch.setattr(corpus_module, "_load_from_assets", lambda f: reads.append(f) or real(f))
    assets = AssetsConfig(wikitext_dataset=str(folder))
    texts, hashes = corpus_texts(assets)
    assert texts.train == ["A first text.", "A second text."] and corpus_texts(assets)[1] is hashes
    assert len(reads) == 1
    (folder / "train.txt").write_text("Another text.\n", encoding="utf-8")
    again, new_hashes = corpus_texts(assets)
    assert len(reads) == 2 and again.train == ["Another text."]
    assert new_hashes["train_sha256"] != hashes["train_sha256"] and new_hashes["valid_sha256"] == hashes["valid_sha256"]
