"""The energy meter over zeus: NVML mocked with autospec, RAPL through a fake powercap tree (tests/fake_counters.py).

Joules are the counters' differences, a RAPL wraparound is unwrapped, and a counter that is missing or
unreadable gives "unavailable" with its reason, never 0.
"""

from __future__ import annotations

import builtins
import contextlib
import time
import warnings
from unittest import mock

import pynvml
import pytest
from fake_counters import DRIVER, GPU_NAME, MAX_ENERGY_RANGE_UJ, Powercap, fake_nvml, fake_rapl
from metabolic.core.errors import ConfigError, DataError
from metabolic.energy.meter import EnergyMeter, ShortWindowWarning, missing_text

NO_LIBRARY = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND


@contextlib.contextmanager
def zeus_clock(*instants: float):
    """zeus stamps each window edge with time.time(): these instants, in order."""
    with mock.patch("zeus.monitor.energy.time", side_effect=list(instants)):
        yield


# --- GPU (NVML) ------------------------------------------------------------------------------------


def test_gpu_counter_difference_and_metadata(tmp_path):
    syncs = []
    with fake_rapl(None, tmp_path), fake_nvml([1_000_000, 1_250_500]), zeus_clock(10.0, 11.5):
        meter = EnergyMeter(sync=lambda: syncs.append("sync"))
        with meter.window("prefill") as w:
            assert len(syncs) == 1  # synchronised before the start edge was read
    r = w.measurement
    assert syncs == ["sync", "sync"]
    assert meter.source == "counter" and meter.device == "cuda" and r.available
    assert r.energy_j == r.gpu_j == pytest.approx(250.5, abs=1e-12)  # (1,250,500 - 1,000,000) mJ
    assert r.time_s == pytest.approx(1.5) and r.mean_power_w == pytest.approx(167.0)
    assert r.resolution_j == pytest.approx(0.1 * 167.0)  # each edge up to one 100 ms update old
    assert (r.gpu_name, r.driver, r.power_limit_w, r.short_window) == (GPU_NAME, DRIVER, 700.0, False)
    # the CPU's counters are not exposed here: named with the reason, never 0
    assert r.cpu_package_j is None and r.dram_j is None
    assert r.reason.startswith("cpu package + dram: RAPL not exposed: no ") and meter.reason == ""
    assert meter.counters == f"GPU 0 ({GPU_NAME}, NVML energy counter)"


def test_gpu_counter_reset_is_rejected(tmp_path):
    # A driver reload resets the counter: the window reads a negative energy.
    with fake_rapl(None, tmp_path), fake_nvml([9_000_000, 10]), zeus_clock(0.0, 1.0):
        meter = EnergyMeter(sync=None)
        with pytest.raises(DataError, match="counter was reset or misread"):
            with meter.window():
                pass


def test_short_window_warns_and_is_flagged(tmp_path):
    with fake_rapl(None, tmp_path), fake_nvml([1000, 1000]), zeus_clock(0.0, 0.02):
        meter = EnergyMeter(sync=None, counter_period_s=0.1)
        with pytest.warns(ShortWindowWarning, match="20.0 ms is shorter than the counter update period") as caught:
            with meter.window() as w:
                pass
    assert [c.category for c in caught] == [ShortWindowWarning]  # zeus's own zero-energy warning is replaced
    assert w.measurement.short_window and w.measurement.energy_j == 0.0


def test_long_window_does_not_warn(tmp_path):
    with fake_rapl(None, tmp_path), fake_nvml([0, 100_000]), zeus_clock(0.0, 0.5):
        meter = EnergyMeter(sync=None, counter_period_s=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with meter.window() as w:
                pass
    assert not w.measurement.short_window and w.measurement.energy_j == pytest.approx(100.0)


def test_configurable_update_period(tmp_path):
    with fake_rapl(None, tmp_path), fake_nvml([0, 100_000]), zeus_clock(0.0, 0.5):
        meter = EnergyMeter(sync=None, counter_period_s=1.0)
        with pytest.warns(ShortWindowWarning):
            with meter.window():
                pass


def test_gpu_without_counter_is_polled_by_zeus(tmp_path):
    """A pre-Volta GPU: zeus integrates polled power (its PowerMonitor, a process of its own, replaced here)."""
    with fake_rapl(None, tmp_path), fake_nvml([], architecture=pynvml.NVML_DEVICE_ARCH_PASCAL), zeus_clock(0.0, 2.0), \
            mock.patch("zeus.monitor.energy.PowerMonitor", autospec=True) as monitor:
        monitor.return_value.get_energy.return_value = {0: 84.0}
        monitor.return_value.gpu_indices = [0]
        meter = EnergyMeter(sync=None)
        with meter.window() as w:
            pass
    assert meter.source == "polling" and not meter.info.counter_supported
    monitor.assert_called_once_with(gpu_indices=[0], update_period=None)
    assert w.measurement.source == "polling" and w.measurement.energy_j == 84.0 and w.measurement.mean_power_w == 42.0


def test_no_gpu_and_no_rapl_is_unavailable_with_reasons_not_zero(tmp_path):
    syncs = []
    with fake_rapl(None, tmp_path), fake_nvml(init_error=NO_LIBRARY):
        meter = EnergyMeter(sync=lambda: syncs.append(1))
        with meter.window() as w:
            time.sleep(0.01)
    r = w.measurement
    assert not meter.available and meter.source == "unavailable" and meter.device == "cpu"
    assert r.source == "unavailable" and not r.available
    assert (r.energy_j, r.gpu_j, r.cpu_package_j, r.dram_j, r.mean_power_w, r.resolution_j) == (None,) * 6
    assert 0.01 <= r.time_s < 1.0 and syncs == [1, 1]
    gpu, cpu = r.reason.split("; ")
    assert gpu.startswith("gpu: no GPU energy counter (") and cpu.startswith("cpu package + dram: RAPL not exposed")
    assert meter.reason == cpu  # the measured device (the CPU here) is the one that makes it unavailable
    assert meter.counters == "none"


def test_gpu_requested_where_there_is_none(tmp_path):
    with fake_rapl(None, tmp_path), fake_nvml(count=0):
        meter = EnergyMeter(device="cuda", sync=None)
    assert not meter.available and meter.reason == "gpu: GPU index 0 requested but zeus sees 0 GPU(s)"


def test_idle_baseline_and_active_energy(tmp_path):
    with fake_rapl(None, tmp_path), fake_nvml([0, 140_000, 200_000, 600_000]), zeus_clock(0.0, 2.0, 10.0, 12.0):
        meter = EnergyMeter(sync=None)
        with mock.patch("metabolic.energy.meter.time.sleep", autospec=True):
            base = meter.idle_baseline(2.0)
        with meter.window() as w:
            pass
    assert base.power_w == pytest.approx(70.0) and base.resolution_w == pytest.approx(0.1 * 70.0 / 2.0)
    m = w.measurement
    assert base.active_energy_j(m.energy_j, m.time_s) == pytest.approx(400.0 - 140.0)


def test_unavailable_idle_baseline_has_no_power(tmp_path):
    with fake_rapl(None, tmp_path), fake_nvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
        base = EnergyMeter(sync=None).idle_baseline(0.01)
    assert base.power_w is None and base.active_energy_j(1.0, 1.0) is None


def test_exception_inside_window_discards_it(tmp_path):
    with fake_rapl(None, tmp_path), fake_nvml([0, 5]):
        meter = EnergyMeter(sync=None)
        with pytest.raises(RuntimeError, match="boom"):
            with meter.window():
                raise RuntimeError("boom")
        assert meter._zeus.measurement_states == {}
        with pytest.raises(ValueError, match="is not open"):
            meter.end("window#0")


def test_measurement_is_frozen_and_unreadable_while_open(tmp_path):
    with fake_rapl(None, tmp_path), fake_nvml([0, 1000]), zeus_clock(0.0, 1.0):
        meter = EnergyMeter(sync=None)
        with meter.window() as w:
            with pytest.raises(RuntimeError, match="still open"):
                w.measurement
    with pytest.raises(Exception):
        w.measurement.energy_j = 0.0  # frozen dataclass


def test_bad_meter_settings():
    with pytest.raises(ConfigError, match="counter_period_s=0 is invalid"):
        EnergyMeter(counter_period_s=0)
    with pytest.raises(ConfigError, match="device='tpu' is invalid"):
        EnergyMeter(device="tpu")


# --- CPU package and DRAM (RAPL) ----------------------------------------------------------------------

# With RAPL the meter opens and cancels one zeus window at start-up (zeus starts its wraparound watchers at
# a file's first read): that read's instant (and GPU counter read) comes first.
STARTUP = -1.0


def test_rapl_joules_are_the_counter_differences_over_packages_and_dram(tmp_path):
    cap = Powercap(tmp_path, packages=2)
    for p, start in enumerate((5_000_000, 9_000_000)):
        cap.set(cap.package(p), start)
        cap.set(cap.dram(p), 1_000_000 * (p + 1))
    with fake_rapl(cap, tmp_path) as trackers, fake_nvml(init_error=NO_LIBRARY), zeus_clock(STARTUP, 0.0, 0.5):
        meter = EnergyMeter(sync=None)
        assert len(trackers) == 4  # zeus's watchers started with the meter, not inside the first window
        with meter.window("full") as w:
            cap.set(cap.package(0), 7_500_000)  # +2.5 J
            cap.set(cap.package(1), 9_250_000)  # +0.25 J
            cap.set(cap.dram(0), 1_400_000)  # +0.4 J
            cap.set(cap.dram(1), 2_100_000)  # +0.1 J
    r = w.measurement
    assert meter.source == r.source == "rapl" and meter.device == "cpu" and meter.counters == "CPU package + DRAM (RAPL)"
    assert r.cpu_package_j == pytest.approx(2.75, abs=1e-12) and r.dram_j == pytest.approx(0.5, abs=1e-12)
    assert r.energy_j == pytest.approx(3.25, abs=1e-12) and r.gpu_j is None
    assert r.resolution_j == pytest.approx(0.001 * 3.25 / 0.5)  # RAPL updates every ~1 ms
    assert r.reason.startswith("gpu: no GPU energy counter (")
    # zeus's wraparound tracker watches each counter file with its range
    assert sorted(trackers) == sorted(str(p) for p in (cap.package(0), cap.package(1), cap.dram(0), cap.dram(1)))
    assert {m for _, m in trackers.values()} == {MAX_ENERGY_RANGE_UJ}


def test_rapl_wraparound_is_unwrapped(tmp_path):
    cap = Powercap(tmp_path, dram=False)
    cap.set(cap.package(0), MAX_ENERGY_RANGE_UJ - 400_000)
    with fake_rapl(cap, tmp_path), fake_nvml(init_error=NO_LIBRARY), zeus_clock(STARTUP, 0.0, 1.0):
        meter = EnergyMeter(sync=None)
        with meter.window() as w:
            cap.set(cap.package(0), 600_000)  # past the counter's range ...
            cap.wraps[str(cap.package(0))] = 1  # ... which zeus's tracker saw
    assert w.measurement.energy_j == pytest.approx(1.0, abs=1e-9)  # 0.4 J + 0.6 J across the wrap


def test_rapl_without_dram_zone_measures_the_package_and_names_dram(tmp_path):
    cap = Powercap(tmp_path, dram=False)
    with fake_rapl(cap, tmp_path), fake_nvml(init_error=NO_LIBRARY), zeus_clock(STARTUP, 0.0, 1.0):
        meter = EnergyMeter(sync=None)
        with meter.window() as w:
            cap.set(cap.package(0), 12_000_000)
    r = w.measurement
    assert r.energy_j == r.cpu_package_j == pytest.approx(12.0) and r.dram_j is None
    assert meter.counters == "CPU package (RAPL)" and "dram: RAPL exposes no dram zone for package(s) 0" in r.reason


def test_unreadable_rapl_is_unavailable_with_reason(tmp_path):
    """energy_uj is root-only on Linux >= 5.10: zeus cannot open it (tests run as root too, so open is refused here)."""
    cap = Powercap(tmp_path)

    def refuse(path, *args, **kwargs):
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    with fake_rapl(cap, tmp_path), fake_nvml(init_error=NO_LIBRARY), \
            mock.patch("zeus.device.cpu.rapl.open", side_effect=refuse, create=True):
        meter = EnergyMeter(sync=None)
        with meter.window() as w:
            pass
    r = w.measurement
    assert r.source == "unavailable" and r.energy_j is None and r.cpu_package_j is None and r.dram_j is None
    assert meter.reason == (f"cpu package + dram: RAPL counters under {cap.dir} are not readable by this user (root only "
                            f"on Linux >= 5.10): sudo chmod a+r {cap.dir}/intel-rapl:*/energy_uj, or run zeusd")


def test_cpu_device_on_a_gpu_machine_measures_rapl_and_keeps_the_gpu(tmp_path):
    cap = Powercap(tmp_path)
    with fake_rapl(cap, tmp_path), fake_nvml([0, 0, 30_000]), zeus_clock(STARTUP, 0.0, 1.0):
        meter = EnergyMeter(device="cpu", sync=None)
        with meter.window() as w:
            cap.set(cap.package(0), 20_000_000)
            cap.set(cap.dram(0), 3_000_000)
    r = w.measurement
    assert meter.source == "rapl" and meter.info is None
    assert (r.energy_j, r.cpu_package_j, r.dram_j, r.gpu_j) == pytest.approx((23.0, 20.0, 3.0, 30.0))
    assert r.reason == ""


def test_missing_text_groups_counters_by_reason():
    assert missing_text({}) == ""
    assert missing_text({"dram": "no zone", "gpu": "no driver"}) == "gpu: no driver; dram: no zone"


def test_benchmark_exits_cleanly_without_gpu(capsys, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "energy_meter.py"
    spec = importlib.util.spec_from_file_location("energy_meter_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with fake_rapl(None, tmp_path), fake_nvml(init_error=NO_LIBRARY):
        assert bench.main([]) == 0
    assert "no GPU energy meter on this machine" in capsys.readouterr().out


def test_benchmark_checks_the_adapter_against_a_bare_zeus_monitor(tmp_path):
    """benchmarks/energy_meter.py's agreement part on a fake 100 W GPU: the adapter's window and a bare
    ZeusMonitor's nested in it (or around it) read the same counter, so they agree to within the nesting."""
    import importlib.util
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "energy_meter.py"
    spec = importlib.util.spec_from_file_location("energy_meter_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    t0 = time.perf_counter()
    with fake_rapl(None, tmp_path), fake_nvml(lambda h: int(100_000 * (time.perf_counter() - t0))), \
            mock.patch.object(torch.cuda, "synchronize", autospec=True), \
            mock.patch("zeus.monitor.energy.sync_execution_fn", autospec=True), \
            mock.patch.object(bench, "_workload", autospec=True, return_value=(lambda: time.sleep(0.3), 1)):
        rows = bench.agreement([0.3], 2, 0)
    assert [r["source"] for r in rows] == ["counter", "counter"]
    for r in rows:
        assert r["adapter_j"] == pytest.approx(100.0 * r["window_s"], rel=0.05)  # 100 W over the window
        assert r["agreement_pct"] < 5.0  # the outer window is wider by the inner one's edges only
