"""GPU energy meter: measurement windows over NVML (nvidia-ml-py), in the style of zeus's ZeusMonitor.

    meter = EnergyMeter()
    with meter.window() as win:
        run_queries()
    m = win.measurement          # frozen Measurement: energy_j, time_s, source, gpu_name, driver, ...

Two ways to read energy, chosen per GPU when the meter opens:

* ``"counter"``: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded; Volta and
  newer). A window is the difference of two reads. The counter moves in steps of about 100 ms
  (``counter_period_s``), so a shorter window reads zero or noise: it is flagged and warned about.
  The counter is an unsigned 64-bit integer; a wrap between two reads is unwrapped.
* ``"polling"``: a background thread samples ``nvmlDeviceGetPowerUsage`` (mW) every
  ``poll_interval_s``; a window integrates the samples inside it (trapezoidal rule), with one sample
  taken synchronously at each edge so the integral covers the whole window.

CUDA work is asynchronous, so ``torch.cuda.synchronize`` runs before each edge is read: the window
holds all and only the kernels launched inside it.

Without a GPU (no NVML library, no driver, no device) the meter is ``available=False`` and every
window returns ``source="unavailable"`` with ``energy_j=None`` and the reason. It never returns a
zero that could be mistaken for a measurement.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional

from metabolic.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Source = Literal["counter", "polling", "unavailable"]
COUNTER_MODULUS = 2**64  # nvmlDeviceGetTotalEnergyConsumption returns an unsigned long long (mJ)


class ShortWindowWarning(UserWarning):
    """A window shorter than the energy counter's update period: its energy is mostly noise."""


@dataclass(frozen=True)
class Measurement:
    """One measurement window. ``energy_j`` is None when no energy could be measured (``source="unavailable"``)."""

    energy_j: Optional[float]
    time_s: float
    source: Source
    gpu_index: Optional[int] = None
    gpu_name: Optional[str] = None
    driver: Optional[str] = None
    power_limit_w: Optional[float] = None
    n_samples: int = 0  # counter reads (2) or power samples integrated
    short_window: bool = False  # time_s < the counter's update period: energy_j is unreliable
    reason: str = ""  # why energy is unavailable ("" when measured)
    # How far energy_j can be off: each edge reads a value up to one update period (counter) or one
    # sampling interval (polling) old, so the error is below that period x the window's mean power.
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
    driver: str
    power_limit_w: Optional[float]
    counter_supported: bool


@dataclass(frozen=True)
class IdleBaseline:
    """Idle power of the GPU, measured over a window with nothing running."""

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
        """What the idle GPU draws in `time_s` seconds (None without an idle power)."""
        return idle_energy_j(self.power_w, time_s)

    def active_energy_j(self, energy_j: Optional[float], time_s: float) -> Optional[float]:
        """Energy above idle over `time_s` seconds (see `active_energy_j`)."""
        return active_energy_j(energy_j, self.power_w, time_s)


def idle_energy_j(idle_power_w: Optional[float], time_s: float) -> Optional[float]:
    """What the idle GPU draws in `time_s` seconds (None without an idle power)."""
    return None if idle_power_w is None else idle_power_w * time_s


def active_energy_j(energy_j: Optional[float], idle_power_w: Optional[float], time_s: float) -> Optional[float]:
    """Energy above idle: energy_j - idle power x time_s (None when either is unavailable).

    >>> active_energy_j(400.0, 140.0, 1.0), active_energy_j(None, 140.0, 1.0)
    (260.0, None)
    """
    idle = idle_energy_j(idle_power_w, time_s)
    return None if energy_j is None or idle is None else energy_j - idle


def counter_delta_mj(start_mj: int, end_mj: int) -> int:
    """Energy between two counter reads in mJ, unwrapping one overflow of the unsigned 64-bit counter."""
    if start_mj < 0 or end_mj < 0:
        raise DataError(f"NVML energy counter read {min(start_mj, end_mj)} mJ < 0: the reading is faulty; re-run the window")
    return end_mj - start_mj if end_mj >= start_mj else end_mj + COUNTER_MODULUS - start_mj


def trapezoid_energy_j(times_s: list[float], powers_w: list[float]) -> float:
    """Integral of power over time by the trapezoidal rule (exact for piecewise-linear power)."""
    if len(times_s) != len(powers_w):
        raise DataError(f"{len(times_s)} sample times for {len(powers_w)} power samples: they must pair up")
    total = 0.0
    for i in range(1, len(times_s)):
        total += 0.5 * (powers_w[i] + powers_w[i - 1]) * (times_s[i] - times_s[i - 1])
    return total


def _cuda_sync() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
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


@dataclass
class _Open:
    t0: float
    counter_mj: Optional[int] = None
    sample_start: int = 0  # index of this window's first power sample


@dataclass
class _Poller:
    """Background power sampling shared by all open polling windows."""

    read_w: Callable[[], float]
    interval_s: float
    clock: Callable[[], float]
    times_s: list[float] = field(default_factory=list)
    powers_w: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: Optional[threading.Thread] = None
    users: int = 0
    error: Optional[BaseException] = None

    def sample(self) -> int:
        """Take one sample now; return its index."""
        p = self.read_w()
        t = self.clock()
        with self.lock:
            self.times_s.append(t)
            self.powers_w.append(p)
            return len(self.times_s) - 1

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - surfaced by the window that ends next
                self.error = exc
                return

    def acquire(self) -> None:
        self.users += 1
        if self.thread is None:
            self.stop.clear()
            self.thread = threading.Thread(target=self._run, name="nvml-power-poll", daemon=True)
            self.thread.start()

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None
            with self.lock:  # no window needs old samples any more
                self.times_s.clear()
                self.powers_w.clear()


class EnergyMeter:
    """Measurement windows on one GPU; `available` is False (with `reason`) when there is none.

    mode: "auto" uses the energy counter when the GPU has it, power polling otherwise; "counter" and
    "polling" force one (forcing "counter" on a GPU without it is a ConfigError).
    """

    def __init__(
        self,
        gpu_index: int = 0,
        counter_period_s: float = 0.1,
        poll_interval_s: float = 0.01,
        mode: Literal["auto", "counter", "polling"] = "auto",
        sync: Optional[Callable[[], None]] = _cuda_sync,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if counter_period_s <= 0 or poll_interval_s <= 0:
            raise ConfigError(
                f"counter_period_s={counter_period_s!r}, poll_interval_s={poll_interval_s!r} are invalid: use values > 0"
            )
        if mode not in ("auto", "counter", "polling"):
            raise ConfigError(f"mode={mode!r} is invalid: choose 'auto', 'counter' or 'polling'")
        self.gpu_index = gpu_index
        self.counter_period_s = counter_period_s
        self.poll_interval_s = poll_interval_s
        self.sync = sync
        self.clock = clock
        self.info: Optional[GPUInfo] = None
        self.reason = ""
        self.source: Source = "unavailable"
        self._handle = None
        self._nvml_open = False
        self._poller: Optional[_Poller] = None
        self._open_windows: dict[int, _Open] = {}
        self._next_id = 0
        self._connect(mode)

    # -- set-up ---------------------------------------------------------------------------
    def _connect(self, mode: str) -> None:
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.reason = f"NVML could not start ({exc}): no NVIDIA driver/GPU on this machine"
            return
        self._nvml_open = True
        try:
            count = pynvml.nvmlDeviceGetCount()
            if self.gpu_index >= count:
                self.reason = f"GPU index {self.gpu_index} requested but NVML sees {count} GPU(s)"
                self.close()
                return
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
            try:
                limit_w: Optional[float] = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
            except pynvml.NVMLError:
                limit_w = None
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                counter = True
            except pynvml.NVMLError:
                counter = False
        except pynvml.NVMLError as exc:
            self.reason = f"NVML query failed ({exc})"
            self.close()
            return
        if mode == "counter" and not counter:
            self.close()
            raise ConfigError(f"mode='counter' but {name} has no energy counter: use mode='auto' or 'polling'")
        self._handle = handle
        self.info = GPUInfo(self.gpu_index, name, driver, limit_w, counter)
        self.source = "counter" if counter and mode != "polling" else "polling"
        if self.source == "polling":
            self._poller = _Poller(self._read_power_w, self.poll_interval_s, self.clock)
        log.info("energy meter on GPU %d (%s, driver %s): %s", self.gpu_index, name, driver, self.source)

    @property
    def available(self) -> bool:
        return self.info is not None

    def _read_power_w(self) -> float:
        import pynvml

        return pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def _read_counter_mj(self) -> int:
        import pynvml

        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def close(self) -> None:
        """Stop polling and release NVML (windows still open are abandoned)."""
        if self._poller is not None and self._poller.thread is not None:
            self._poller.users = 1
            self._poller.release()
        if self._nvml_open:
            import pynvml

            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()
            self._nvml_open = False

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- windows --------------------------------------------------------------------------
    def begin(self) -> int:
        """Open a window (after synchronising CUDA); return its id for `end`."""
        if self.sync is not None:
            self.sync()
        wid = self._next_id
        self._next_id += 1
        state = _Open(t0=self.clock())
        if self.source == "counter":
            state.counter_mj = self._read_counter_mj()
        elif self.source == "polling":
            self._poller.acquire()
            state.sample_start = self._poller.sample()
            state.t0 = self._poller.times_s[state.sample_start]
        self._open_windows[wid] = state
        return wid

    def end(self, wid: int, _stacklevel: int = 2) -> Measurement:
        """Close window `wid` (after synchronising CUDA) and return its measurement."""
        if wid not in self._open_windows:
            raise ValueError(f"window {wid} is not open")
        if self.sync is not None:
            self.sync()
        state = self._open_windows.pop(wid)
        if self.source == "unavailable":
            t1 = self.clock()
            return Measurement(energy_j=None, time_s=t1 - state.t0, source="unavailable", reason=self.reason)
        if self.source == "counter":
            end_mj = self._read_counter_mj()
            t1 = self.clock()
            energy_j = counter_delta_mj(state.counter_mj, end_mj) / 1000.0
            n_samples = 2
        else:
            poller = self._poller
            try:
                last = poller.sample()
                with poller.lock:
                    times = poller.times_s[state.sample_start : last + 1]
                    powers = poller.powers_w[state.sample_start : last + 1]
                error = poller.error
            finally:
                poller.release()
            if error is not None:
                raise DataError(f"power polling failed during the window ({error}): re-run it")
            t1 = times[-1]
            energy_j = trapezoid_energy_j(times, powers)
            n_samples = len(times)
        time_s = t1 - state.t0
        short = time_s < self.counter_period_s
        if short:
            warnings.warn(
                f"energy window of {time_s * 1000:.1f} ms is shorter than the counter update period "
                f"({self.counter_period_s * 1000:.0f} ms): put more queries in the window or repeat them",
                ShortWindowWarning,
                stacklevel=_stacklevel,
            )
        self._check(energy_j, time_s, short)
        info = self.info
        period_s = self.counter_period_s if self.source == "counter" else self.poll_interval_s
        # mean power over at least one period, so a short window's single counter step does not inflate it
        resolution_j = period_s * energy_j / max(time_s, period_s)
        return Measurement(
            energy_j=energy_j, time_s=time_s, source=self.source, gpu_index=info.index, gpu_name=info.name,
            driver=info.driver, power_limit_w=info.power_limit_w, n_samples=n_samples, short_window=short,
            resolution_j=resolution_j,
        )

    def _check(self, energy_j: float, time_s: float, short: bool) -> None:
        # A counter reset (driver reload) looks like a wrap and yields an absurd energy: reject it.
        # Short windows are exempt from the power bound: one ~100 ms counter step in a 5 ms window
        # looks like kilowatts, which is what the short-window warning is for.
        limit = (self.info.power_limit_w or 1000.0) * 10.0
        absurd = not short and time_s > 0 and energy_j / time_s > limit
        if energy_j != energy_j or energy_j < 0 or absurd:
            raise DataError(
                f"window energy {energy_j!r} J over {time_s:.3f} s is impossible for {self.info.name} "
                f"(> {limit:.0f} W or negative): the counter was reset or misread; re-run the window"
            )

    @contextlib.contextmanager
    def window(self) -> Iterator[_Window]:
        """`with meter.window() as w: ...`; then `w.measurement`. An exception inside discards the window."""
        handle = _Window()
        wid = self.begin()
        try:
            yield handle
        except BaseException:
            self._abandon(wid)
            raise
        handle._measurement = self.end(wid, _stacklevel=4)  # point the warning at the `with` block

    def _abandon(self, wid: int) -> None:
        self._open_windows.pop(wid, None)
        if self.source == "polling":
            self._poller.release()

    def idle_baseline(self, duration_s: float) -> IdleBaseline:
        """Idle power: a window of `duration_s` with nothing launched (after a CUDA synchronise)."""
        if duration_s <= 0:
            raise ConfigError(f"idle duration_s={duration_s!r} is invalid: use a value > 0 (e.g. energy.idle_s=1)")
        with self.window() as w:
            time.sleep(duration_s)
        m = w.measurement
        return IdleBaseline(power_w=m.mean_power_w, measurement=m)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
