"""Run the notebooks headless with papermill, in order, on one profile.

The py:percent files are the source of truth: each is read with jupytext and executed with papermill
into `data/<profile>/executed/`. `inplace=True` (used by `make notebooks`, smoke only) writes the
executed notebook back to `notebooks/NN_name.ipynb`, refreshing the outputs that nbval checks.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from metabolic.core import artefacts, numerics
from metabolic.core.errors import ConfigError
from metabolic.core.profiles import load_config

log = logging.getLogger(__name__)


def notebook_sources(root: Path | None = None) -> list[Path]:
    """`notebooks/NN_*.py` in order."""
    folder = (root or artefacts.project_root()) / "notebooks"
    return sorted(p for p in folder.glob("[0-9][0-9]_*.py"))


def run_study(
    profile: str,
    overrides: Mapping[str, Any] | None = None,
    only: list[str] | None = None,
    inplace: bool = False,
) -> dict[str, float]:
    """Execute every notebook (or those whose name starts with an entry of `only`); return wall seconds each."""
    import jupytext
    import papermill

    numerics.pin(profile)  # the kernels inherit the pinned settings
    # Kernels run in notebooks/: make relative folders in the environment absolute first.
    for var in ("METABOLIC_ASSETS", "METABOLIC_DATA", "METABOLIC_FIGURES"):
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())
    os.environ.setdefault("METABOLIC_ROOT", str(artefacts.project_root()))
    load_config(profile, overrides)  # fail fast, before any kernel starts, on a bad profile or override
    if inplace and (profile != "smoke" or overrides):
        raise ConfigError("--inplace refreshes the stored smoke outputs: use it with --profile smoke and no overrides")
    sources = notebook_sources()
    if only:
        sources = [p for p in sources if any(p.stem.startswith(o) for o in only)]
        if not sources:
            raise ConfigError(f"no notebook matches {only!r}: names start with 00, 01, ...")
    out_dir = artefacts.run_dir(profile) / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {} if inplace else {"profile": profile, "overrides": dict(overrides or {})}
    timings: dict[str, float] = {}
    for source in sources:
        nb = jupytext.read(source)
        with tempfile.TemporaryDirectory() as tmp:
            input_path = Path(tmp) / f"{source.stem}.ipynb"
            jupytext.write(nb, input_path)
            output = source.with_suffix(".ipynb") if inplace else out_dir / f"{source.stem}.ipynb"
            log.info("executing %s -> %s", source.name, output)
            t0 = time.perf_counter()
            papermill.execute_notebook(
                str(input_path), str(output), parameters=parameters or None, cwd=str(source.parent),
                kernel_name="python3", progress_bar=False, log_output=False,
            )
            timings[source.stem] = time.perf_counter() - t0
            if inplace:
                _strip_run_metadata(output)
        print(f"{source.stem}: {timings[source.stem]:.1f} s", flush=True)
    return timings


def _strip_run_metadata(path: Path) -> None:
    """Drop papermill's per-cell run metadata (timings, empty tags) from a stored notebook.

    The stored notebooks are reviewed in diffs and paired with the py:percent files: empty tag lists
    would otherwise appear as `tags=[]` on every cell of the .py, and timings change on every run.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if not cell.metadata.get("tags", True):
            cell.metadata.pop("tags")
    nb.metadata.pop("papermill", None)
    artefacts.atomic_write_text(path, nbformat.writes(nb))
