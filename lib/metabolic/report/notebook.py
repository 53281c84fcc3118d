"""Notebook glue: resolve the config from papermill parameters, quiet logging, one-line input errors.

Kept tiny on purpose: notebooks call the library; this only sets up the session.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Mapping

from metabolic import __version__
from metabolic.core import artefacts, numerics  # neither loads torch: the profile pins its numerics first
from metabolic.core.config import StudyConfig
from metabolic.core.errors import MetabolicError
from metabolic.core.profiles import load_config
from metabolic.core.runs import run_name  # standard library and config only, as numerics

PROFILE_NOTES = {
    "smoke": "smoke profile (tiny CPU run: its numbers show that the pipeline runs, not what the method achieves)",
    "gpu": "gpu profile (one H100, GPT-2 6x384 pretrained here on WikiText-2)",
    "paper": "paper profile (GPT-2 small from the Hub, the paper's hyper-parameters)",
}


STRONGEST = "strongest"  # notebook 06's default profile: the strongest finished run on disk
RUNS_BY_STRENGTH = ("cpu", "smoke")  # the CPU profiles whose runs the explorer can show, strongest first


def strongest_profile(requested: str) -> tuple[str, str]:
    """(profile, why): `requested`, or for "strongest" the first of `RUNS_BY_STRENGTH` whose evaluate stage
    finished on disk with this library and the profile's current settings (else smoke, which any stage
    call builds in minutes). Reads files only, so the chosen profile can still pin its CPU numerics."""
    if requested != STRONGEST:
        return requested, "as asked"
    skipped = []
    for profile in RUNS_BY_STRENGTH[:-1]:
        folder = artefacts.run_dir(profile) / "evaluation"
        manifest = artefacts.read_manifest(folder)
        config = folder / artefacts.CONFIG_FILE
        if manifest is None or not config.exists():
            skipped.append(f"no finished {profile} run in {artefacts.shown(folder.parent)}")
        elif (manifest.get("description", {}).get("library_version") != __version__
              or config.read_text() != load_config(profile).to_json()):
            skipped.append(f"the {profile} run in {artefacts.shown(folder.parent)} was made by other code or settings")
        else:
            return profile, f"the strongest finished run on disk ({artefacts.shown(folder.parent)})"
    fallback = RUNS_BY_STRENGTH[-1]
    return fallback, f"{'; '.join(skipped)}: the {fallback} run (scripts/cpu_budgets.sh makes the cpu run)"


def profile_label(cfg: StudyConfig) -> str:
    """The profile in words, and the CPU numeric mode when it is pinned (see `metabolic.core.numerics`)."""
    label = PROFILE_NOTES.get(cfg.profile, f"{cfg.profile} profile")
    if numerics.wanted(cfg.profile):
        label += "; CPU numerics pinned (ATen AVX2 kernels, MKL compatible branch, 2 threads)"
    return label


def one_line_error(shell, etype, value, tb, tb_offset=None) -> None:
    """IPython handler for input errors: the cell shows `ConfigError: <message>`, no traceback.

    Still shown as the cell's error (not printed to stderr), so the kernel reports its type and
    message: papermill's `PapermillExecutionError.ename` / `.evalue`, which `metabolic study` prints.
    """
    shell.showtraceback((etype, value, tb), exception_only=True)


def setup(profile: str, overrides: Mapping[str, Any] | None = None, level: int = logging.WARNING) -> StudyConfig:
    """Pin the profile's CPU numerics, resolve and validate the config; input errors print one line."""
    numerics.pin(profile)  # first: torch must load its kernels under the pinned settings

    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    logging.getLogger("metabolic").setLevel(level)
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            shell.set_custom_exc((MetabolicError,), one_line_error)
    except ImportError:  # pragma: no cover
        pass
    # A run with overrides writes beside the profile's default run, also when papermill or Lab runs the
    # notebook directly (see metabolic.core.runs).
    name = run_name(profile, overrides)
    cfg = dataclasses.replace(load_config(profile, overrides), run="" if name == profile else name)
    if cfg.run:
        logging.getLogger(__name__).warning("override run: artefacts in data/%s/, figures in figures/%s/ "
                                            "(beside the default run)", cfg.run, cfg.run)
    return cfg
