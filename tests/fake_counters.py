"""Energy counters that cannot run here, faked where zeus reads them: NVML through pynvml's functions
patched with autospec, RAPL through a powercap tree in a temporary folder (zeus's `RAPL_DIR` pointed at
it). zeus keeps its devices as process-wide singletons: `reset_zeus` forgets them between tests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence
from unittest import mock

import pynvml

GPU_NAME = "NVIDIA H100 80GB HBM3"
DRIVER = "550.54.15"
MAX_ENERGY_RANGE_UJ = 262_143_328_850  # what a Xeon's package zone reports


def reset_zeus() -> None:
    """Forget zeus's GPU and CPU singletons and its cached availability checks (when zeus is loaded)."""
    import sys

    if "zeus.device" not in sys.modules:
        return
    import zeus.device.cpu as cpu
    import zeus.device.gpu as gpu
    from zeus.device.cpu.rapl import rapl_is_available
    from zeus.device.gpu.amd import amdsmi_is_available
    from zeus.device.gpu.nvidia import nvml_is_available

    gpu._gpus = None
    cpu._cpus = None
    for check in (rapl_is_available, nvml_is_available, amdsmi_is_available):
        check.cache_clear()


@contextlib.contextmanager
def fake_nvml(energy_mj: Callable[[object], int] | Sequence[int] = (), count: int = 1,
              architecture: int = pynvml.NVML_DEVICE_ARCH_HOPPER, init_error: Optional[int] = None,
              power_limit_mw: int = 700_000):
    """Patch the pynvml functions zeus and the meter call, with autospec so signatures are enforced.

    energy_mj: successive reads of the energy counter, or a function of the handle; init_error: an
    NVML error code nvmlInit raises (no driver, no library)."""
    reads = list(energy_mj) if not callable(energy_mj) else None
    handle = object()

    def energy(h):
        assert h is handle
        return reads.pop(0) if reads is not None else energy_mj(h)

    init = dict(side_effect=pynvml.NVMLError(init_error)) if init_error is not None else dict(return_value=None)
    patches = {
        "nvmlInit": init,
        "nvmlShutdown": dict(return_value=None),
        "nvmlDeviceGetCount": dict(return_value=count),
        "nvmlDeviceGetHandleByIndex": dict(return_value=handle),
        "nvmlDeviceGetC2cModeInfoV": dict(side_effect=pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)),
        "nvmlDeviceGetName": dict(return_value=GPU_NAME),
        "nvmlSystemGetDriverVersion": dict(return_value=DRIVER),
        "nvmlDeviceGetArchitecture": dict(return_value=architecture),
        "nvmlDeviceGetPowerManagementLimit": dict(return_value=power_limit_mw),
        "nvmlDeviceGetTotalEnergyConsumption": dict(side_effect=energy),
    }
    reset_zeus()
    with contextlib.ExitStack() as stack:
        mocks = {name: stack.enter_context(mock.patch.object(pynvml, name, autospec=True, **kw)) for name, kw in patches.items()}
        stack.enter_context(mock.patch.dict(os.environ))
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        try:
            yield mocks
        finally:
            reset_zeus()


class Powercap:
    """A powercap tree: `intel-rapl/intel-rapl:<p>/energy_uj` per package, `.../intel-rapl:<p>:0` its DRAM zone.

    `set(p, uj)` / `set_dram(p, uj)` write a counter; `wraps[path]` is how many wraparounds zeus's tracker
    reports for a counter file (its polling process is replaced: tests must not spawn one).
    """

    def __init__(self, root: Path, packages: int = 1, dram: bool = True) -> None:
        self.dir = Path(root) / "intel-rapl"
        self.wraps: dict[str, int] = {}
        for p in range(packages):
            self._zone(self.dir / f"intel-rapl:{p}", f"package-{p}")
            if dram:
                self._zone(self.dir / f"intel-rapl:{p}" / f"intel-rapl:{p}:0", "dram")

    def _zone(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True)
        (folder / "name").write_text(name + "\n")
        (folder / "energy_uj").write_text("0\n")
        (folder / "max_energy_range_uj").write_text(f"{MAX_ENERGY_RANGE_UJ}\n")

    def package(self, p: int) -> Path:
        return self.dir / f"intel-rapl:{p}" / "energy_uj"

    def dram(self, p: int) -> Path:
        return self.dir / f"intel-rapl:{p}" / f"intel-rapl:{p}:0" / "energy_uj"

    def set(self, path: Path, uj: int) -> None:
        path.write_text(f"{uj}\n")


@contextlib.contextmanager
def fake_rapl(powercap: Optional[Powercap], tmp_path: Path):
    """zeus reads RAPL from `powercap` (None: a folder that does not exist, as on this machine and CI)."""
    from zeus.device.cpu import rapl

    trackers = {}
    real = rapl.RaplWraparoundTracker

    def tracker(path, max_energy_uj):
        t = mock.create_autospec(real, instance=True)
        t.get_num_wraparounds.side_effect = lambda: powercap.wraps.get(path, 0)
        trackers[path] = (t, max_energy_uj)
        return t

    folder = powercap.dir if powercap is not None else Path(tmp_path) / "no-powercap" / "intel-rapl"
    reset_zeus()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"METABOLIC_RAPL": "on"}))  # conftest switches it off
        stack.enter_context(mock.patch.object(rapl, "RAPL_DIR", str(folder)))
        stack.enter_context(mock.patch.object(rapl, "CONTAINER_RAPL_DIR", str(Path(tmp_path) / "no-zeus-sys")))
        stack.enter_context(mock.patch.object(rapl, "RaplWraparoundTracker", autospec=True, side_effect=tracker))
        try:
            yield trackers
        finally:
            reset_zeus()
