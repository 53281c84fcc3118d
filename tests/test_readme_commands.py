"""The README's command list: what scripts/check_readme_commands.py extracts and how it judges a command,
and the fast half of "every command works" (targets exist, CLI lines parse, benchmarks take the
Makefile's flags). The slow half, running every command on a clean clone, is the script itself."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("check_readme_commands", ROOT / "scripts" / "check_readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


check = _load_script()
COMMANDS = check.extract_commands((ROOT / "README.md").read_text())


def test_extraction_reads_only_the_commands_section():
    readme = """# T

```bash
make before   # not in the section
```

## Commands

Text.

```bash
make study                # every notebook
# a comment line
make lab                  # JupyterLab (a server: stop it with Ctrl-C)

make run PROFILE=gpu      # needs a GPU: the gpu profile
make study PROFILE=paper  # needs a GPU and the Hub
```

```python
print("not bash")
```

```bash
python -m metabolic config --profile gpu
```

## Next

```bash
make after
```
"""
    got = check.extract_commands(readme)
    assert [c.text for c in got] == ["make study", "make lab", "make run PROFILE=gpu", "make study PROFILE=paper",
                                     "python -m metabolic config --profile gpu"]
    assert [c.skip for c in got] == [None, None, "needs a GPU", "needs a GPU", None]
    assert [c.server for c in got] == [False, True, False, False, False]
    assert got[0].note == "every notebook" and got[4].note == ""
    with pytest.raises(ValueError, match="no '## Commands' section"):
        check.extract_commands("# nothing\n")
    with pytest.raises(ValueError, match="no ```bash block"):
        check.extract_commands("## Commands\n\ntext only\n")


def test_the_readme_lists_the_commands_a_user_needs():
    texts = [c.text for c in COMMANDS]
    for needed in ("make study", "make test", "make lab", "make benchmarks", "make notebooks", "make run"):
        assert needed in texts
    assert [c.text for c in COMMANDS if c.server] == ["make lab"]
    assert {c.text for c in COMMANDS if c.skip} == {"make run PROFILE=gpu", "make study PROFILE=paper"}


def test_every_make_target_exists_and_every_cli_line_parses():
    from metabolic.cli import _parser

    makefile = (ROOT / "Makefile").read_text()
    for cmd in COMMANDS:
        words = shlex.split(cmd.text)
        if words[0] == "make":
            target = next(w for w in words[1:] if "=" not in w)
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"Makefile has no target {target!r}"
        elif words[:3] == ["python", "-m", "metabolic"]:
            _parser().parse_args(words[3:])  # argparse exits on a flag the CLI does not have
        elif words[0] == "python":
            assert (ROOT / words[1]).is_file(), cmd.text
        else:
            raise AssertionError(f"a README command of an unknown kind: {cmd.text!r}")


def _argparse_flags(path: Path) -> set[str]:
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--"))
    return flags


def test_every_benchmark_takes_the_flags_make_passes():
    recipe = re.search(r"^benchmarks:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    passed = set(re.findall(r"(--[a-z-]+)", recipe))
    assert passed == {"--profile"}
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        assert passed <= _argparse_flags(path), f"{path.name} does not take {passed - _argparse_flags(path)}"


def test_the_energy_benchmark_says_there_is_no_meter_and_exits_0():
    from metabolic.energy.meter import EnergyMeter

    probe = EnergyMeter(device="cuda")
    if probe.available:
        pytest.skip("this machine has a GPU energy meter: the benchmark would measure (minutes); run it by hand")
    proc = subprocess.run([sys.executable, "benchmarks/energy_meter.py", "--profile", "smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("energy_meter benchmark: no GPU energy meter on this machine (") and not proc.stderr


def test_run_command_judges_exit_status_skip_and_servers(tmp_path):
    def run(text, note=""):
        cmd = check.extract_commands(f"## Commands\n\n```bash\n{text}  # {note}\n```\n")[0]
        return check.run_command(cmd, tmp_path, tmp_path / "log", timeout_s=60, server_wait_s=20)

    assert run("test -d .") == ("ok", "")
    status, detail = run("echo half; exit 3")
    assert status == "failed" and detail.startswith("exit status 3") and "half" in detail
    assert run("echo 'skipped: no solver here'; exit 77") == ("skipped", "skipped: no solver here")
    assert run("echo go", "needs a GPU") == ("skipped", "needs a GPU")
    # A server: ready once it prints Jupyter's lab URL, then stopped (sleep would run for 10 minutes).
    assert run("echo http://127.0.0.1:8888/lab?token=x; exec sleep 600", "a server") == ("ok", "served, then stopped")
    status, detail = run("echo starting; exit 1", "a server")
    assert status == "failed" and detail.startswith("exited with status 1 before serving")
