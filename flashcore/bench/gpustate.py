"""The card's state while a row is timed: SM clock, power, temperature, clock-event reasons.

Why: on the lent H200 a provider timed right after seconds of another's dense work read up to
18 % slower than after a 2 s idle gap, while the other provider's time barely moved
(docs/perf-notes.md, seventh session). A timing is only comparable with the clock it ran at,
so each row records what NVML reported during its timed replays. The first GPU run of this log
(eighth session) showed why: the 700 W software power cap, which took the SM clock from 1980
to as low as 1305 MHz during dense work, so a provider timed right after another inherits its
clock (hence the runner's interleaved rounds).

Power is ``nvmlDeviceGetPowerUsage``, which on this generation is a running average over about
a second: a short timing right after an idle stretch reads far below the card's draw during
it. The clock and the reasons are instantaneous.

NVML is read through ctypes (``libnvidia-ml.so.1`` ships with the driver; no Python package
needed) from a background thread every ``period_s``. Every failure (no library, no GPU, a
call NVML does not support) degrades to "no samples": the benchmark never fails for it.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["GpuSample", "GpuStateSampler", "nvml_reader", "summarize_samples", "THROTTLE_BITS"]

# nvmlClocksEventReasons bits (nvml.h), the ones that explain a lower SM clock.
THROTTLE_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}


@dataclass(frozen=True)
class GpuSample:
    sm_clock_mhz: int | None
    power_w: float | None
    temp_c: int | None
    reasons: int | None  # nvmlClocksEventReasons bit mask


def _reason_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit]


def summarize_samples(samples: list[GpuSample]) -> dict | None:
    """Median/min/max SM clock, median/max power, max temperature and every clock-event
    reason seen; None without samples."""
    if not samples:
        return None
    out: dict = {"samples": len(samples)}
    clocks = [s.sm_clock_mhz for s in samples if s.sm_clock_mhz is not None]
    if clocks:
        out["sm_clock_mhz"] = {"median": statistics.median(clocks), "min": min(clocks),
                               "max": max(clocks)}
    power = [s.power_w for s in samples if s.power_w is not None]
    if power:
        out["power_w"] = {"median": statistics.median(power), "max": max(power)}
    temps = [s.temp_c for s in samples if s.temp_c is not None]
    if temps:
        out["temp_c_max"] = max(temps)
    mask = 0
    for s in samples:
        mask |= s.reasons or 0
    out["clock_reasons"] = _reason_names(mask)
    return out


class _Nvml:
    """The few NVML calls the sampler needs (ctypes). Raises OSError if NVML is unusable."""

    def __init__(self, uuid: str | None, pci_bus_id: str | None, only_device: bool) -> None:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        self.lib = lib
        self.dev = ctypes.c_void_p()
        # The CUDA device by UUID, else by PCI bus id; by index only when CUDA and NVML both
        # see a single GPU (their orders can differ: CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER).
        ok = uuid is not None and lib.nvmlDeviceGetHandleByUUID(
            uuid.encode(), ctypes.byref(self.dev)) == 0
        ok = ok or (pci_bus_id is not None and lib.nvmlDeviceGetHandleByPciBusId_v2(
            pci_bus_id.encode(), ctypes.byref(self.dev)) == 0)
        if not ok and only_device:
            count = ctypes.c_uint()
            ok = (lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 and count.value == 1
                  and lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.dev)) == 0)
        if not ok:
            raise OSError("no NVML device matches the CUDA device")
        # Newer drivers name it ...ClocksEventReasons; the old name stays exported.
        self.reasons_fn = getattr(lib, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(lib, "nvmlDeviceGetCurrentClocksThrottleReasons", None)

    def read(self) -> GpuSample:
        u = ctypes.c_uint()
        clock = u.value if self.lib.nvmlDeviceGetClockInfo(self.dev, 1, ctypes.byref(u)) == 0 \
            else None  # NVML_CLOCK_SM = 1
        power = u.value / 1000.0 if self.lib.nvmlDeviceGetPowerUsage(
            self.dev, ctypes.byref(u)) == 0 else None  # milliwatts
        temp = u.value if self.lib.nvmlDeviceGetTemperature(
            self.dev, 0, ctypes.byref(u)) == 0 else None  # NVML_TEMPERATURE_GPU = 0
        mask = None
        if self.reasons_fn is not None:
            m = ctypes.c_ulonglong()
            if self.reasons_fn(self.dev, ctypes.byref(m)) == 0:
                mask = m.value
        return GpuSample(clock, power, temp, mask)


def nvml_reader(device_index: int = 0) -> Callable[[], GpuSample] | None:
    """A zero-argument reader of CUDA device ``device_index``'s state, or None where NVML
    cannot be used (no driver library, a CPU run, a sandbox)."""
    try:
        import torch

        props = torch.cuda.get_device_properties(device_index)
        uuid = pci = None
        try:
            uuid = "GPU-" + str(props.uuid)
        except Exception:  # noqa: BLE001 - a torch without it: try the PCI bus id
            uuid = None
        try:
            pci = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        except Exception:  # noqa: BLE001
            pci = None
        nvml = _Nvml(uuid, pci, torch.cuda.device_count() == 1)
        nvml.read()
    except Exception:  # noqa: BLE001 - any failure means "not sampled", never a failed run
        return None
    return nvml.read


class GpuStateSampler:
    """``with sampler.sampling() as samples:`` reads the card every ``period_s`` from a
    background thread while the block runs (the first read at entry, one more at exit)."""

    def __init__(self, reader: Callable[[], GpuSample] | None, period_s: float = 0.02) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s!r}")
        self.reader = reader
        self.period_s = period_s

    def _read(self, out: list[GpuSample]) -> None:
        try:
            out.append(self.reader())
        except Exception:  # noqa: BLE001 - a failed read is a missing sample
            pass

    @contextmanager
    def sampling(self) -> Iterator[list[GpuSample]]:
        samples: list[GpuSample] = []
        if self.reader is None:
            yield samples
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.period_s):
                self._read(samples)

        self._read(samples)
        thread = threading.Thread(target=loop, name="flashcore-gpustate", daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()
            self._read(samples)
