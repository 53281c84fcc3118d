"""Exact CSC labeller (issue 3 acceptance): agreement with an independent computation, decoding of
multi-byte text, edge cases and bad input. Real GPT-2 tokenizer and real all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metabolic.core.errors import AssetError, ConfigError, DataError
from metabolic.csc.splice import counterfactual_texts

FIXED_TEXT = "The quick brown fox jumps over the lazy dog near the old river bank."
MULTIBYTE = "naïve café – 東京"


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table (OpenAI's encoder.py), written out independently."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="session")
def encoder(assets_dir):
    from metabolic.core.assets import load_encoder

    return load_encoder("sentence-transformers/all-MiniLM-L6-v2").value


@pytest.fixture(scope="session")
def labeller(encoder, tokenizer):
    from metabolic.csc.labeller import CSCLabeller

    return CSCLabeller(encoder, tokenizer, device="cpu", precision="fp32", batch_size=8)


def test_labels_match_independent_sentence_transformers_computation(labeller, encoder, tokenizer):
    ids, csc = labeller.label_text(FIXED_TEXT)
    assert ids == tokenizer(FIXED_TEXT)["input_ids"]
    # Independent path: SentenceTransformer.encode on decoded strings, cosine distance.
    texts = [tokenizer.decode(ids)] + [tokenizer.decode(ids[:t] + ids[t + 1:]) for t in range(len(ids))]
    emb = encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=4)
    expected = 1.0 - emb[1:] @ emb[0]
    assert csc.dtype == np.float32 and csc.shape == (len(ids),)
    np.testing.assert_allclose(csc, expected, atol=1e-4, rtol=0)
    assert (csc >= 0).all()
    # Content words cost more than the final full stop's neighbourhood average: the labels carry signal.
    assert csc.max() > 5 * csc.min()


def test_multibyte_counterfactuals_are_decodings_of_the_remaining_ids(labeller, tokenizer):
    ids = tokenizer(MULTIBYTE)["input_ids"]
    byte_decoder = {v: k for k, v in _gpt2_bytes_to_unicode().items()}
    token_bytes = [bytes(byte_decoder[ch] for ch in tokenizer.convert_ids_to_tokens(i)) for i in ids]
    assert b"".join(token_bytes).decode("utf-8") == MULTIBYTE == tokenizer.decode(ids)
    cfs = counterfactual_texts(tokenizer, np.array(ids), np.arange(len(ids)))
    assert len(cfs) == len(ids)
    whole = 0
    for t, text in enumerate(cfs):
        assert text == tokenizer.decode(ids[:t] + ids[t + 1:])
        remaining = b"".join(token_bytes[:t] + token_bytes[t + 1:])
        assert text == remaining.decode("utf-8", errors="replace")
        try:
            token_bytes[t].decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece of a multi-byte character: the remaining bytes cannot all be valid
        # A token holding whole characters: the counterfactual is exactly the text without them.
        start = len(b"".join(token_bytes[:t]))
        assert text == (remaining[:start] + remaining[start:]).decode("utf-8") and "\ufffd" not in text
        whole += 1
    assert whole >= 3  # "na", " caf", " –" ... hold whole characters
    # Joining per-token strings (the wrong way) turns the pieces of 東 and 京 into replacement characters.
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)
    _, csc = labeller.label_text(MULTIBYTE)
    assert np.isfinite(csc).all() and (csc >= 0).all()


def test_labels_do_not_depend_on_batching_or_sequence_order(labeller, tokenizer):
    a = tokenizer("Paris is the capital of France.")["input_ids"]
    b = tokenizer("A short one.")["input_ids"]
    alone = labeller.label([a], progress=False)[0]
    together = labeller.label([b, a], progress=False)
    np.testing.assert_allclose(together[1], alone, atol=1e-6)
    assert len(together[0]) == len(b)


def test_position_subset_leaves_the_rest_nan(labeller, tokenizer):
    ids = tokenizer(FIXED_TEXT)["input_ids"]
    full = labeller.label([ids], progress=False)[0]
    part = labeller.label([ids], [np.array([5, 1, 5])], progress=False)[0]
    assert np.isnan(part).sum() == len(ids) - 2
    np.testing.assert_allclose(part[[1, 5]], full[[1, 5]], atol=1e-6)


def test_empty_and_one_token_sequences_have_defined_results(labeller, encoder, tokenizer):
    empty, one = labeller.label([[], [464]], progress=False)
    assert empty.shape == (0,)
    emb = encoder.encode(["The", ""], convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(one, [1.0 - emb[0] @ emb[1]], atol=1e-4)


def test_texts_longer_than_the_window_are_nan_not_truncated(labeller, tokenizer):
    long_ids = tokenizer(" word" * (labeller.window + 5))["input_ids"]
    short = tokenizer("Fine.")["input_ids"]
    assert labeller.window == 512  # MiniLM's 512 positions, not its default 256
    out = labeller.label([long_ids, short], [np.array([0, 1]), None], progress=False)
    assert np.isnan(out[0]).all()
    assert np.isfinite(out[1]).all()


@pytest.mark.parametrize("bad", [[50257], [-1], [10, 99999999]])
def test_ids_outside_the_vocabulary_are_a_data_error(labeller, bad):
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):
        labeller.label([[464, 318], bad], progress=False)


def test_bad_positions_and_precision(labeller, encoder, tokenizer):
    from metabolic.csc.labeller import CSCLabeller

    with pytest.raises(DataError, match="position 3 of sequence 0"):
        labeller.label([[464, 318, 257]], [np.array([3])], progress=False)
    with pytest.raises(DataError, match="one per sequence"):
        labeller.label([[464]], [None, None], progress=False)
    with pytest.raises(ConfigError, match="bf16"):
        CSCLabeller(encoder, tokenizer, precision="bf16")
    cpu = CSCLabeller(encoder, tokenizer, precision="fp16")  # reduced precision is CUDA-only
    assert cpu.precision == "fp32"


def test_missing_encoder_is_an_asset_error(tiny_cfg, tmp_path):
    from metabolic.core.config import apply_overrides
    from metabolic.pipeline import stages

    cfg = apply_overrides(tiny_cfg, {"assets.encoder": str(tmp_path / "no-such-encoder")})
    with pytest.raises(AssetError, match="cannot load encoder"):
        stages.csc_labeller(cfg, device="cpu")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 50256), min_size=1, max_size=40), st.data())
def test_counterfactual_ids_delete_exactly_one_position(ids, data):
    from metabolic.csc.splice import counterfactual_ids

    positions = data.draw(st.lists(st.integers(0, len(ids) - 1), min_size=1, max_size=len(ids), unique=True))
    rows = counterfactual_ids(np.array(ids), np.array(positions))
    assert rows == [ids[:t] + ids[t + 1:] for t in positions]


def test_flops_per_text_matches_the_issue_anchor():
    from metabolic.csc.labeller import flops_per_text

    # MiniLM-L6 (6 x 384, d_ff 1536) on ~268 word pieces: ~6.4 GFLOP per text (issue 3).
    assert 6.2e9 < float(flops_per_text(6, 384, 1536, 268)) < 6.6e9


def test_generated_tokens_are_labelled_on_the_full_text(labeller, tokenizer):
    prompt = tokenizer("The city of")["input_ids"]
    generated = tokenizer(" Paris is large.")["input_ids"]
    (gen,) = labeller.label_generated([prompt], [generated])
    full = labeller.label([prompt + generated], progress=False)[0]
    assert gen.shape == (len(generated),)
    np.testing.assert_allclose(gen, full[len(prompt):], atol=1e-6)
    with pytest.raises(DataError, match="one prompt per generation"):
        labeller.label_generated([prompt], [])


@pytest.mark.parametrize("order", [[1, 0, 2], [2, 1, 0], [1, 0], [2]])
def test_label_groups_pairs_each_counterfactual_with_its_own_text(labeller, tokenizer, order):
    """Groups in any order (not only ascending ranges) give the same labels as `label`."""
    texts = [FIXED_TEXT, "A short one.", "Rivers carry sediment to the sea."]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    expected = labeller.label(seqs, progress=False)
    (k, labels), = list(labeller.label_groups(seqs, None, [order], progress=False))
    assert k == 0 and len(labels) == len(order)
    for i, lab in zip(order, labels):
        np.testing.assert_allclose(lab, expected[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad, named", [([[464.5, 3797]], "464.5"), ([[464, np.float32(3797.0)]], "3797.0"),
                                        ([[464, "3797"]], "'3797'"), ([[464, None]], "None")])
def test_non_integer_ids_are_a_data_error_not_truncated(labeller, bad, named):
    """Issue 17: 464.5 was silently labelled as token 464."""
    with pytest.raises(DataError, match="integer token ids expected") as err:
        labeller.label(bad, progress=False)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_string_instead_of_ids_is_a_data_error(labeller):
    """Issue 17: `label(["hello"])` raised a raw ValueError."""
    with pytest.raises(DataError, match="sequence 0 is the text 'hello', not token ids") as err:
        labeller.label(["hello"], progress=False)
    assert "label_text" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="not a flat list of integer token ids"):
        labeller.label([[[464], [3797, 13]]], progress=False)
    with pytest.raises(DataError, match=r"positions\[0\] holds 0.5"):
        labeller.label([[464, 3797]], [[0.5]], progress=False)


def test_numpy_integer_ids_are_accepted(labeller):
    plain = labeller.label([[464, 3797]], progress=False)[0]
    for ids in (np.array([464, 3797], dtype=np.int32), [np.int64(464), np.uint16(3797)]):
        np.testing.assert_array_equal(labeller.label([ids], progress=False)[0], plain)
