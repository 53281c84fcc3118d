"""Benchmark the energy meter: the adapter against a bare zeus `ZeusMonitor` on the same windows, and its overhead.

    python benchmarks/energy_meter.py [--profile smoke] [--windows 1,2,5] [--repeats N] [--gpu N]

`--profile` (as for every benchmark) supplies the defaults of `--gpu` and `--repeats` from its `energy`
section (`energy.gpu_index`, `energy.repeats`).

1. Agreement: `metabolic.energy.meter` is a thin adapter over zeus. The same GPU workload (back-to-back
   fp16 matmuls) is measured by the adapter and by a bare `ZeusMonitor` in nested windows (which one is
   outside alternates per repeat, so neither always gets the wider window); agreement = |adapter - zeus|
   / zeus in %. The adapter adds CUDA synchronisation and checks, not arithmetic: goal <= 2% on windows >= 1 s.
2. Overhead: the same fixed workload is timed bare and inside an adapter window; overhead = (with - bare)
   / bare, as a fraction of window time. Goal: <= 1%.

On a machine without an NVIDIA GPU the script says so and exits 0: there is nothing to measure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _workload(seconds: float, device: str = "cuda"):
    """A callable that keeps the GPU busy for about `seconds` (calibrated once), and its iteration count."""
    import torch

    a = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    b = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    per_iter = (time.perf_counter() - t0) / 20
    n = max(1, round(seconds / per_iter))

    def run() -> None:
        for _ in range(n):
            a @ b

    return run, n


def agreement(windows_s: list[float], repeats: int, gpu: int) -> list[dict]:
    import torch
    from metabolic.energy.meter import EnergyMeter
    from zeus.monitor import ZeusMonitor

    meter = EnergyMeter(device="cuda", gpu_index=gpu)
    zeus = ZeusMonitor(gpu_indices=[gpu], cpu_indices=[])
    out = []
    for window_s in windows_s:
        run, _ = _workload(window_s)
        for r in range(repeats):
            torch.cuda.synchronize()
            if r % 2 == 0:
                zeus.begin_window("w")
                with meter.window() as w:
                    run()
                z = zeus.end_window("w")
            else:
                wid = meter.begin()
                zeus.begin_window("w")
                run()
                z = zeus.end_window("w")
                adapted = meter.end(wid)
            m = w.measurement if r % 2 == 0 else adapted
            zeus_j = z.gpu_energy[gpu]
            out.append({"window_s": m.time_s, "adapter_j": m.energy_j, "zeus_j": zeus_j, "source": m.source,
                        "agreement_pct": 100 * abs(m.energy_j - zeus_j) / zeus_j})
    meter.close()
    return out


def overhead(window_s: float, repeats: int, gpu: int) -> dict[str, float]:
    import torch
    from metabolic.energy.meter import EnergyMeter

    run, _ = _workload(window_s)

    def timed(meter=None) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if meter is None:
            run()
            torch.cuda.synchronize()
        else:
            with meter.window():
                run()
        return time.perf_counter() - t0

    bare = statistics.median(timed() for _ in range(repeats))
    meter = EnergyMeter(device="cuda", gpu_index=gpu)
    with_meter = statistics.median(timed(meter) for _ in range(repeats))
    meter.close()
    return {"source": meter.source, "overhead": (with_meter - bare) / bare, "bare_s": bare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke", help="profile whose energy section gives the defaults below")
    parser.add_argument("--windows", default="1,2,5", help="window lengths in seconds")
    parser.add_argument("--repeats", type=int, default=None, help="default: the profile's energy.repeats")
    parser.add_argument("--gpu", type=int, default=None, help="default: the profile's energy.gpu_index")
    args = parser.parse_args(argv)

    from metabolic.core.errors import MetabolicError
    from metabolic.core.profiles import load_config
    from metabolic.energy.meter import EnergyMeter

    try:
        energy = load_config(args.profile).energy
    except MetabolicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.repeats = energy.repeats if args.repeats is None else args.repeats
    args.gpu = energy.gpu_index if args.gpu is None else args.gpu

    probe = EnergyMeter(device="cuda", gpu_index=args.gpu)
    if not probe.available:
        print(f"energy_meter benchmark: no GPU energy meter on this machine ({probe.reason}); nothing to measure.")
        return 0
    info = probe.info
    probe.close()
    print(f"GPU {args.gpu}: {info.name}, driver {info.driver}, power limit {info.power_limit_w} W, "
          f"counter {'yes' if info.counter_supported else 'no'}")
    windows = [float(w) for w in args.windows.split(",") if w.strip()]

    rows = agreement(windows, args.repeats, args.gpu)
    print(f"{'window_s':>9} {'adapter_J':>10} {'zeus_J':>10} {'agree_%':>8} source")
    for r in rows:
        print(f"{r['window_s']:9.3f} {r['adapter_j']:10.3f} {r['zeus_j']:10.3f} {r['agreement_pct']:8.3f} {r['source']}")
    for w in windows:
        sel = [r["agreement_pct"] for r in rows if abs(r["window_s"] - w) < 0.5 * w]
        if sel:
            print(f"window ~{w:g} s: median disagreement {statistics.median(sel):.3f}% (goal <= 2%), batch = one matmul stream")

    ov = overhead(max(windows), args.repeats, args.gpu)
    print(f"adapter overhead ({ov['source']}): {100 * ov['overhead']:.3f}% of a {ov['bare_s']:.2f} s window (goal <= 1%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
