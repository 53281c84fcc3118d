"""A real kill -9 of one pipeline stage in a child process, for the fault tests of every stage (test_faults.py,
test_etokens_grid.py): the resume that follows must end as an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A real kill -9 of one stage in its own process, right after the `nth` call of `patched` returned (a chunk, a
# checkpoint, a table, a unit record kept): no handler, no `finally`, as the kernel's OOM killer or a pulled plug
# would end it.
_KILL_AFTER = textwrap.dedent("""
    import ast, importlib, os, signal, sys
    module, name, nth, stage, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    owner = importlib.import_module(module)
    real, calls = getattr(owner, name), []
    def killed_after_nth(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, killed_after_nth)
    from metabolic.core.profiles import load_config
    from metabolic.pipeline import stages
    getattr(stages, stage)(load_config("smoke", ast.literal_eval(overrides)), progress=False)
""")


def kill_9(stage: str, overrides: dict, patched: str, nth: int) -> None:
    """Run `stages.<stage>` on smoke + `overrides` in a child process, SIGKILLed after the `nth` call of `patched`
    (`module.function`); the child sees this process's METABOLIC_DATA."""
    module, name = patched.rsplit(".", 1)
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER, module, name, str(nth), stage, repr(overrides)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
