"""The command line: one-line errors for bad input, no traceback, nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def _run(args, tmp_path, **env):
    data = tmp_path / "data"
    full_env = {**os.environ, "METABOLIC_DATA": str(data), "METABOLIC_FIGURES": str(tmp_path / "fig"), **env}
    proc = subprocess.run([sys.executable, "-m", "metabolic", *args], capture_output=True, text=True, env=full_env, timeout=300)
    return proc, data


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["config", "--profile", "nope"], {}, "unknown profile 'nope'"),
        (["config", "--set", "train.nope=1"], {}, "unknown override key 'train.nope'"),
        (["config", "--set", "train.epochs=many"], {}, "train.epochs='many' has the wrong type: expected int"),
        (["config", "--set", "train.epochs"], {}, "write it as section.key=value"),
        (["run", "--stages", "corpus"], {"METABOLIC_ASSETS": "/no/such/folder"}, "METABOLIC_ASSETS='/no/such/folder' is not a folder"),
        (["run", "--stages", "nope"], {}, "unknown stage 'nope'"),
        (["run", "--stages", ","], {}, "--stages ',' names no stage"),
        (["run", "--stages", "evaluate..csc"], {}, "--stages 'evaluate..csc' runs backwards"),
        (["run", "--stages", "..nope"], {}, "unknown stage 'nope' in --stages '..nope'"),
        (["config", "--set", "prior.alpha=1e300"], {}, "prior.alpha=1e+300"),
        (["config", "--set", "prior.beta=1e308"], {}, "prior.beta=1e+308"),
        (["config", "--set", "backbone.n_embd=131072", "--set", "backbone.n_head=1"], {}, "backbone.n_embd=131072"),
        (["config", "--set", "generation.prompts=()"], {}, "give at least one non-empty prompt"),
        (["config", "--set", "generation.prompts=('',)"], {}, "give at least one non-empty prompt"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, env, message):
    proc, data = _run(args, tmp_path, **env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not data.exists() or not any(data.rglob("*"))


def test_empty_corpus_is_one_line_and_writes_nothing(tmp_path, assets_dir):
    folder = tmp_path / "assets"
    shutil.copytree(assets_dir / "gpt2-tokenizer", folder / "gpt2-tokenizer")
    (folder / "wikitext-2").mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (folder / "wikitext-2" / name).write_text("\n\n")
    proc, data = _run(["run", "--stages", "corpus"], tmp_path, METABOLIC_ASSETS=str(folder))
    assert proc.returncode == 2 and "has no non-empty lines" in proc.stderr and "Traceback" not in proc.stderr
    assert not data.exists() or not any(p.is_file() for p in data.rglob("*"))


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00 not a corpus", "is not UTF-8 text (byte 0: invalid start byte)"),
    (b"= Title =\n\x00\x00\x00\x00\n", "holds a NUL byte at character 10: it is binary, not text"),
])
def test_a_corpus_that_is_not_text_is_one_line_and_writes_nothing(tmp_path, assets_dir, content, message):
    folder = tmp_path / "assets"
    shutil.copytree(assets_dir / "gpt2-tokenizer", folder / "gpt2-tokenizer")
    shutil.copytree(assets_dir / "wikitext-2", folder / "wikitext-2")
    (folder / "wikitext-2" / "train.txt").write_bytes(content)
    proc, data = _run(["run", "--stages", "corpus"], tmp_path, METABOLIC_ASSETS=str(folder))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{folder / 'wikitext-2' / 'train.txt'} {message}" in lines[0] and "raw text files" in lines[0]
    assert not data.exists() or not any(p.is_file() for p in data.rglob("*"))


def test_config_prints_the_resolved_profile(tmp_path):
    import json

    proc, _ = _run(["config", "--profile", "gpu", "--set", "train.epochs=2"], tmp_path)
    assert proc.returncode == 0
    cfg = json.loads(proc.stdout)
    assert cfg["profile"] == "gpu" and cfg["train"]["epochs"] == 2 and cfg["backbone"]["n_embd"] == 384


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_data_folder_that_cannot_be_one_is_one_line(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    target = blocker if where == "a file" else blocker / "data"
    proc = subprocess.run([sys.executable, "-m", "metabolic", "run", "--profile", "smoke", "--stages", "corpus"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "METABOLIC_DATA": str(target), "METABOLIC_FIGURES": str(tmp_path / "fig")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-500:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"METABOLIC_DATA={target} cannot be a folder: {blocker} is a file" in lines[0]
    assert blocker.read_text() == "not a folder"
