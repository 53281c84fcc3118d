"""Run the notebooks headless with papermill, in order, on one profile.

The py:percent files are the source of truth: each is read with jupytext and executed with papermill
into `data/<run>/executed/`. `inplace=True` (used by `make notebooks`, smoke only) writes the
executed notebook back to `notebooks/NN_name.ipynb`, refreshing the outputs that nbval checks.

A run with overrides is a run of its own (`metabolic.core.runs`): its artefacts, executed notebooks
and figures go to `data/<profile>+<hash>/` and `figures/<profile>+<hash>/`, beside the default run.

A failing cell ends the study with that cell's error in one line (its type and message, papermill's
`ename` / `evalue`): input errors (`metabolic.core.errors`) are re-raised as themselves, so the CLI
exits 2 as `run` does; anything else raises `NotebookFailed`.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from metabolic.core import artefacts, errors, numerics
from metabolic.core.errors import ConfigError, MetabolicError
from metabolic.core.runs import run_name


class NotebookFailed(RuntimeError):
    """A notebook cell raised something other than an input error (a bug): one line, exit status 1."""


@dataclass(frozen=True)
class StudyRun:
    name: str  # the profile, or `<profile>+<hash>` for a run with overrides
    data_dir: Path  # artefacts, executed notebooks, study_timings.json
    figures_dir: Path
    notebooks_s: dict[str, float]  # wall seconds per notebook


def notebook_sources(root: Path | None = None) -> list[Path]:
    """`notebooks/NN_*.py` in order."""
    folder = (root or artefacts.project_root()) / "notebooks"
    return sorted(p for p in folder.glob("[0-9][0-9]_*.py"))


def run_study(
    profile: str,
    overrides: Mapping[str, Any] | None = None,
    only: list[str] | None = None,
    inplace: bool = False,
    stream_output: bool = False,
) -> StudyRun:
    """Execute every notebook (or those whose name starts with an entry of `only`), in order.

    Prints each notebook as it starts and ends, with a progress bar over its cells (stderr);
    `stream_output` also streams the cells' own output (papermill's `log_output`).
    """
    numerics.pin(profile)  # the kernels inherit the pinned settings
    # Kernels run in notebooks/: make relative folders in the environment absolute first.
    for var in ("METABOLIC_ASSETS", "METABOLIC_DATA", "METABOLIC_FIGURES"):
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())
    os.environ.setdefault("METABOLIC_ROOT", str(artefacts.project_root()))
    name = run_name(profile, overrides)  # fails fast, before any kernel starts, on a bad profile or override
    if inplace and (profile != "smoke" or name != profile):
        raise ConfigError("--inplace refreshes the stored smoke outputs: use it with --profile smoke and no overrides")
    sources = notebook_sources()
    if only:
        sources = [p for p in sources if any(p.stem.startswith(o) for o in only)]
        if not sources:
            raise ConfigError(f"no notebook matches {only!r}: names start with 00, 01, ...")
    run = StudyRun(name, artefacts.run_dir(name), artefacts.figures_dir(name), {})
    if name != profile:
        print(f"run {name} (overrides {dict(overrides or {})}): artefacts and executed notebooks in "
              f"{run.data_dir}, figures in {run.figures_dir}; the default run's are left as they are", flush=True)
    # Each notebook's setup(profile, overrides) names the same run on its config (metabolic.core.runs).
    _execute(sources, run, {} if inplace else {"profile": profile, "overrides": dict(overrides or {})},
             inplace, stream_output)
    return run


def _execute(sources: list[Path], run: StudyRun, parameters: dict, inplace: bool, stream_output: bool) -> None:
    import jupytext
    import papermill

    out_dir = run.data_dir / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for i, source in enumerate(sources, 1):
        step = f"[{i}/{len(sources)}] {source.stem}"
        output = source.with_suffix(".ipynb") if inplace else out_dir / f"{source.stem}.ipynb"
        print(f"{step}: running -> {output}", flush=True)
        nb = jupytext.read(source)
        with tempfile.TemporaryDirectory() as tmp:
            input_path = Path(tmp) / f"{source.stem}.ipynb"
            jupytext.write(nb, input_path)
            t0 = time.perf_counter()
            try:
                papermill.execute_notebook(
                    str(input_path), str(output), parameters=parameters or None, cwd=str(source.parent),
                    kernel_name="python3", log_output=stream_output,
                    # A bar over the cells; off a terminal (logs, CI) it redraws at most every 30 s.
                    progress_bar={"desc": source.stem, "unit": "cell", "mininterval": 0.1 if sys.stderr.isatty() else 30},
                )
            except papermill.PapermillExecutionError as exc:
                if inplace:  # the stored notebook keeps the traceback, but no marker cells for jupytext to pair
                    _strip_run_metadata(output)
                raise _cell_error(exc, source.stem, output) from None
            run.notebooks_s[source.stem] = time.perf_counter() - t0
        if inplace:
            _strip_run_metadata(output)
        print(f"{step}: done in {run.notebooks_s[source.stem]:.1f} s (study so far {time.perf_counter() - t_start:.1f} s)",
              flush=True)


def _cell_error(exc, notebook: str, output: Path) -> Exception:
    """The failing cell's error in one line: the input error itself when it is one, else `NotebookFailed`."""
    where = f"{notebook}, cell {exc.exec_count}"
    cls = getattr(errors, exc.ename, None)
    if isinstance(cls, type) and issubclass(cls, MetabolicError):
        return cls(f"{exc.ename}: {exc.evalue} ({where}; executed notebook: {output})")
    return NotebookFailed(f"{where} raised {exc.ename}: {exc.evalue} (the traceback is in {output})")


PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"


def _strip_run_metadata(path: Path) -> None:
    """Drop papermill's per-cell run metadata (timings, empty tags) and its error marker cells from a
    stored notebook.

    The stored notebooks are reviewed in diffs and paired with the py:percent files: empty tag lists
    would otherwise appear as `tags=[]` on every cell of the .py, timings change on every run, and the
    red "An Exception was encountered" cells of a failed run would become cells of the source at the
    next `jupytext --sync`.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if PAPERMILL_ERROR_TAG not in c.metadata.get("tags", [])]
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if not cell.metadata.get("tags", True):
            cell.metadata.pop("tags")
    nb.metadata.pop("papermill", None)
    strip_progress_bars(nb)
    artefacts.atomic_write_text(path, nbformat.writes(nb))


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def strip_progress_bars(nb) -> int:
    """Replace each progress-bar widget in a stored notebook by its final line as text; return how many.

    tqdm draws its bars as ipywidgets whose saved state (six models a bar) made up a quarter of the
    stored notebooks' bytes; the reader of a stored notebook needs only the last line of each bar.
    Other widgets (the budget explorer) are kept.
    """
    widgets = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {})
    state = widgets.get("state", {})

    def refs(model_id: str) -> list[str]:
        text = json.dumps(state.get(model_id, {}).get("state", {}))
        return re.findall(r"IPY_MODEL_([0-9a-f]+)", text)

    def is_bar(model_id: str) -> bool:
        return state.get(model_id, {}).get("model_name") == "HBoxModel" and any(
            state.get(child, {}).get("model_name") == "FloatProgressModel" for child in refs(model_id))

    def final_line(model_id: str) -> str:
        parts = [html.unescape(re.sub(r"<[^>]+>", "", state[c]["state"].get("value", ""))).strip()
                 for c in refs(model_id) if state.get(c, {}).get("model_name") == "HTMLModel"]
        return re.sub(r"\s+", " ", " ".join(p for p in parts if p))  # tqdm pads with figure spaces

    removed: set[str] = set()
    n_bars = 0
    for cell in nb.cells:
        outputs = []
        for output in cell.get("outputs", []):
            model_id = output.get("data", {}).get(WIDGET_VIEW, {}).get("model_id")
            if model_id is None or not is_bar(model_id):
                outputs.append(output)
                continue
            n_bars += 1
            outputs.append(_text_output(final_line(model_id)))
            todo = [model_id]
            while todo:  # the bar and every model it references (progress, labels, layouts, styles)
                current = todo.pop()
                if current not in removed:
                    removed.add(current)
                    todo.extend(refs(current))
        if "outputs" in cell:
            cell["outputs"] = outputs
    for model_id in removed:
        state.pop(model_id, None)
    if widgets and not state:
        nb.metadata.pop("widgets")
    return n_bars


def _text_output(text: str):
    import nbformat

    return nbformat.v4.new_output("stream", name="stderr", text=text + "\n")
