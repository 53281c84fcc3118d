"""Run every command of the README's command list on a clean clone and report each as ok / failed.

    python scripts/check_readme_commands.py --clone /work/readme-clone   # clone HEAD there, run everything
    python scripts/check_readme_commands.py --in /path/to/clean/checkout [--only 1,2,9]
    python scripts/check_readme_commands.py --list                       # the commands, nothing run

The command list is every ```bash block of the README's "## Commands" section, one command a line;
the comment after a command is its note. A note saying "needs a GPU" or "needs ... the Hub" skips
the command (reported with that reason); a note containing "a server" starts it, waits until it
serves (Jupyter's URL appears in its output) and stops it. A command that exits 77 (the automake
convention, used by `scripts/check_environment.py`) reports itself skipped; its last line says why.

Commands run in the checkout with `bash -c`, in the order listed, with the checkout's `.venv/bin`
first on PATH (the README's "activated venv") and the caller's environment otherwise, so set
`METABOLIC_ASSETS` for an offline run. Each command's output goes to
`data/readme-check/NN.log` in the checkout (git-ignored). Slow: it runs `make study` and `make test`
in full, so it is not part of the test suite (tests/test_readme_commands.py checks the extraction).
Exit status 0 when every command that ran succeeded.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Commands"
SKIP_NOTES = {"needs a gpu": "needs a GPU", "the hub": "needs the Hugging Face Hub"}
SERVER_NOTE = "a server"
SERVER_READY = re.compile(r"https?://\S+/lab")  # Jupyter prints the lab URL once it serves
SKIP_STATUS = 77


@dataclass(frozen=True)
class Command:
    text: str  # what the shell runs
    note: str  # the comment after it in the README
    skip: str | None  # why it is not run here, or None
    server: bool  # runs until stopped: ready = it serves


def extract_commands(readme: str) -> list[Command]:
    """The commands of the README's "## Commands" section, in order (see the module docstring)."""
    if SECTION not in readme:
        raise ValueError(f"the README has no {SECTION!r} section")
    section = readme.split(SECTION, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M):
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            text, _, note = line.partition("  #")
            note = note.strip()
            lowered = note.lower()
            skip = next((why for key, why in SKIP_NOTES.items() if key in lowered), None)
            commands.append(Command(text.strip(), note, skip, SERVER_NOTE in lowered))
    if not commands:
        raise ValueError(f"no ```bash block with commands in the README's {SECTION!r} section")
    return commands


def _environment(checkout: Path) -> dict[str, str]:
    env = dict(os.environ)
    venv = checkout / ".venv"
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env.pop("PYTHONPATH", None)  # the clone's own package, not a caller's checkout
    return env


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n").rstrip().splitlines()
    return "\n".join("      " + line for line in text[-lines:])


def run_command(cmd: Command, checkout: Path, log: Path, timeout_s: float, server_wait_s: float) -> tuple[str, str]:
    """Run one command; return (status, detail) with status in ok / failed / skipped."""
    if cmd.skip:
        return "skipped", cmd.skip
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", cmd.text], cwd=checkout, env=_environment(checkout), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            if cmd.server:
                return _wait_until_serving(proc, log, server_wait_s)
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "failed", f"still running after {timeout_s:.0f} s"
        finally:
            if proc.poll() is None:
                _stop(proc)
    if rc == 0:
        return "ok", ""
    if rc == SKIP_STATUS:
        return "skipped", log.read_text(errors="replace").strip().splitlines()[-1]
    return "failed", f"exit status {rc}\n{_tail(log)}"


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Jupyter kernels start their own sessions, outside its group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(proc: subprocess.Popen) -> None:
    """Stop a command we started: its process group (start_new_session) and everything below it."""
    below = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    for pid in below:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_until_serving(proc: subprocess.Popen, log: Path, wait_s: float) -> tuple[str, str]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        if SERVER_READY.search(log.read_text(errors="replace")):
            return "ok", "served, then stopped"
        if proc.poll() is not None:
            return "failed", f"exited with status {proc.returncode} before serving\n{_tail(log)}"
        time.sleep(1)
    return "failed", f"not serving after {wait_s:.0f} s\n{_tail(log)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--clone", type=Path, metavar="DEST", help="git clone this repository's HEAD to DEST (new) and run there")
    where.add_argument("--in", dest="checkout", type=Path, metavar="DIR", help="run in this clean checkout")
    where.add_argument("--list", action="store_true", help="print the commands and stop")
    parser.add_argument("--only", default="", help="comma-separated command numbers (as --list prints them)")
    parser.add_argument("--timeout-s", type=float, default=3600, help="per command")
    parser.add_argument("--server-wait-s", type=float, default=300, help="how long a server may take to serve")
    args = parser.parse_args(argv)

    commands = extract_commands((ROOT / "README.md").read_text())
    if args.list or not (args.clone or args.checkout):
        for i, cmd in enumerate(commands, 1):
            print(f"{i:2d}. {cmd.text}" + (f"   [skip: {cmd.skip}]" if cmd.skip else "") + ("   [server]" if cmd.server else ""))
        return 0
    if args.clone:
        if args.clone.exists():
            print(f"error: {args.clone} exists: --clone makes a new clone (or use --in {args.clone})", file=sys.stderr)
            return 2
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(args.clone)], check=True)
        checkout = args.clone.resolve()
    else:
        checkout = args.checkout.resolve()
    chosen = {int(n) for n in args.only.split(",") if n.strip()}
    logs = checkout / "data" / "readme-check"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"checkout: {checkout} (commit {_head(checkout)}, {_cleanliness(checkout)}); METABOLIC_ASSETS={os.environ.get('METABOLIC_ASSETS', '(unset)')}; "
          f"logs: {logs}", flush=True)
    results = []
    for i, cmd in enumerate(commands, 1):
        if chosen and i not in chosen:
            continue
        print(f"{i:2d}. {cmd.text} ...", flush=True)
        t0 = time.monotonic()
        status, detail = run_command(cmd, checkout, logs / f"{i:02d}.log", args.timeout_s, args.server_wait_s)
        results.append(status)
        print(f"    {status} ({time.monotonic() - t0:.0f} s)" + (f": {detail}" if detail else ""), flush=True)
    counts = {s: results.count(s) for s in ("ok", "failed", "skipped")}
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0


def _cleanliness(checkout: Path) -> str:
    out = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain"], capture_output=True, text=True).stdout
    changed = [line for line in out.splitlines() if line.strip()]
    return "clean" if not changed else f"NOT clean: {len(changed)} changed or untracked paths"


def _head(checkout: Path) -> str:
    out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
