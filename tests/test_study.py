"""`metabolic study`: a failing cell's one-line error and exit status, progress lines, override runs beside
the default run. Real papermill kernels: the real notebook 00, and tiny notebooks in a scratch project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from metabolic.core import artefacts
from metabolic.core.errors import ConfigError
from metabolic.core.profiles import load_config
from metabolic.core.runs import run_name

ROOT = Path(__file__).resolve().parents[1]


def test_run_name_fingerprints_what_the_overrides_change():
    name = run_name("smoke", {"prior.beta": 0.2, "train.epochs": 4})
    assert name.startswith("smoke+") and len(name) == len("smoke+") + 8
    assert run_name("smoke", {"train.epochs": "4", "prior.beta": "0.2"}) == name  # order and spelling
    assert run_name("smoke", {"prior.beta": 0.3, "train.epochs": 4}) != name
    assert run_name("gpu", {"prior.beta": 0.2, "train.epochs": 4}).startswith("gpu+")
    assert run_name("smoke", {"train.epochs": load_config("smoke").train.epochs}) == "smoke"  # restating the profile's value
    assert run_name("smoke", {}) == run_name("smoke") == "smoke"
    with pytest.raises(ConfigError, match="unknown override key 'prior.nope'"):
        run_name("smoke", {"prior.nope": 1})


def test_the_run_travels_on_the_config(monkeypatch, tmp_path):
    """A notebook's setup names an override run on its config; no environment variable carries it."""
    from metabolic.report.notebook import setup

    monkeypatch.setenv("METABOLIC_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("METABOLIC_FIGURES", str(tmp_path / "f"))
    default, own = setup("smoke"), setup("smoke", {"prior.beta": 0.25})
    assert (default.run, default.run_name) == ("", "smoke") and load_config("smoke").run_name == "smoke"
    assert own.run == own.run_name == run_name("smoke", {"prior.beta": 0.25}) != "smoke"
    assert artefacts.run_dir(own.run_name) == tmp_path / "d" / own.run and "METABOLIC_RUN" not in os.environ
    assert artefacts.figures_dir(default.run_name) == tmp_path / "f" / "smoke"
    assert setup("smoke", {"train.epochs": default.train.epochs}).run == ""  # restating the profile's value
    with pytest.raises(ConfigError, match="unknown override key 'run'"):
        load_config("smoke", {"run": "elsewhere"})


def test_an_input_error_in_a_notebook_is_one_line_and_exit_2(tmp_path):
    """The real notebook 00 on an assets folder that does not exist: `run`'s one line, with the cell's type."""
    missing = tmp_path / "no-assets"
    env = {**os.environ, "METABOLIC_ASSETS": str(missing), "METABOLIC_DATA": str(tmp_path / "data"),
           "METABOLIC_FIGURES": str(tmp_path / "fig")}
    proc = subprocess.run([sys.executable, "-m", "metabolic", "study", "--only", "00"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert f"error: AssetError: METABOLIC_ASSETS='{missing}' is not a folder" in errors[0]
    executed = tmp_path / "data" / "smoke" / "executed" / "00_pretrain_backbone.ipynb"
    assert "(00_pretrain_backbone, cell " in errors[0] and str(executed) in errors[0]
    assert "Traceback" not in proc.stderr and executed.is_file()
    assert f"[1/1] 00_pretrain_backbone: running -> {executed}" in proc.stdout
    assert "00_pretrain_backbone:" in proc.stderr and "cell" in proc.stderr  # papermill's bar over the cells


HEADER = '''# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

'''

WRITER = HEADER + '''# %% tags=["parameters"]
profile = "smoke"
overrides = {}

# %%
from metabolic.core import artefacts
from metabolic.report.notebook import setup

cfg = setup(profile, overrides)
for folder in (artefacts.run_dir(cfg.run_name), artefacts.figures_dir(cfg.run_name)):
    artefacts.atomic_write_text(folder / "beta.txt", str(cfg.prior.beta))
'''

FAILING = HEADER + '''# %%
x = {}
# %%
x["missing"]
'''


@pytest.fixture
def scratch_project(monkeypatch, tmp_path) -> Path:
    """A project root with tiny notebooks, and its own data and figures roots."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "00_write.py").write_text(WRITER)
    (tmp_path / "notebooks" / "01_fail.py").write_text(FAILING)
    monkeypatch.setenv("METABOLIC_ROOT", str(tmp_path))
    monkeypatch.setenv("METABOLIC_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("METABOLIC_FIGURES", str(tmp_path / "figures"))
    return tmp_path


def test_an_override_run_writes_beside_the_default_run(scratch_project, capsys):
    import papermill
    from metabolic.pipeline.study import run_study

    data, figures = scratch_project / "data", scratch_project / "figures"
    default = run_study("smoke", only=["00"])
    assert (default.name, default.data_dir, default.figures_dir) == ("smoke", data / "smoke", figures / "smoke")
    overrides = {"prior.beta": "0.25"}
    run = run_study("smoke", overrides, only=["00"])
    name = run_name("smoke", overrides)
    assert (run.name, run.data_dir, run.figures_dir) == (name, data / name, figures / name)
    assert set(run.notebooks_s) == {"00_write"}
    for root in (data, figures):
        assert (root / "smoke" / "beta.txt").read_text() == "0.1"  # the default run's, untouched
        assert (root / name / "beta.txt").read_text() == "0.25"
    assert (data / name / "executed" / "00_write.ipynb").is_file() and (data / "smoke" / "executed" / "00_write.ipynb").is_file()
    out = capsys.readouterr().out
    assert f"run {name} (overrides {{'prior.beta': '0.25'}}): artefacts and executed notebooks in {data / name}" in out
    assert "[1/1] 00_write: running" in out and "[1/1] 00_write: done in" in out

    # papermill on its own (Lab, or a user's script): the notebook's `overrides` parameter alone picks the run.
    (data / name / "beta.txt").unlink()
    papermill.execute_notebook(str(data / name / "executed" / "00_write.ipynb"), str(scratch_project / "direct.ipynb"),
                               parameters={"overrides": {"prior.beta": 0.25}}, kernel_name="python3",
                               cwd=str(scratch_project / "notebooks"), progress_bar=False)
    assert (data / name / "beta.txt").read_text() == "0.25"


def test_a_bug_in_a_notebook_is_one_line_naming_the_cell(scratch_project):
    from metabolic.pipeline.study import NotebookFailed, run_study

    with pytest.raises(NotebookFailed) as info:
        run_study("smoke", only=["01"])
    executed = scratch_project / "data" / "smoke" / "executed" / "01_fail.ipynb"
    # cell 3 as the executed notebook numbers it: papermill's injected parameters cell runs first
    assert str(info.value) == f"01_fail, cell 3 raised KeyError: 'missing' (the traceback is in {executed})"
    assert executed.is_file()
    # What `--inplace` stores after a failure: the traceback, without papermill's marker cells and tags,
    # so that the next `jupytext --sync` pairs back the source unchanged
    import jupytext
    from metabolic.pipeline.study import PAPERMILL_ERROR_TAG, _strip_run_metadata

    assert PAPERMILL_ERROR_TAG in executed.read_text()
    _strip_run_metadata(executed)
    nb = jupytext.read(executed)
    assert not any(PAPERMILL_ERROR_TAG in c.metadata.get("tags", []) or c.metadata.get("tags") == [] for c in nb.cells)
    assert any(o.get("ename") == "KeyError" for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_a_stored_progress_bar_keeps_its_last_line_not_its_widgets():
    import nbclient
    import nbformat
    from metabolic.pipeline.study import strip_progress_bars

    code = "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='steps'):\n    pass\nprint('after')"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(nb, kernel_name="python3", store_widget_state=True, timeout=120).execute()
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert sorted({m["model_name"] for m in state.values()}) == [
        "FloatProgressModel", "HBoxModel", "HTMLModel", "HTMLStyleModel", "LayoutModel", "ProgressStyleModel"]
    assert strip_progress_bars(nb) == 1
    texts = [o.get("text", "") for o in nb.cells[0].outputs]
    assert texts[0].startswith("steps: 100% 3/3 [") and texts[1] == "after\n"
    assert "widgets" not in nb.metadata


def test_stored_notebooks_hold_no_progress_widgets_and_stay_small():
    notebooks = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 7
    assert not [p.name for p in notebooks if "FloatProgressModel" in p.read_text()]
    assert sum(p.stat().st_size for p in notebooks) < 1_000_000  # bytes: reviewable diffs, a quick clone
