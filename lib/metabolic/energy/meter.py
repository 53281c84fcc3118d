"""Energy meter: a thin adapter over zeus's `ZeusMonitor` (GPU through NVML, CPU package and DRAM through RAPL).

    meter = EnergyMeter()                  # the GPU when zeus sees one, else the CPU's RAPL counters
    with meter.window("prefill") as win:   # a named zeus window
        run_queries()
    m = win.measurement                    # frozen Measurement: energy_j (None when unavailable), time_s, source, ...

zeus reads the counters (NVML's energy counter, RAPL's `energy_uj` files), unwraps RAPL's wraparound
and polls power on GPUs without an energy counter. What this module adds, and zeus lacks:

* which device a window measures (`source`): ``"counter"`` or ``"polling"`` (the GPU that runs the
  work, through NVML), ``"rapl"`` (the CPU that runs it: package + DRAM, summed over sockets), or
  ``"unavailable"``. Every counter that could not be read is named with the reason (`missing`); an
  unavailable window has ``energy_j=None``, never 0 and never an estimate;
* the too-short-window warning (`ShortWindowWarning`): NVML's counter moves in ~100 ms steps
  (`counter_period_s`), RAPL's in ~1 ms (`RAPL_PERIOD_S`), and each window states its resolution;
* a reading no device can produce (negative, or over ten times the power limit: a counter reset) is a
  `DataError`, not a number;
* the idle baseline and the active energy above it.

CUDA work is asynchronous, so `sync` (``torch.cuda.synchronize``) runs before each edge is read.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Literal, Optional

from metabolic.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Source = Literal["counter", "polling", "rapl", "unavailable"]
COUNTERS = ("gpu", "cpu_package", "dram")  # what zeus can read; `EnergyMeter.missing` says why one was not
# `METABOLIC_RAPL=off` reads no RAPL counter even where one is readable: the test suite sets it, so the checked
# outputs of the CPU grid (timings only) are the same on a CI runner that exposes RAPL and on one that does not.
RAPL_SWITCH = "METABOLIC_RAPL"
RAPL_PERIOD_S = 0.001  # RAPL's energy status counters update about every millisecond
# zeus's own warning for a GPU window that read 0 J; `ShortWindowWarning` says more (length and period)
_ZEUS_ZERO_WARNING = "The energy consumption of one or more GPUs was measured as zero"


class ShortWindowWarning(UserWarning):
    """A window shorter than the energy counter's update period: its energy is mostly noise."""


@dataclass(frozen=True)
class Measurement:
    """One window. ``energy_j`` is the measured device's energy, None when no counter of it could be read."""

    energy_j: Optional[float]
    time_s: float
    source: Source
    gpu_j: Optional[float] = None  # each counter read in the window (None: not read, see `reason`)
    cpu_package_j: Optional[float] = None
    dram_j: Optional[float] = None
    gpu_index: Optional[int] = None
    gpu_name: Optional[str] = None
    driver: Optional[str] = None
    power_limit_w: Optional[float] = None
    short_window: bool = False  # time_s < the counter's update period: energy_j is unreliable
    reason: str = ""  # the counters not read, each with why ("" when all were read)
    # How far energy_j can be off: each edge reads a value up to one update period old, so the error
    # is below that period x the window's mean power.
    resolution_j: Optional[float] = None

    @property
    def available(self) -> bool:
        return self.source != "unavailable" and self.energy_j is not None

    @property
    def mean_power_w(self) -> Optional[float]:
        if not self.available or self.time_s <= 0:
            return None
        return self.energy_j / self.time_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "available": self.available}


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    driver: Optional[str]
    power_limit_w: Optional[float]
    counter_supported: bool


@dataclass(frozen=True)
class IdleBaseline:
    """Idle power of the measured device, over a window with nothing running."""

    power_w: Optional[float]
    measurement: Measurement

    @property
    def resolution_w(self) -> Optional[float]:
        """How far `power_w` can be off: the idle window's energy resolution over its length."""
        m = self.measurement
        if self.power_w is None or m.resolution_j is None or m.time_s <= 0:
            return None
        return m.resolution_j / m.time_s

    def idle_energy_j(self, time_s: float) -> Optional[float]:
        """What the idle device draws in `time_s` seconds (None without an idle power)."""
        return idle_energy_j(self.power_w, time_s)

    def active_energy_j(self, energy_j: Optional[float], time_s: float) -> Optional[float]:
        """Energy above idle over `time_s` seconds (see `active_energy_j`)."""
        return active_energy_j(energy_j, self.power_w, time_s)


def idle_energy_j(idle_power_w: Optional[float], time_s: float) -> Optional[float]:
    """What the idle device draws in `time_s` seconds (None without an idle power)."""
    return None if idle_power_w is None else idle_power_w * time_s


def active_energy_j(energy_j: Optional[float], idle_power_w: Optional[float], time_s: float) -> Optional[float]:
    """Energy above idle: energy_j - idle power x time_s (None when either is unavailable).

    >>> active_energy_j(400.0, 140.0, 1.0), active_energy_j(None, 140.0, 1.0)
    (260.0, None)
    """
    idle = idle_energy_j(idle_power_w, time_s)
    return None if energy_j is None or idle is None else energy_j - idle


def missing_text(missing: dict[str, str]) -> str:
    """The counters not read, with why, one clause each; counters with the same reason share it.

    >>> missing_text({"gpu": "no driver", "cpu_package": "no RAPL", "dram": "no RAPL"})
    'gpu: no driver; cpu package + dram: no RAPL'
    """
    by_reason: dict[str, list[str]] = {}
    for counter in COUNTERS:
        if counter in missing:
            by_reason.setdefault(missing[counter], []).append(counter.replace("_", " "))
    return "; ".join(f"{' + '.join(names)}: {why}" for why, names in by_reason.items())


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Window:
    """Handle yielded by `EnergyMeter.window()`; `measurement` is set when the block exits."""

    def __init__(self) -> None:
        self._measurement: Optional[Measurement] = None

    @property
    def measurement(self) -> Measurement:
        if self._measurement is None:
            raise RuntimeError("the window is still open: read .measurement after the `with` block")
        return self._measurement


class EnergyMeter:
    """Named measurement windows through one `ZeusMonitor`; `available` is False (with `reason`) when the
    measured device's counters cannot be read.

    device: ``"cuda"`` measures GPU `gpu_index`, ``"cpu"`` the CPU package(s) and DRAM through RAPL,
    ``"auto"`` the GPU when zeus sees one, else the CPU. The other device's counters are read too when
    they can be (`Measurement.gpu_j`, `cpu_package_j`, `dram_j`), but `energy_j` is the measured device's.
    """

    def __init__(
        self,
        device: Literal["auto", "cuda", "cpu"] = "auto",
        gpu_index: int = 0,
        counter_period_s: float = 0.1,
        sync: Optional[Callable[[], None]] = _cuda_sync,
    ) -> None:
        if counter_period_s <= 0:
            raise ConfigError(f"counter_period_s={counter_period_s!r} is invalid: use a value > 0 (NVML's counter: 0.1)")
        if device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device={device!r} is invalid: choose 'auto', 'cuda' or 'cpu'")
        from zeus.monitor import ZeusMonitor

        self.gpu_index = gpu_index
        self.counter_period_s = counter_period_s
        self.sync = sync
        self.missing: dict[str, str] = {}
        self._gpus = self._find_gpu(gpu_index)
        self._cpus = self._find_rapl()
        self.info: Optional[GPUInfo] = None
        if device == "auto":
            device = "cuda" if self._gpus is not None else "cpu"
        self.device = device
        if device == "cuda" and self._gpus is not None:
            counter = bool(self._gpus.supports_get_total_energy_consumption(gpu_index))
            self.info = GPUInfo(gpu_index, _text(self._gpus.get_name(gpu_index)), _driver(),
                                _power_limit_w(self._gpus, gpu_index), counter)
            self.source: Source = "counter" if counter else "polling"
        elif device == "cpu" and "cpu_package" not in self.missing:
            self.source = "rapl"
        else:
            self.source = "unavailable"
        target = ("gpu",) if device == "cuda" else ("cpu_package", "dram")
        self.reason = "" if self.source != "unavailable" else missing_text({k: self.missing[k] for k in target if k in self.missing})
        gpu_indices = [gpu_index] if self._gpus is not None else []
        self._zeus = ZeusMonitor(gpu_indices=gpu_indices, cpu_indices=list(range(len(self._cpus or ()))))
        if self._cpus is not None:  # zeus starts a RAPL wraparound watcher (a process) at a file's first read: now,
            self._zeus.begin_window("rapl-start", sync_execution=False)  # not inside the first measured window
            self._zeus.end_window("rapl-start", sync_execution=False, cancel=True)
        self._ids = itertools.count()
        log.info("energy meter (zeus): %s, source %s%s", self.counters, self.source,
                 f"; not read: {missing_text(self.missing)}" if self.missing else "")

    # -- set-up ---------------------------------------------------------------------------
    def _find_gpu(self, index: int):
        """zeus's GPUs when GPU `index` exists, else None (with the reason in `missing`)."""
        from zeus.device import get_gpus

        amd_log = logging.getLogger("zeus.device.gpu.amd")
        level = amd_log.level
        amd_log.setLevel(logging.ERROR)  # without an AMD GPU its library fails to load: no warning, `missing` says why
        try:
            gpus = get_gpus()
        except Exception as exc:  # noqa: BLE001 - zeus's init errors, or a vendor library failing on import
            self.missing["gpu"] = f"no GPU energy counter ({exc})"
            return None
        finally:
            amd_log.setLevel(level)
        if index >= len(gpus):
            self.missing["gpu"] = f"GPU index {index} requested but zeus sees {len(gpus)} GPU(s)"
            return None
        return gpus

    def _find_rapl(self):
        """zeus's RAPL CPUs, else None (with the reasons in `missing`); a missing DRAM zone is named too."""
        from zeus.device.cpu import get_cpus, rapl

        if os.environ.get(RAPL_SWITCH, "").lower() == "off":  # tests and CI: the same rows on every machine
            self.missing["cpu_package"] = self.missing["dram"] = f"RAPL switched off ({RAPL_SWITCH}=off)"
            return None
        folders = [d for d in (rapl.RAPL_DIR, rapl.CONTAINER_RAPL_DIR) if os.path.exists(d)]
        why = ""
        if not folders:
            why = (f"RAPL not exposed: no {rapl.RAPL_DIR} (nor {rapl.CONTAINER_RAPL_DIR}), as in most virtual "
                   f"machines, containers and CI runners")
        else:
            try:
                cpus = get_cpus()
            except Exception as exc:  # noqa: BLE001 - zeus wraps OSErrors of the sysfs files in its own errors
                denied = isinstance(exc, PermissionError) or "permission" in f"{exc} {exc.__cause__}".lower()
                why = (f"RAPL counters under {folders[0]} are not readable by this user (root only on Linux >= 5.10): "
                       f"sudo chmod a+r {folders[0]}/intel-rapl:*/energy_uj, or run zeusd" if denied
                       else f"RAPL under {folders[0]} could not be read ({type(exc).__name__}: {exc})")
            else:
                if len(cpus) == 0:
                    why = f"RAPL exposes no package zone (intel-rapl:<n>) under {folders[0]}"
        if why:
            self.missing["cpu_package"] = self.missing["dram"] = why
            return None
        no_dram = [i for i in range(len(cpus)) if not cpus.supports_get_dram_energy_consumption(i)]
        if no_dram:
            self.missing["dram"] = f"RAPL exposes no dram zone for package(s) {', '.join(map(str, no_dram))}"
        return cpus

    @property
    def available(self) -> bool:
        return self.source != "unavailable"

    @property
    def counters(self) -> str:
        """What `energy_j` sums, in words."""
        if self.source in ("counter", "polling"):
            how = "energy counter" if self.source == "counter" else "power polled by zeus"
            return f"GPU {self.gpu_index} ({self.info.name}, NVML {how})"
        if self.source == "rapl":
            return "CPU package" + (" + DRAM" if "dram" not in self.missing else "") + " (RAPL)"
        return "none"

    def close(self) -> None:
        """Drop the windows still open (zeus keeps NVML and RAPL open for the process)."""
        self._zeus.reset_windows()

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- windows --------------------------------------------------------------------------
    def begin(self, name: str = "window") -> str:
        """Open the zeus window `name` (after synchronising CUDA); return its key for `end`."""
        if self.sync is not None:
            self.sync()
        key = f"{name}#{next(self._ids)}"
        self._zeus.begin_window(key, sync_execution=False)
        return key

    def end(self, key: str, _stacklevel: int = 2) -> Measurement:
        """Close window `key` (after synchronising CUDA) and return its measurement."""
        if key not in self._zeus.measurement_states:
            raise ValueError(f"window {key!r} is not open")
        if self.sync is not None:
            self.sync()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ZEUS_ZERO_WARNING)
            z = self._zeus.end_window(key, sync_execution=False)
        gpu_j = z.gpu_energy.get(self.gpu_index) if self._gpus is not None else None
        cpu_j = sum(z.cpu_energy.values()) if self._cpus is not None and z.cpu_energy else None
        dram_j = sum(z.dram_energy.values()) if "dram" not in self.missing and z.dram_energy else None
        common = dict(time_s=z.time, gpu_j=gpu_j, cpu_package_j=cpu_j, dram_j=dram_j, reason=missing_text(self.missing))
        if self.source == "unavailable":
            return Measurement(energy_j=None, source="unavailable", **common)
        energy_j = gpu_j if self.source in ("counter", "polling") else cpu_j + (dram_j or 0.0)
        period_s = RAPL_PERIOD_S if self.source == "rapl" else self.counter_period_s
        short = z.time < period_s
        if short:
            warnings.warn(
                f"energy window of {z.time * 1000:.1f} ms is shorter than the counter update period "
                f"({period_s * 1000:.0f} ms): put more queries in the window or repeat them",
                ShortWindowWarning,
                stacklevel=_stacklevel,
            )
        self._check(energy_j, z.time, short)
        info = self.info
        # mean power over at least one period, so a short window's single counter step does not inflate it
        resolution_j = period_s * energy_j / max(z.time, period_s)
        return Measurement(
            energy_j=energy_j, source=self.source, gpu_index=info.index if info else None, gpu_name=info.name if info else None,
            driver=info.driver if info else None, power_limit_w=info.power_limit_w if info else None, short_window=short,
            resolution_j=resolution_j, **common,
        )

    def _check(self, energy_j: float, time_s: float, short: bool) -> None:
        # A counter reset (driver reload) or a missed RAPL wrap gives a negative or absurd energy: reject it.
        # Short windows are exempt from the power bound: one ~100 ms counter step in a 5 ms window
        # looks like kilowatts, which is what the short-window warning is for.
        limit = ((self.info.power_limit_w if self.info else None) or 1000.0) * 10.0
        absurd = not short and time_s > 0 and energy_j / time_s > limit
        if energy_j != energy_j or energy_j < 0 or absurd:
            raise DataError(
                f"window energy {energy_j!r} J over {time_s:.3f} s is impossible for {self.counters} "
                f"(> {limit:.0f} W or negative): the counter was reset or misread; re-run the window"
            )

    @contextlib.contextmanager
    def window(self, name: str = "window") -> Iterator[_Window]:
        """`with meter.window("prefill") as w: ...`; then `w.measurement`. An exception inside discards the window."""
        handle = _Window()
        key = self.begin(name)
        try:
            yield handle
        except BaseException:
            self._zeus.end_window(key, sync_execution=False, cancel=True)
            raise
        handle._measurement = self.end(key, _stacklevel=4)  # point the warning at the `with` block

    def idle_baseline(self, duration_s: float) -> IdleBaseline:
        """Idle power: a window of `duration_s` with nothing launched (after a CUDA synchronise)."""
        if duration_s <= 0:
            raise ConfigError(f"idle duration_s={duration_s!r} is invalid: use a value > 0 (e.g. energy.idle_s=1)")
        with self.window("idle") as w:
            time.sleep(duration_s)
        m = w.measurement
        return IdleBaseline(power_w=m.mean_power_w, measurement=m)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _driver() -> Optional[str]:
    """The NVIDIA driver's version (zeus does not report it); None where NVML cannot say."""
    try:
        import pynvml

        return _text(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 - an AMD GPU, or NVML without the call
        return None


def _power_limit_w(gpus, index: int) -> Optional[float]:
    try:
        return gpus.get_power_management_limit(index) / 1000.0
    except Exception:  # noqa: BLE001 - not every GPU reports it
        return None
