"""The energy meter with NVML mocked (autospec): counter and polling paths, wrap, short windows, no GPU."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from unittest import mock

import pynvml
import pytest
from hypothesis import given
from hypothesis import strategies as st
from metabolic.core.errors import ConfigError, DataError
from metabolic.energy.meter import (
    COUNTER_MODULUS,
    EnergyMeter,
    ShortWindowWarning,
    counter_delta_mj,
    trapezoid_energy_j,
)

HANDLE = object()


class FakeClock:
    """A clock that returns the given instants in order (the meter reads it at each window edge)."""

    def __init__(self, *instants: float) -> None:
        self.instants = list(instants)

    def __call__(self) -> float:
        return self.instants.pop(0)


@contextlib.contextmanager
def fake_nvml(counter_mj=None, power_mw=None, counter_supported=True, count=1, power_limit_mw=700_000):
    """Patch the pynvml functions the meter calls, with autospec so signatures are enforced.

    counter_mj: list of successive counter reads (the first is the support probe at start-up).
    power_mw: callable(handle) -> mW for the power samples.
    """
    counter = list(counter_mj or [])

    def energy(handle):
        assert handle is HANDLE
        if not counter_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return counter.pop(0)

    patches = {
        "nvmlInit": dict(return_value=None),
        "nvmlShutdown": dict(return_value=None),
        "nvmlDeviceGetCount": dict(return_value=count),
        "nvmlDeviceGetHandleByIndex": dict(return_value=HANDLE),
        "nvmlDeviceGetName": dict(return_value="NVIDIA H100 80GB HBM3"),
        "nvmlSystemGetDriverVersion": dict(return_value="550.54.15"),
        "nvmlDeviceGetEnforcedPowerLimit": dict(return_value=power_limit_mw),
        "nvmlDeviceGetTotalEnergyConsumption": dict(side_effect=energy),
        "nvmlDeviceGetPowerUsage": dict(side_effect=power_mw or (lambda h: 100_000)),
    }
    with contextlib.ExitStack() as stack:
        mocks = {name: stack.enter_context(mock.patch.object(pynvml, name, autospec=True, **kw)) for name, kw in patches.items()}
        yield mocks


def test_counter_path_reads_difference_and_metadata():
    syncs = []
    with fake_nvml(counter_mj=[5_000, 1_000_000, 1_250_500]) as m:
        meter = EnergyMeter(sync=lambda: syncs.append("sync"), clock=FakeClock(10.0, 11.5))
        with meter.window() as w:
            assert len(syncs) == 1  # synchronised before the start edge was read
        meter.close()
        m["nvmlShutdown"].assert_called_once_with()
    r = w.measurement
    assert syncs == ["sync", "sync"]
    assert r.source == "counter" and r.available
    assert r.energy_j == pytest.approx(250.5, abs=1e-12)
    assert r.time_s == pytest.approx(1.5)
    assert r.mean_power_w == pytest.approx(167.0)
    assert r.resolution_j == pytest.approx(0.1 * 167.0)  # each edge up to one 100 ms update old
    assert (r.gpu_name, r.driver, r.power_limit_w, r.n_samples, r.short_window) == (
        "NVIDIA H100 80GB HBM3", "550.54.15", 700.0, 2, False)


def test_counter_wrap_is_unwrapped():
    start = COUNTER_MODULUS - 400
    with fake_nvml(counter_mj=[0, start, 600]):
        meter = EnergyMeter(sync=None, clock=FakeClock(0.0, 2.0))
        with meter.window() as w:
            pass
    assert w.measurement.energy_j == pytest.approx(1.0)  # 400 + 600 mJ across the wrap


@given(st.integers(0, COUNTER_MODULUS - 1), st.integers(0, 10**12))
def test_counter_delta_property(start, delta):
    end = (start + delta) % COUNTER_MODULUS
    assert counter_delta_mj(start, end) == delta


def test_counter_reset_is_rejected():
    # A driver reload resets the counter: the "wrap" would be ~1.8e16 J in 1 s, far above any GPU.
    with fake_nvml(counter_mj=[0, 9_000_000, 10]):
        meter = EnergyMeter(sync=None, clock=FakeClock(0.0, 1.0))
        with pytest.raises(DataError, match="counter was reset"):
            with meter.window():
                pass


def test_short_window_warns_and_is_flagged():
    with fake_nvml(counter_mj=[0, 1000, 1000]):
        meter = EnergyMeter(sync=None, counter_period_s=0.1, clock=FakeClock(0.0, 0.02))
        with pytest.warns(ShortWindowWarning, match="20.0 ms is shorter than the counter update period"):
            with meter.window() as w:
                pass
    assert w.measurement.short_window and w.measurement.energy_j == 0.0


def test_long_window_does_not_warn():
    with fake_nvml(counter_mj=[0, 0, 100_000]):
        meter = EnergyMeter(sync=None, counter_period_s=0.1, clock=FakeClock(0.0, 0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with meter.window() as w:
                pass
    assert not w.measurement.short_window


def test_configurable_update_period():
    with fake_nvml(counter_mj=[0, 0, 100_000]):
        meter = EnergyMeter(sync=None, counter_period_s=1.0, clock=FakeClock(0.0, 0.5))
        with pytest.warns(ShortWindowWarning):
            with meter.window():
                pass


def test_polling_path_constant_power_is_exact():
    with fake_nvml(counter_supported=False, power_mw=lambda h: 250_000) as m:
        meter = EnergyMeter(sync=None, poll_interval_s=0.005)
        assert meter.source == "polling" and not meter.info.counter_supported
        with meter.window() as w:
            time.sleep(0.12)
        meter.close()
    r = w.measurement
    assert r.source == "polling"
    assert r.n_samples >= 3  # both edges plus background samples
    assert r.energy_j == pytest.approx(250.0 * r.time_s, rel=1e-12)
    assert 0.12 <= r.time_s < 1.0
    assert m["nvmlDeviceGetPowerUsage"].call_count >= r.n_samples


def test_polling_path_integrates_a_ramp():
    t0 = time.perf_counter()
    # Power rises linearly with time: 100 W + 1000 W/s; the trapezoidal integral of a line is exact
    # up to the delay between reading the power and stamping the sample (bounded below).
    with fake_nvml(counter_supported=False, power_mw=lambda h: int(1000 * (100 + 1000 * (time.perf_counter() - t0)))):
        meter = EnergyMeter(sync=None, poll_interval_s=0.002)
        with meter.window() as w:
            time.sleep(0.1)
    r = w.measurement
    p_start = 100 + 1000 * 0.0
    expected_lo = (p_start) * r.time_s
    expected_hi = (100 + 1000 * (r.time_s + 0.05)) * r.time_s
    assert expected_lo < r.energy_j < expected_hi
    # the mean power sits between the first and last instantaneous powers
    assert 100 < r.mean_power_w < 100 + 1000 * (r.time_s + 0.05)


def test_forced_polling_on_counter_gpu():
    with fake_nvml(counter_mj=[0], power_mw=lambda h: 50_000):
        meter = EnergyMeter(sync=None, mode="polling", poll_interval_s=0.005)
        with meter.window() as w:
            time.sleep(0.11)
    assert w.measurement.source == "polling" and w.measurement.energy_j == pytest.approx(50 * w.measurement.time_s)


def test_forced_counter_without_counter_is_config_error():
    with fake_nvml(counter_supported=False):
        with pytest.raises(ConfigError, match="has no energy counter"):
            EnergyMeter(sync=None, mode="counter")


def test_missing_nvml_library_is_unavailable_not_zero():
    with mock.patch.object(pynvml, "nvmlInit", autospec=True,
                           side_effect=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)):
        syncs = []
        meter = EnergyMeter(sync=lambda: syncs.append(1))
        with meter.window() as w:
            time.sleep(0.01)
    r = w.measurement
    assert not meter.available and meter.source == "unavailable"
    assert r.source == "unavailable" and not r.available
    assert r.energy_j is None and r.mean_power_w is None
    assert r.time_s >= 0.01
    assert "NVML could not start" in r.reason
    assert syncs == [1, 1]


def test_no_gpu_device_is_unavailable():
    with fake_nvml(count=0):
        meter = EnergyMeter(sync=None)
    assert not meter.available and "NVML sees 0 GPU(s)" in meter.reason


def test_unavailable_idle_baseline_has_no_power():
    with mock.patch.object(pynvml, "nvmlInit", autospec=True, side_effect=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)):
        meter = EnergyMeter(sync=None)
        base = meter.idle_baseline(0.01)
    assert base.power_w is None and base.active_energy_j(1.0, 1.0) is None


def test_idle_baseline_and_active_energy():
    with fake_nvml(counter_mj=[0, 0, 140_000, 200_000, 600_000]):
        meter = EnergyMeter(sync=None, clock=FakeClock(0.0, 2.0, 10.0, 12.0))
        with mock.patch("metabolic.energy.meter.time.sleep", autospec=True):
            base = meter.idle_baseline(2.0)
        with meter.window() as w:
            pass
    assert base.power_w == pytest.approx(70.0) and base.resolution_w == pytest.approx(0.1 * 70.0 / 2.0)
    m = w.measurement
    assert base.active_energy_j(m.energy_j, m.time_s) == pytest.approx(400.0 - 140.0)


def test_exception_inside_window_discards_it():
    with fake_nvml(counter_supported=False, power_mw=lambda h: 1000):
        meter = EnergyMeter(sync=None, poll_interval_s=0.005)
        with pytest.raises(RuntimeError, match="boom"):
            with meter.window():
                raise RuntimeError("boom")
        assert meter._poller.thread is None  # polling stopped with the last window


def test_measurement_is_frozen_and_unreadable_while_open():
    with fake_nvml(counter_mj=[0, 0, 1000]):
        meter = EnergyMeter(sync=None, clock=FakeClock(0.0, 1.0))
        with meter.window() as w:
            with pytest.raises(RuntimeError, match="still open"):
                w.measurement
    with pytest.raises(Exception):
        w.measurement.energy_j = 0.0  # frozen dataclass


def test_bad_meter_settings():
    with pytest.raises(ConfigError, match="counter_period_s"):
        EnergyMeter(counter_period_s=0)
    with pytest.raises(ConfigError, match="mode="):
        EnergyMeter(mode="rapl")


@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=2, max_size=30), st.floats(0, 800, allow_nan=False),
       st.floats(-5, 5, allow_nan=False))
def test_trapezoid_is_exact_for_lines(gaps, p0, slope):
    times = [0.0]
    for g in gaps[1:]:
        times.append(times[-1] + g / 1000)
    powers = [p0 + slope * t for t in times]
    exact = p0 * times[-1] + 0.5 * slope * times[-1] ** 2
    assert trapezoid_energy_j(times, powers[: len(times)]) == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_trapezoid_rejects_unpaired():
    with pytest.raises(DataError, match="must pair up"):
        trapezoid_energy_j([0.0, 1.0], [1.0])
    assert math.isclose(trapezoid_energy_j([0.0], [5.0]), 0.0)


def test_benchmark_exits_cleanly_without_gpu(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "energy_meter.py"
    spec = importlib.util.spec_from_file_location("energy_meter_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with mock.patch.object(pynvml, "nvmlInit", autospec=True, side_effect=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)):
        assert bench.main([]) == 0
    assert "no GPU energy meter on this machine" in capsys.readouterr().out
