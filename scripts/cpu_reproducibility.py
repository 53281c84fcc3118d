"""Run the smoke notebooks from scratch under several CPU kernel-dispatch settings and check them with nbval.

The stored smoke outputs (notebooks/*.ipynb) must come out the same on any x86-64 CPU. The smoke
profile pins its CPU numerics (`metabolic.numerics`); this script shows that whatever the caller's
environment asks for (ATen's CPU capability, MKL's reproducibility branch), nbval still passes, and
(the control) that with the pin switched off (`METABOLIC_NUMERICS=native`) under another dispatch
the same checks fail: the checks are sharp, and the pin is what makes them pass.

    python scripts/cpu_reproducibility.py                 # every setting (about 5 min each on 2 cores)
    python scripts/cpu_reproducibility.py --only aten-default,control-native-default
    python scripts/cpu_reproducibility.py --notebooks 00,01,02,03

Each setting runs in fresh data and figures folders (nothing is reused between settings). Results go
to `results/reproducibility/<cpu>.json` and a table is printed. Needs `METABOLIC_ASSETS`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def settings() -> dict[str, dict[str, str]]:
    """Name -> environment the run starts from (the caller's choices the pin must withstand)."""
    out = {
        "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
        "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
        "mkl-auto": {"MKL_CBWR": "AUTO"},
        "mkl-avx2": {"MKL_CBWR": "AVX2"},
        "threads-1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    }
    if "avx512f" in cpu_flags():
        out["aten-avx512"] = {"ATEN_CPU_CAPABILITY": "avx512"}
    # The control: no pin, another ATen dispatch than this CPU's own. Expected to FAIL nbval.
    out["control-native-default"] = {"METABOLIC_NUMERICS": "native", "ATEN_CPU_CAPABILITY": "default"}
    return out


def run_one(name: str, env_extra: dict[str, str], notebooks: list[Path], log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"repro-{name}-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("METABOLIC_DATA", "METABOLIC_FIGURES")}
        env.update({"METABOLIC_DATA": f"{tmp}/data", "METABOLIC_FIGURES": f"{tmp}/figures", "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env_extra})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
               *[str(p) for p in notebooks]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (log_dir / f"{name}.log").write_text(log)
    summary = next((line for line in reversed(log.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "")
    failed = [m.group(1) for m in re.finditer(r"^FAILED (\S+)", log, re.M)]
    return {"setting": name, "env": env_extra, "exit_code": proc.returncode, "passed": proc.returncode == 0,
            "summary": summary.strip("= "), "failed_cells": failed, "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    parser.add_argument("--notebooks", default="", help="comma-separated notebook prefixes (default: all)")
    parser.add_argument("--out", default=str(ROOT / "results" / "reproducibility"), help="folder for the JSON record")
    args = parser.parse_args(argv)
    if not os.environ.get("METABOLIC_ASSETS"):
        print("error: METABOLIC_ASSETS is not set: point it at the offline assets folder (../shared/data)", file=sys.stderr)
        return 2
    chosen = settings()
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in chosen]
        if unknown:
            print(f"error: unknown setting {unknown[0]!r}: choose among {', '.join(chosen)}", file=sys.stderr)
            return 2
        chosen = {n: chosen[n] for n in names}
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.notebooks:
        prefixes = [p.strip() for p in args.notebooks.split(",") if p.strip()]
        notebooks = [p for p in notebooks if any(p.name.startswith(x) for x in prefixes)]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="repro-logs-"))
    rows = []
    for name, env_extra in chosen.items():
        print(f"{name}: {env_extra} ...", flush=True)
        row = run_one(name, env_extra, notebooks, log_dir)
        rows.append(row)
        print(f"  {'PASS' if row['passed'] else 'FAIL'} in {row['wall_s']} s: {row['summary']}", flush=True)
    record = {"cpu": cpu_name(), "avx512": "avx512f" in cpu_flags(), "python": platform.python_version(),
              "notebooks": [p.name for p in notebooks], "logs": str(log_dir), "runs": rows}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_name()).strip("-").lower()
    (out_dir / f"{slug}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'setting':<26} {'expected':<9} {'result':<7} summary")
    ok = True
    for row in rows:
        expected = "FAIL" if row["setting"].startswith("control") else "PASS"
        got = "PASS" if row["passed"] else "FAIL"
        ok &= expected == got
        print(f"{row['setting']:<26} {expected:<9} {got:<7} {row['summary']}")
    print(f"record: {out_dir / (slug + '.json')}; logs: {log_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
