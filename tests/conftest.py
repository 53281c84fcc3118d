"""Shared fixtures: offline assets, a tiny study config and a per-session data folder.

Tests run offline against `$METABOLIC_ASSETS` (default: ../shared/data beside the checkout) and
write artefacts to a temporary folder, never to data/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from metabolic.core import numerics

# The tests and the nbval kernels (children of this process) run in the smoke profile's pinned CPU
# numeric mode, before anything imports torch, so checked values do not depend on the CPU.
numerics.pin("smoke")

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("METABOLIC_ASSETS", str((ROOT.parent / "shared" / "data").resolve()))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A config small enough for unit and integration tests (seconds on CPU), built on `smoke`.
TINY_OVERRIDES = {
    "corpus.seq_len": 32,
    "corpus.max_train_texts": 64,
    "corpus.max_valid_texts": 16,
    "backbone.n_layer": 1,
    "backbone.n_embd": 32,
    "backbone.n_head": 2,
    "backbone.block_size": 32,
    "backbone.batch_size": 4,
    "backbone.max_steps": 4,
    "backbone.warmup_steps": 1,
    "backbone.eval_every": 2,
    "backbone.max_eval_blocks": 4,
    "backbone.checkpoint_every": 2,
    "csc.max_sequences": 6,
    "csc.max_valid_sequences": 4,
    "csc.batch_size": 32,
    "train.epochs": 2,
    "train.batch_size": 2,
}


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    path = Path(os.environ["METABOLIC_ASSETS"])
    assert path.is_dir(), f"METABOLIC_ASSETS={path} is missing: point it at ../shared/data"
    return path


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory) -> Path:
    """A data root shared by every test of the session (stages reuse each other's artefacts)."""
    path = tmp_path_factory.mktemp("data")
    os.environ["METABOLIC_DATA"] = str(path)
    os.environ["METABOLIC_FIGURES"] = str(tmp_path_factory.mktemp("figures"))
    return path


@pytest.fixture(scope="session")
def tiny_cfg(session_data_dir, assets_dir):
    from metabolic.core.profiles import load_config

    return load_config("smoke", TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tokenizer(assets_dir):
    from metabolic.core.assets import load_tokenizer

    return load_tokenizer("gpt2").value


def pytest_collection_modifyitems(config, items):
    """Browser tests run last, after the notebook tests: notebook 06 in the browser then reads the smoke
    artefacts nbval has just built in the same $METABOLIC_DATA, instead of building them a second time
    between unit tests that rebuild their tiny ones in the same folders."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)  # stable: order kept otherwise
