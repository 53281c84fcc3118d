"""Runs: one profile's default run, and runs with overrides beside it.

A run with overrides is a run of its own, named `<profile>+<hash>`: its artefacts, executed notebooks
and figures go to `data/<profile>+<hash>/` and `figures/<profile>+<hash>/`, so it never overwrites the
profile's default run (`data/<profile>/`), nor makes the next default run rebuild. The run travels on
the config (`StudyConfig.run`, read through `run_name` by every stage): `metabolic.report.notebook.setup`
sets it from the notebook's `overrides` parameter, so `metabolic study`, papermill and Lab agree. The CLI's
`run --set ...` keeps the profile's folder.

Standard library and config only: notebooks import it (through `report.notebook`) before the CPU
numerics are pinned, so it must not load numpy or torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from metabolic.core.profiles import load_config


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
