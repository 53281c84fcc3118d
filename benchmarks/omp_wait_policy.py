"""Two pytest workers on 2 cores: OpenMP's active (spinning) against passive (sleeping) waiting.

    python benchmarks/omp_wait_policy.py --profile smoke [--iterations 60] [--json PATH]

Why: `make test` runs pytest on 2 xdist workers; in the smoke profile's pinned numerics every process
keeps 2 OpenMP threads (`metabolic.core.numerics`), so two workers run 4 threads on 2 cores.
`tests/conftest.py` sets `OMP_WAIT_POLICY=PASSIVE` on the workers; this measures why.

The workload is one MiniLM-sized encoder block (384 -> 1536 -> 384 with GELU and LayerNorm, batch 64 x 40
word pieces, the labeller's kind of work) for `--iterations` forwards, in a fresh process per run, in
the profile's numeric mode. It is timed alone, then as two processes started together, with each
policy. Prints the timed seconds (process starts excluded) and the ratio of the pair's slower process
to twice the time alone (1.0: the pair costs what running them one after the other costs; above 1:
oversubscription loses time), and checks
that both policies compute bit-identical results (the policy changes scheduling, not arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def worker(profile: str, iterations: int) -> dict:
    """Time the encoder block in this process (numerics pinned for `profile` before torch loads)."""
    from metabolic.core import numerics

    numerics.pin(profile)
    import torch

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384),
                                torch.nn.LayerNorm(384))
    x = torch.randn(64, 40, 384)
    with torch.inference_mode():
        block(x)  # first call: kernel selection and allocation, not timed
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(iterations):
            total += float(block(x).double().sum())
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "checksum": total.hex(), "threads": torch.get_num_threads()}


def _run(profile: str, iterations: int, policy: str, copies: int) -> list[dict]:
    """Start `copies` worker processes together with OMP_WAIT_POLICY=`policy`; their reports."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--profile", profile, "--iterations", str(iterations), "--worker"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed (exit {[p.returncode for p in procs]})")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--iterations", type=int, default=60, help="encoder-block forwards per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table printed here to PATH (JSON)")
    args = parser.parse_args(argv)
    if args.iterations <= 0:
        parser.error(f"--iterations={args.iterations} is invalid: use a value > 0")
    if args.worker:
        print(json.dumps(worker(args.profile, args.iterations)))
        return 0

    rows = []
    for policy in ("ACTIVE", "PASSIVE"):
        (alone,) = _run(args.profile, args.iterations, policy, 1)
        pair = _run(args.profile, args.iterations, policy, 2)
        pair_s = max(r["seconds"] for r in pair)
        rows.append({"policy": policy, "threads_per_process": alone["threads"], "alone_s": round(alone["seconds"], 3),
                     "pair_s": round(pair_s, 3), "pair_vs_sequential": round(pair_s / (2 * alone["seconds"]), 3),
                     "checksum": alone["checksum"], "same_in_pair": all(r["checksum"] == alone["checksum"] for r in pair)})
    print(f"{os.cpu_count()} CPUs, profile {args.profile}, {args.iterations} encoder-block forwards per process")
    print(f"{'policy':8} {'threads':>7} {'alone s':>8} {'pair s':>8} {'pair / (2 x alone)':>19}")
    for r in rows:
        print(f"{r['policy']:8} {r['threads_per_process']:>7} {r['alone_s']:>8.2f} {r['pair_s']:>8.2f} {r['pair_vs_sequential']:>19.2f}")
    same = len({r["checksum"] for r in rows}) == 1 and all(r["same_in_pair"] for r in rows)
    print(f"bit-identical results across policies and runs: {'yes' if same else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "profile": args.profile,
                                               "iterations": args.iterations, "rows": rows, "bit_identical": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
