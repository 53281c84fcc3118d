"""Asset resolution: the real tokenizer and encoder from the offline folder, the package, and clear failures."""

from __future__ import annotations

import pytest
from metabolic.core import assets
from metabolic.core.errors import AssetError


def test_tokenizer_from_assets_is_the_real_gpt2_bpe(assets_dir):
    res = assets.load_tokenizer("gpt2")
    assert res.source == "assets"
    tok = res.value
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.pad_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" the")["input_ids"] == [262]


def test_tokenizer_from_an_explicit_folder(assets_dir):
    res = assets.load_tokenizer(str(assets_dir / "gpt2-tokenizer"))
    assert res.source == "folder" and res.value("Hello world")["input_ids"] == [15496, 995]


def test_missing_assets_folder_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("METABOLIC_ASSETS", str(tmp_path / "nope"))
    with pytest.raises(AssetError) as info:
        assets.load_tokenizer("gpt2")
    assert f"METABOLIC_ASSETS={str(tmp_path / 'nope')!r} is not a folder" in str(info.value)
    assert "unset it to use the Hub" in str(info.value) and "\n" not in str(info.value)


def test_unresolvable_asset_lists_every_place_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("METABOLIC_ASSETS", str(tmp_path))
    with pytest.raises(AssetError) as info:
        assets.load_tokenizer("no-such-tokenizer")
    text = str(info.value)
    assert "cannot load tokenizer 'no-such-tokenizer'" in text
    assert "hub (skipped: HF_HUB_OFFLINE=1)" in text and "Fix:" in text


def test_encoder_order_prefers_the_fp32_package_over_the_fp16_copy(assets_dir):
    kinds = [c.source for c in assets.candidates("encoder", assets.MINILM_ID)]
    assert kinds == ["package", "assets"]


def test_fp16_encoder_copy_is_upcast_to_fp32(monkeypatch, assets_dir):
    import torch

    monkeypatch.setattr(assets, "_minilm_package_path", lambda: None)
    res = assets.load_encoder(assets.MINILM_ID)
    assert res.source == "assets" and res.location.endswith("all-MiniLM-L6-v2-fp16")
    assert {p.dtype for p in res.value.parameters()} == {torch.float32}
    emb = res.value.encode(["a cat sat on the mat"], normalize_embeddings=True)
    assert emb.shape == (1, 384)


def test_an_unreachable_hub_is_skipped_at_once_not_retried(monkeypatch, tmp_path):
    """Online mode with the Hub's host refusing connections (a closed local port): the Hub is reported as
    skipped instead of huggingface_hub retrying each file for ~30 s."""
    import socket

    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("METABOLIC_ASSETS", str(tmp_path))
    with pytest.raises(AssetError) as info:
        assets.load_tokenizer("no-such-tokenizer")
    assert f"hub no-such-tokenizer (skipped: 127.0.0.1:{port} unreachable" in str(info.value)
    assert "\n" not in str(info.value)
