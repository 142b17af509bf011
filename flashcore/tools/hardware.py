"""Hardware numbers, declared once: per-architecture resource limits (the gate's budgets) and
per-card peak throughputs (the profiler's roofline).

Limits come from the CUDA C++ Programming Guide, "Technical Specifications per Compute
Capability"; peaks from NVIDIA's datasheets (dense, i.e. without 2:4 sparsity, at boost clock).
A measured peak is lower than these (clocks under load, power limits), so "% of peak" against
them is a conservative figure.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ArchLimits",
    "ARCH_LIMITS",
    "GpuSpec",
    "GPU_SPECS",
    "DEFAULT_GPU",
    "arch_limits",
    "gpu_spec_for",
]

KIB = 1024


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block resource limits of one compute capability."""

    cc: int  # 90 for sm_90
    regs_per_sm: int
    max_regs_per_thread: int
    # Registers are allocated per warp in units of 256, i.e. 8 per thread.
    reg_alloc_unit_per_thread: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int
    # Largest dynamic shared memory one block may opt in to (cudaFuncAttributeMax...).
    max_smem_per_block: int
    # The driver reserves this much shared memory per resident block (sm_80 and later).
    reserved_smem_per_block: int = 1 * KIB


ARCH_LIMITS: dict[int, ArchLimits] = {
    80: ArchLimits(80, 65536, 255, 8, 64, 32, 164 * KIB, 163 * KIB),
    86: ArchLimits(86, 65536, 255, 8, 48, 16, 100 * KIB, 99 * KIB),
    89: ArchLimits(89, 65536, 255, 8, 48, 24, 100 * KIB, 99 * KIB),
    90: ArchLimits(90, 65536, 255, 8, 64, 32, 228 * KIB, 227 * KIB),
}


def arch_limits(cc: int) -> ArchLimits:
    """Limits for compute capability ``cc`` (e.g. 90); an unknown one raises KeyError with the
    known list, so a new card is added here deliberately rather than guessed."""
    try:
        return ARCH_LIMITS[int(cc)]
    except KeyError:
        raise KeyError(
            f"no resource limits declared for sm_{cc}; known: "
            + ", ".join(f"sm_{c}" for c in sorted(ARCH_LIMITS))
            + " (add it to flashcore/tools/hardware.py)"
        ) from None


@dataclass(frozen=True)
class GpuSpec:
    """Peak numbers of one card, for the roofline. FLOP/s are dense."""

    name: str
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name(), lower case
    cc: int
    sms: int
    dram_bytes_per_s: float
    tensor_fp16_flops: float  # fp16/bf16 inputs, fp32 accumulate, tensor cores
    tensor_tf32_flops: float
    fp32_flops: float  # FFMA on the CUDA cores (what an "ieee" fp32 dot runs on)
    source: str

    def peak_flops(self, dtype: str, uses_tensor_cores: bool = True) -> float:
        """The compute roof for a kernel computing in ``dtype`` ("fp16" | "bf16" | "fp32")."""
        if dtype in ("fp16", "bf16"):
            return self.tensor_fp16_flops
        return self.tensor_tf32_flops if uses_tensor_cores else self.fp32_flops

    def ridge_point(self, dtype: str, uses_tensor_cores: bool = True) -> float:
        """Arithmetic intensity (FLOP/byte of DRAM traffic) where the roofs meet."""
        return self.peak_flops(dtype, uses_tensor_cores) / self.dram_bytes_per_s


# Order matters: the first entry whose every match string is in the device name wins.
GPU_SPECS: tuple[GpuSpec, ...] = (
    GpuSpec(
        "H100 PCIe", ("h100", "pcie"), 90, 114, 2.0e12, 756.5e12, 378.0e12, 51.2e12,
        "NVIDIA H100 datasheet (PCIe, dense)",
    ),
    GpuSpec(
        "H200 SXM", ("h200",), 90, 132, 4.8e12, 989.4e12, 494.7e12, 66.9e12,
        "NVIDIA H200 datasheet (SXM, dense)",
    ),
    GpuSpec(
        "H100 SXM", ("h100",), 90, 132, 3.35e12, 989.4e12, 494.7e12, 66.9e12,
        "NVIDIA H100 datasheet (SXM5, dense)",
    ),
    GpuSpec(
        "A100 SXM 80GB", ("a100", "80gb"), 80, 108, 2.039e12, 312.0e12, 156.0e12, 19.5e12,
        "NVIDIA A100 datasheet (SXM4 80GB, dense)",
    ),
    GpuSpec(
        "A100 40GB", ("a100",), 80, 108, 1.555e12, 312.0e12, 156.0e12, 19.5e12,
        "NVIDIA A100 datasheet (40GB, dense)",
    ),
)

DEFAULT_GPU = next(s for s in GPU_SPECS if s.name == "H100 SXM")


def gpu_spec_for(device_name: str | None) -> tuple[GpuSpec, bool]:
    """(spec, matched): the spec for a device name; H100 SXM and matched=False if unknown."""
    low = (device_name or "").lower()
    for spec in GPU_SPECS:
        if all(m in low for m in spec.match):
            return spec, True
    return DEFAULT_GPU, False
