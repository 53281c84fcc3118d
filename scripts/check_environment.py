"""Dry-run solve of environment.yml: does conda-forge have a consistent set of its packages today?

    python scripts/check_environment.py [--solver micromamba|mamba|conda|PATH] [--file environment.yml]

The conda part is solved by the first of micromamba, mamba and conda found on PATH (`create --dry-run`
on the file's channels only, nothing installed); the pip part's entries other than the package itself
are resolved by pip (`install --dry-run --no-deps`). Exit status 0 when both resolve, 1 when one does
not, and 77 (the automake "skipped" convention) with the reason on the last line when the check cannot
run here: no conda solver installed, or conda-forge not reachable (on this project's machines only
PyPI, Debian and npm are).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOLVERS = ("micromamba", "mamba", "conda")
CHANNEL_URL = "https://conda.anaconda.org/{channel}/noarch/repodata.json"
SKIPPED = 77


def read_environment(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(channels, conda specs, pip entries) of an environment file; `nodefaults` is not a channel."""
    env = yaml.safe_load(path.read_text())
    channels = [c for c in env.get("channels", []) if c != "nodefaults"]
    conda, pip = [], []
    for dep in env.get("dependencies", []):
        if isinstance(dep, dict):
            pip.extend(dep.get("pip", []))
        else:
            conda.append(str(dep))
    return channels, conda, pip


def find_solver(choice: str | None) -> str | None:
    for name in [choice] if choice else SOLVERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def channel_unreachable(channel: str, timeout_s: float = 15) -> str | None:
    """Why `channel` cannot be read from here, or None when its index answers."""
    url = CHANNEL_URL.format(channel=channel)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return None
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=ROOT / "environment.yml")
    parser.add_argument("--solver", default=None, help=f"one of {', '.join(SOLVERS)} or a path (default: the first found)")
    args = parser.parse_args(argv)

    channels, conda, pip = read_environment(args.file)
    solver = find_solver(args.solver)
    reasons = [] if solver else [f"no conda solver ({args.solver or ', '.join(SOLVERS)}) on PATH: install micromamba"]
    reasons += [f"channel {c} is not reachable from this machine ({why})" for c in channels if (why := channel_unreachable(c))]
    if reasons:
        print(f"skipped: cannot solve {args.file.name} here: {'; '.join(reasons)}")
        return SKIPPED

    flags = ["--override-channels"] + [f for c in channels for f in ("-c", c)]
    command = [solver, "create", "--dry-run", "--yes", "-n", "metabolic-dry-run", *flags, *conda]
    print("$", " ".join(command), flush=True)
    solved = subprocess.run(command).returncode == 0
    extra = [p for p in pip if not p.startswith("-e")]
    pip_ok = True
    if extra:
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", *extra]
        print("$", " ".join(command), flush=True)
        pip_ok = subprocess.run(command).returncode == 0
    print(f"{args.file.name}: conda part {'solves' if solved else 'does NOT solve'}; "
          f"pip part {'resolves' if pip_ok else 'does NOT resolve'}")
    return 0 if solved and pip_ok else 1


if __name__ == "__main__":
    sys.exit(main())
