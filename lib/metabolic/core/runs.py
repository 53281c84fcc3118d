"""Runs: one profile's default run, and runs with overrides beside it.

A run with overrides is a run of its own, named `<profile>+<hash>`: its artefacts, executed notebooks
and figures go to `data/<profile>+<hash>/` and `figures/<profile>+<hash>/`, so it never overwrites the
profile's default run (`data/<profile>/`), nor makes the next default run rebuild. The run in force is
`$METABOLIC_RUN`, read by `metabolic.core.artefacts.run_dir` / `figures_dir`, set by
`metabolic.pipeline.study.run_study` (for its kernels) and by `metabolic.report.notebook.setup` (from
the notebook's `overrides` parameter, so a papermill or Lab run outside `study` agrees).

Standard library and config only: notebooks import it (through `report.notebook`) before the CPU
numerics are pinned, so it must not load numpy or torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from metabolic.core.profiles import load_config

RUN_ENV = "METABOLIC_RUN"


def run_name(profile: str, overrides: Mapping[str, Any] | None = None) -> str:
    """The run's folder name: the profile, or `<profile>+<hash>` when the overrides change its config.

    The hash (8 hex digits of a sha256) covers the resolved values that differ from the profile's own,
    so the order and spelling of overrides (`3` or `"3"`) do not matter, and restating a profile value
    is the default run. Raises `ConfigError` on a bad profile or override.
    """
    resolved = load_config(profile, overrides).to_dict()
    default = load_config(profile).to_dict()
    changed: dict[str, Any] = {}
    for key, value in resolved.items():
        if isinstance(value, dict):
            changed.update({f"{key}.{k}": v for k, v in value.items() if v != default[key][k]})
        elif value != default[key]:
            changed[key] = value
    if not changed:
        return profile
    canonical = json.dumps(changed, sort_keys=True, separators=(",", ":"))
    return f"{profile}+{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:8]}"
