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
# On xdist workers (`make test`: 2 of them), each process keeps the pinned 2 OpenMP threads, so 2 workers run
# 4 threads on 2 cores. OpenMP's default waiting spins a thread between parallel regions, burning the core
# the other worker needs; passive waiting sleeps it instead. It changes scheduling, not the arithmetic
# (benchmarks/omp_wait_policy.py measures both policies). Set here, before any worker loads torch; the nbval
# kernels and the tests' subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("METABOLIC_ASSETS", str((ROOT.parent / "shared" / "data").resolve()))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No real RAPL counter in the tests or the nbval kernels: the checked rows must not depend on whether this machine
# exposes one (tests/fake_counters.py switches it back on for its fake powercap tree).
os.environ["METABOLIC_RAPL"] = "off"

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


# The notebooks in two ordered groups for xdist (`make test`: pytest -n 2): each group runs on one worker
# in this order, the two groups side by side, in one shared study folder, while the other tests spread over
# both workers. A stage two notebooks need is built once (the artefact's lock makes the other wait) and is
# the same whichever builds it. What must come after what stays in one group: 03 (training) before 04
# (evaluation) and 05 (e-tokens, which measures the trained models when they exist); the browser tests
# read what every notebook wrote, so they come last in the longer group. Training needs both the backbone
# (00) and the labels (02), the two longest builds, so they start side by side; the prior (01, seconds)
# follows the backbone while the labels are still running, instead of delaying them.
STUDY_GROUPS = {"00": "study-a", "01": "study-a", "03": "study-a", "04": "study-a", "05": "study-a",
                "02": "study-b", "06": "study-b"}
_STUDY = pytest.StashKey[tuple]()  # (data, figures) folders of the study, when the notebooks were collected


def study_group(nodeid: str) -> str | None:
    """The xdist group of a test by its node id: a notebook's cells and the browser tests, else None."""
    if nodeid.startswith("notebooks/"):
        return STUDY_GROUPS.get(nodeid[len("notebooks/"):][:2], "study-a")
    if nodeid.startswith("tests/test_") and "_browser.py::" in nodeid:
        return "study-a"
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-scope scheduling with `study_group` as the scope (every other test is its own scope).

    xdist's own `--dist loadgroup` cannot do this here: it marks groups by rewriting `item._nodeid`, which
    pytest 9 no longer reads. Scopes are sent largest first, so the two study groups start at once."""
    from xdist.scheduler import LoadScopeScheduling

    class StudyScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return study_group(nodeid) or nodeid

    return StudyScheduling(config, log)


def _is_notebook(item) -> bool:
    return item.path.suffix == ".ipynb"


def _is_study(item) -> bool:
    return _is_notebook(item) or item.get_closest_marker("browser") is not None


def _study_folders(config) -> tuple[Path, Path]:
    """The study data and figures folders shared by the xdist workers of one run."""
    root = config._tmp_path_factory.getbasetemp().parent  # every worker's basetemp sits in the run's folder
    data, figures = root / "study-data", root / "study-figures"
    data.mkdir(exist_ok=True)
    figures.mkdir(exist_ok=True)
    return data, figures


def pytest_collection_modifyitems(config, items):
    """Browser tests run last, after the notebook tests: notebook 06 in the browser then reads the smoke
    artefacts nbval has just built, instead of building them a second time.

    When the notebooks are collected with the rest of the suite they never run in data/ and figures/ of
    the checkout: in one process, in the session's data folder (after the tests, whose tiny artefacts
    share the tokenized corpus with them); on xdist workers, in a study folder of the run shared by the
    workers (`_study_folders`), apart from each worker's tiny artefacts under the same profile name."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)  # stable: order kept otherwise
    if not any(_is_notebook(item) for item in items):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        config.stash[_STUDY] = _study_folders(config)
    elif not os.environ.get("METABOLIC_DATA"):  # the session_data_dir fixture takes over when a test asks for it
        factory = config._tmp_path_factory  # the session's tmp_path_factory (hooks run before any fixture)
        os.environ["METABOLIC_DATA"] = str(factory.mktemp("data"))
        os.environ["METABOLIC_FIGURES"] = str(factory.mktemp("figures"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A notebook's cells (its kernel starts with the first) and a browser test see the study folders."""
    folders = item.config.stash.get(_STUDY, None)
    if folders is None or not _is_study(item):
        yield
        return
    saved = {k: os.environ.get(k) for k in ("METABOLIC_DATA", "METABOLIC_FIGURES")}
    os.environ["METABOLIC_DATA"], os.environ["METABOLIC_FIGURES"] = (str(f) for f in folders)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
