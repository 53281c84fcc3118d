"""torch.profiler tables and Chrome traces of single calls, for the overhead benchmarks' `--profile-trace`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping


def write_profiles(folder: str | Path, prefix: str, calls: Mapping[str, Callable[[], object]], device_type: str) -> None:
    """Profile one call of each `calls[name]`; write `<prefix>_<name>.txt` (the 40 operators with the most
    self time, CUDA time on a GPU) and `<prefix>_<name>.json` (a Chrome trace) to `folder`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cuda = device_type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn in calls.items():
        with profile(activities=activities, record_shapes=True) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40)
        (out / f"{prefix}_{name}.txt").write_text(table + "\n", encoding="utf-8")
        prof.export_chrome_trace(str(out / f"{prefix}_{name}.json"))
