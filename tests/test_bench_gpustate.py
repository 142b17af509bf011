"""The card-state sampler (NVML faked, no GPU): summaries, the background thread, the runner's
rows, the report's clock note, and graceful degradation without NVML."""

from __future__ import annotations

import ctypes
import itertools
import time

import pytest
import torch
from test_bench_report import fake_result
from test_bench_runner import CPU, FakeTimer, RefProvider, _case

from flashcore.bench import gpustate, report
from flashcore.bench.gpustate import GpuSample, GpuStateSampler, summarize_samples
from flashcore.bench.runner import BenchResult, Row, run_bench


def test_summary_of_samples():
    s = summarize_samples([
        GpuSample(1980, 300.0, 50, 0x0),
        GpuSample(1755, 690.5, 61, 0x4),  # sw power cap
        GpuSample(1830, None, None, 0x4 | 0x20),  # a read without power/temperature
        GpuSample(None, 650.0, 58, None),
    ])
    assert s["samples"] == 4
    assert s["sm_clock_mhz"] == {"median": 1830, "min": 1755, "max": 1980}
    assert s["power_w"] == {"median": 650.0, "max": 690.5}
    assert s["temp_c_max"] == 61
    assert s["clock_reasons"] == ["sw_power_cap", "sw_thermal"]
    assert summarize_samples([]) is None
    assert "sm_clock_mhz" not in summarize_samples([GpuSample(None, None, None, None)])


def test_sampler_reads_while_the_block_runs():
    n = itertools.count()
    sampler = GpuStateSampler(lambda: GpuSample(1000 + next(n), 1.0, 40, 0), period_s=0.005)
    with sampler.sampling() as samples:
        time.sleep(0.1)
    # One read at entry, one at exit, and the thread's in between.
    assert len(samples) >= 5
    clocks = [s.sm_clock_mhz for s in samples]
    assert clocks == sorted(clocks)


def test_sampler_survives_a_failing_reader_and_no_reader():
    def bad():
        raise OSError("NVML went away")

    with GpuStateSampler(bad, period_s=0.005).sampling() as samples:
        time.sleep(0.02)
    assert samples == []
    with GpuStateSampler(None).sampling() as samples:
        pass
    assert samples == []
    with pytest.raises(ValueError, match="period_s"):
        GpuStateSampler(None, period_s=0)


class FakeProps:
    uuid = "1234abcd-0000-1111-2222-333344445555"
    pci_domain_id, pci_bus_id, pci_device_id = 0, 0x17, 0


class FakeNvml:
    """libnvidia-ml's calls as the sampler uses them: return codes, values through byref."""

    def __init__(self, uuid_ok=True, pci_ok=True, count=1):
        self.uuid_ok, self.pci_ok, self.count = uuid_ok, pci_ok, count
        self.lookups = []

    def nvmlInit_v2(self):
        return 0

    def nvmlDeviceGetHandleByUUID(self, uuid, dev):
        self.lookups.append(("uuid", uuid))
        return 0 if self.uuid_ok else 13

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus, dev):
        self.lookups.append(("pci", bus))
        return 0 if self.pci_ok else 13

    def nvmlDeviceGetCount_v2(self, n):
        n._obj.value = self.count
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, i, dev):
        self.lookups.append(("index", i))
        return 0

    def nvmlDeviceGetClockInfo(self, dev, kind, out):
        out._obj.value = 1755 if kind == 1 else 0
        return 0

    def nvmlDeviceGetPowerUsage(self, dev, out):
        out._obj.value = 612_500  # milliwatts
        return 0

    def nvmlDeviceGetTemperature(self, dev, sensor, out):
        return 3  # not supported: no temperature

    def nvmlDeviceGetCurrentClocksEventReasons(self, dev, out):
        out._obj.value = 0x4
        return 0


def _fake_cuda(monkeypatch, lib, n_devices=1):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: lib)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: FakeProps())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_devices)


def test_nvml_reader_finds_the_cuda_device_and_reads_it(monkeypatch):
    lib = FakeNvml()
    _fake_cuda(monkeypatch, lib)
    read = gpustate.nvml_reader(0)
    assert lib.lookups == [("uuid", b"GPU-1234abcd-0000-1111-2222-333344445555")]
    assert read() == GpuSample(1755, 612.5, None, 0x4)
    # No UUID match: the PCI bus id, in NVML's domain:bus:device.function form.
    lib = FakeNvml(uuid_ok=False)
    _fake_cuda(monkeypatch, lib)
    assert gpustate.nvml_reader(0) is not None
    assert lib.lookups[-1] == ("pci", b"00000000:17:00.0")


def test_nvml_reader_uses_an_index_only_for_a_single_gpu(monkeypatch):
    lib = FakeNvml(uuid_ok=False, pci_ok=False)
    _fake_cuda(monkeypatch, lib)
    assert gpustate.nvml_reader(0) is not None and lib.lookups[-1] == ("index", 0)
    # Several GPUs: CUDA's and NVML's orders may differ, so no guess.
    _fake_cuda(monkeypatch, FakeNvml(uuid_ok=False, pci_ok=False, count=2))
    assert gpustate.nvml_reader(0) is None
    _fake_cuda(monkeypatch, FakeNvml(uuid_ok=False, pci_ok=False), n_devices=2)
    assert gpustate.nvml_reader(0) is None


def test_nvml_reader_is_none_without_the_library(monkeypatch):
    def missing(name, *a, **kw):
        raise OSError(f"{name}: cannot open shared object file")

    _fake_cuda(monkeypatch, None)
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert gpustate.nvml_reader(0) is None


def test_rows_carry_the_state_sampled_during_their_timing():
    sampler = GpuStateSampler(lambda: GpuSample(1700, 600.0, 70, 0x4), period_s=0.001)
    res = run_bench([_case()], [RefProvider("sdpa"), RefProvider("fast")],
                    FakeTimer({"sdpa": 20.0, "fast": 10.0}), device=CPU, sampler=sampler)
    for r in res.rows:
        assert r.gpu_state["sm_clock_mhz"]["median"] == 1700
        assert r.gpu_state["clock_reasons"] == ["sw_power_cap"]
        assert Row.from_dict(r.to_dict()).gpu_state == r.gpu_state
    plain = run_bench([_case()], [RefProvider("sdpa")], FakeTimer({"sdpa": 20.0}), device=CPU)
    assert plain.rows[0].gpu_state is None


def test_markdown_reports_the_clock_per_provider():
    res = fake_result()
    assert "SM clock during" not in report.markdown(res)
    for r in res.rows:
        if r.status == "ok":
            lo = 1650 if r.provider == "flashcore-triton" else 1800
            r.gpu_state = {"samples": 3, "sm_clock_mhz": {"median": lo + 50, "min": lo,
                                                           "max": 1980},
                           "clock_reasons": ["sw_power_cap"] if lo < 1800 else []}
    md = report.markdown(BenchResult(res.rows, res.env, res.settings, res.peak_tflops))
    assert "flashcore-triton 1700 MHz (1650-1980)" in md
    assert "sdpa 1850 MHz (1800-1980)" in md
    assert "clock-event reasons seen: sw_power_cap." in md


def test_real_nvml_when_a_gpu_is_there():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    read = gpustate.nvml_reader(torch.cuda.current_device())
    if read is None:
        pytest.skip("NVML not readable here")
    s = read()
    assert s.sm_clock_mhz is None or 100 <= s.sm_clock_mhz <= 5000
    assert s.power_w is None or 0 < s.power_w < 2000
