"""Spliced counterfactual word pieces (issue 13): id for id equal to decoding and tokenizing each
counterfactual, on WikiText-2 and on random text; labels equal to the full path. Real GPT-2 tokenizer,
real all-MiniLM-L6-v2 (tokenizer and encoder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# Fragments that stress each step of the proof: byte-level splits of multi-byte characters (é, 東京,
# emoji), BERT normalisation (accents, combining marks, upper case, control characters, U+FFFD),
# punctuation and CJK splitting, runs of ASCII and non-ASCII spaces, added-token text, WikiText marks,
# words past WordPiece's 100 characters ([UNK]).
FRAGMENTS = ["the", "The", " cat", "Ω", "é", "e\u0301", "naïve", "CAFÉ", "東京", "日本語", "😀", "𝔘", "ß", "İ", "ﬁ",
             " ", "  ", "   ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", ",", ".", "!?", "@-@", " @,@ ", "<unk>",
             "'s", "(", ")", "[MASK]", "[UNK]", "\x0b", "\x00", "\ufffd", "Σ", "ς", "x" * 101, "ab" * 60, "٣", "ก", "ㄱ"]
TEXTS = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=24).map("".join),
    st.text(st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S", "Z", "Cc")), max_size=40),
)


@pytest.fixture(scope="module")
def encoder(assets_dir):
    from metabolic.core.assets import load_encoder

    return load_encoder("sentence-transformers/all-MiniLM-L6-v2").value


@pytest.fixture(scope="module")
def splicers(encoder, tokenizer):
    from metabolic.csc.splice import PieceSplicer

    return PieceSplicer(tokenizer, encoder.tokenizer), PieceSplicer(tokenizer, encoder.tokenizer, splice=False)


def _assert_rows_equal(splicers, seqs, positions=None):
    """Spliced rows == full-path rows (decode, tokenize), row by row, every counterfactual spliced."""
    spliced, full = splicers
    positions = positions or [np.arange(len(s)) for s in seqs]
    before = spliced.counts.fallback
    a, owner_a, pos_a = spliced.rows(seqs, positions)
    b, owner_b, pos_b = full.rows(seqs, positions)
    np.testing.assert_array_equal(owner_a, owner_b)
    np.testing.assert_array_equal(pos_a, pos_b)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.flat(), b.flat())
    return spliced.counts.fallback - before


def test_full_path_is_decode_then_tokenize(splicers, tokenizer, encoder):
    """The reference itself: each row is the encoder's tokenization of `decode(ids without t)`."""
    ids = np.asarray(tokenizer("naïve café – 東京, twice  spaced.")["input_ids"])
    rows, owner, position = splicers[1].rows([ids], [np.arange(ids.size)])
    assert position.tolist() == [-1] + list(range(ids.size)) and set(owner.tolist()) == {0}
    texts = [tokenizer.decode(ids.tolist())] + [tokenizer.decode(np.delete(ids, t).tolist()) for t in range(ids.size)]
    assert [rows.row(j) for j in range(len(texts))] == encoder.tokenizer(texts)["input_ids"]


def test_wikitext_validation_sample_is_spliced_exactly(splicers, tokenizer, assets_dir):
    """A seeded sample of WikiText-2 validation texts (as the corpus stage cuts them) and its longest text;
    scripts/csc_splice_sweep.py runs the same check over the whole split."""
    from metabolic.core.config import AssetsConfig
    from metabolic.data.corpus import load_corpus, tokenize

    texts = load_corpus(AssetsConfig()).validation
    rng = np.random.default_rng(13)
    sample = [texts[i] for i in rng.choice(len(texts), size=40, replace=False)]
    sample.append(max(texts, key=len))
    seqs = [np.asarray(x, dtype=np.int64) for x in tokenize(tokenizer, sample)]
    assert sum(s.size for s in seqs) > 3000
    assert _assert_rows_equal(splicers, seqs) == 0


@settings(max_examples=100, deadline=None)
@given(TEXTS)
def test_random_text_is_spliced_exactly(splicers, tokenizer, text):
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    assert _assert_rows_equal(splicers, [ids]) == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 50255), st.integers(94, 255), st.sampled_from([220, 197, 198, 13, 11])),
                min_size=1, max_size=30))
def test_random_ids_are_spliced_exactly(splicers, tokenizer, ids):
    """Arbitrary id sequences: invalid UTF-8 (lone pieces of multi-byte characters) included."""
    seq = np.asarray(ids, dtype=np.int64)
    assert _assert_rows_equal(splicers, [seq]) == 0


def test_sequences_cut_inside_a_character_are_spliced_exactly(splicers, tokenizer):
    """Every prefix of a text whose characters span several GPT-2 tokens: some end in a partial
    character (invalid UTF-8, decoded with U+FFFD), as a text capped at corpus.seq_len can."""
    ids = tokenizer("東京 and 😀 x\tnaïve  日本 end")["input_ids"]
    prefixes = [np.asarray(ids[:k], dtype=np.int64) for k in range(1, len(ids) + 1)]
    assert sum("\ufffd" in tokenizer.decode(p.tolist()) for p in prefixes) >= 3
    assert _assert_rows_equal(splicers, prefixes) == 0


def test_end_of_text_takes_the_full_path_and_is_counted(splicers, tokenizer):
    a = np.asarray(tokenizer("Before the end.")["input_ids"] + [tokenizer.eos_token_id] + tokenizer(" After")["input_ids"])
    b = np.asarray(tokenizer("Plain text here.")["input_ids"])
    reasons = dict(splicers[0].counts.reasons)
    assert _assert_rows_equal(splicers, [a, b], [np.arange(a.size), np.array([0, 2])]) == a.size
    key = next(k for k in splicers[0].counts.reasons if "added token" in k)
    assert splicers[0].counts.reasons[key] - reasons.get(key, 0) == a.size


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=24))
def test_python_lossy_utf8_equals_gpt2_decode(tokenizer, data):
    """The local spans are decoded by Python; GPT-2's decoder (Rust) gives the same text for any bytes."""
    from metabolic.csc.splice import gpt2_byte_decoder

    byte_to_id = {b: tokenizer.convert_tokens_to_ids(ch) for ch, b in gpt2_byte_decoder().items()}
    assert tokenizer.decode([byte_to_id[b] for b in data]) == data.decode("utf-8", "replace")


def test_another_tokenizer_family_takes_the_full_path(tokenizer):
    """A pair outside the proof (GPT-2's BPE as the 'encoder' tokenizer) is refused and every row is the full path."""
    from metabolic.csc.splice import PieceSplicer

    other = PieceSplicer(tokenizer, tokenizer)
    assert other.disabled is not None and "encoder's normalizer" in other.disabled
    ids = np.asarray(tokenizer("Two words")["input_ids"])
    rows, _, _ = other.rows([ids], [np.arange(ids.size)])
    assert rows.row(1) == tokenizer(tokenizer.decode(ids[1:].tolist()))["input_ids"]
    assert other.counts.fallback == ids.size


def test_gather_builds_padded_rows(splicers, tokenizer):
    ids = np.asarray(tokenizer("A short text, then a longer one with more words.")["input_ids"])
    rows, _, _ = splicers[0].rows([ids], [np.arange(ids.size)])
    idx = np.array([3, 0, 5])
    batch = rows.gather(idx, pad_id=0)
    assert batch["input_ids"].shape == (3, int(rows.lengths[idx].max()))
    on_device = rows.gather(idx, pad_id=0, use_torch=True)  # the GPU's code path, run on the CPU
    for key in ("input_ids", "attention_mask"):
        assert batch[key].dtype == on_device[key].dtype == torch.int64
        assert torch.equal(batch[key], on_device[key])
    for r, j in enumerate(idx):
        n = int(rows.lengths[j])
        assert batch["input_ids"][r, :n].tolist() == rows.row(j) and int(batch["attention_mask"][r].sum()) == n
        assert (batch["input_ids"][r, n:] == 0).all()


def test_labels_equal_the_full_path(encoder, tokenizer):
    """Spliced pieces feed the same batches: labels equal to decoding every counterfactual (fp32 CPU)."""
    from metabolic.csc.labeller import CSCLabeller

    texts = ["The quick brown fox jumps over the lazy dog.", "naïve café – 東京 and   spaces", "Word@-@joined <unk> text."]
    seqs = [tokenizer(t)["input_ids"] for t in texts] + [tokenizer("End")["input_ids"] + [tokenizer.eos_token_id]]
    positions = [None, None, np.array([0, 3, 4]), None]
    new = CSCLabeller(encoder, tokenizer, batch_size=16)
    old = CSCLabeller(encoder, tokenizer, batch_size=16, splice=False)
    got, ref = new.label(seqs, positions, progress=False), old.label(seqs, positions, progress=False)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
    assert new.splicer.counts.spliced == sum(len(s) for s in seqs[:2]) + 3
    assert new.splicer.counts.fallback == len(seqs[3])  # <|endoftext|>: the full path
