"""Launch configurations of the CUDA C++ (WMMA + cuda::pipeline) forward kernel.

Each warp owns 16 query rows (one WMMA row tile), so ``block_m = 16 * num_warps``. These are
compile-time parameters of ``fwd.cu`` (-D macros), so the tuner can vary them.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "CudaFwdConfig",
    "SEARCH_SPACE",
    "SUPPORTED_HEAD_DIMS",
    "default_config",
    "is_valid",
    "search_space",
    "unsupported_reasons",
]

SUPPORTED_HEAD_DIMS = (64, 128)
_SMEM_LIMIT_BYTES = 227 * 1024  # sm_90's opt-in maximum per block


def smem_limit_for(cc: str) -> int:
    """Dynamic shared memory a block may opt into, by compute capability ("9.0", "8.0")."""
    return {"9.0": 227 * 1024, "8.0": 163 * 1024, "8.7": 163 * 1024}.get(cc, 99 * 1024)


@dataclass(frozen=True, order=True)
class CudaFwdConfig:
    """num_warps warps x 16 query rows per block; block_n keys per pipeline stage; stages-deep
    cp.async ring of K/V tiles in shared memory."""

    num_warps: int = 4
    block_n: int = 64
    stages: int = 2
    kv_groups: int = 1  # 2 or 4: warp groups split each stage's keys and merge at the end

    @property
    def block_m(self) -> int:
        return 16 * self.num_warps // self.kv_groups

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CudaFwdConfig:
        return cls(**{k: int(d.get(k, 1)) for k in ("num_warps", "block_n", "stages",
                                                    "kv_groups")})

    def short(self) -> str:
        return f"w{self.num_warps}n{self.block_n}s{self.stages}" + (
            f"g{self.kv_groups}" if self.kv_groups > 1 else "")

    @classmethod
    def from_short(cls, name: str) -> CudaFwdConfig:
        """The config :meth:`short` names (``w4n64s2``, ``w8n64s2g4``)."""
        m = re.fullmatch(r"w(\d+)n(\d+)s(\d+)(?:g(\d+))?", name)
        cfg = cls(*(int(x) for x in m.groups(default="1"))) if m else None
        if cfg is None or cfg.short() != name:  # g0, g1, leading zeros: not short()'s names
            raise ValueError(f"config name {name!r} is not a CUDA config name: expected "
                             "w<warps>n<block_n>s<stages>[g<kv_groups> with kv_groups > 1] "
                             "(e.g. w8n64s2g4)")
        return cfg


SEARCH_SPACE: dict[str, tuple[int, ...]] = {
    "num_warps": (2, 4, 8),
    "block_n": (32, 64, 128),
    "stages": (2, 3, 4),
    "kv_groups": (1, 2, 4),
}


def smem_bytes(cfg: CudaFwdConfig, head_dim: int, p_regs: bool = True) -> int:
    """Dynamic shared memory of one block: the K/V ring, the Q tile and, when P cannot stay in
    registers (``p_regs`` False, see fwd.cu's FC_P_REGS), per-warp P tiles."""
    ld = head_dim + 8  # padded row: 16 bytes of skew per row avoids bank conflicts
    kv = 2 * cfg.stages * cfg.block_n * cfg.kv_groups * ld * 2
    q = cfg.block_m * ld * 2
    p = 0 if p_regs else cfg.num_warps * 16 * (cfg.block_n + 8) * 2
    return kv + q + p


def _merge_bytes(cfg: CudaFwdConfig, head_dim: int) -> int:
    """The warp-group merge's exchange buffer (it reuses the K/V ring): per group after the
    first, per 16-row slice and lane, head_dim / 2 accumulators + 4 softmax floats."""
    slices = cfg.num_warps // cfg.kv_groups
    return (cfg.kv_groups - 1) * slices * (head_dim // 2 + 4) * 32 * 4


def is_valid(cfg: CudaFwdConfig, head_dim: int, smem_limit: int = _SMEM_LIMIT_BYTES) -> bool:
    """Prune predicate: shared memory fits, registers (S and O accumulators) stay bounded."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return False
    if cfg.kv_groups not in (1, 2, 4) or cfg.num_warps % cfg.kv_groups:
        return False
    # Sized for the build that runs where fwd.cu's layout probe passes (sm_80, sm_90: P in
    # registers); elsewhere the launcher says so if the P-in-shared-memory build does not fit.
    if smem_bytes(cfg, head_dim) > smem_limit:
        return False
    kv_ring = 2 * cfg.stages * cfg.block_n * cfg.kv_groups * (head_dim + 8) * 2
    if _merge_bytes(cfg, head_dim) > kv_ring:
        return False
    # Per thread: O accumulator (head_dim/16 fragments x 8 floats) + S (block_n/16 x 8).
    return (head_dim // 16) * 8 + (cfg.block_n // 16) * 8 <= 128


def search_space(head_dim: int) -> list[CudaFwdConfig]:
    out = []
    for values in itertools.product(*SEARCH_SPACE.values()):
        cfg = CudaFwdConfig(*values)
        if is_valid(cfg, head_dim):
            out.append(cfg)
    return out


def default_config(
    head_dim: int, sq: int, sk: int, batch_heads: int, is_causal: bool, num_sms: int = 132,
    dtype: str = "fp16", smem_limit: int = _SMEM_LIMIT_BYTES,
) -> CudaFwdConfig:
    """First candidate that fits this card's shared memory (sm_80 has 163 KiB, not 227)."""
    # Measured on H100 (fp16, 2026-11-25, docs/perf-notes.md): 8 warps with 128-key stages
    # for D = 128 at S 512-16k. For D = 64, 128-key stages were ~5% faster at the mission
    # shape but spill in bf16 (Q fragments stay in registers there), so 64-key stages; bf16
    # fragments take more registers, so D = 128 in bf16 also keeps 64-key stages.
    if head_dim <= 64:
        big = [CudaFwdConfig(4, 64, 3), CudaFwdConfig(4, 64, 2)]
    else:
        big = [CudaFwdConfig(8, 128 if dtype == "fp16" else 64, 2), CudaFwdConfig(4, 64, 2)]
    # Few blocks per SM: warp groups share each block's rows, splitting the keys. Measured on
    # H100 at the mission shape (B1 H8 S512 D64 fp16, P in registers): w8n64s3g4 8.7 us,
    # w4n64s4g2 8.9, w8n64s3g2 10.5 (sm_80's 163 KiB rules out the first: next one).
    small = [CudaFwdConfig(8, 64, 3 if head_dim <= 64 else 2, 2), CudaFwdConfig(4, 64, 2, 2)]
    if head_dim <= 64:
        small.insert(0, CudaFwdConfig(8, 64, 3, 4))
    cands = big
    if batch_heads * -(-sq // big[0].block_m) < num_sms:
        cands = small + big
    for cfg in cands:
        if is_valid(cfg, head_dim, smem_limit):
            return cfg
    return CudaFwdConfig(2, 32, 2)


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why backend='cuda' cannot run these (already generally valid) inputs; [] if it can."""
    out = []
    hint = "; use backend='triton' (or 'auto'), which supports it"
    if q.dtype not in (torch.float16, torch.bfloat16):
        out.append(f"backend='cuda' supports float16 and bfloat16, got {q.dtype}{hint}")
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        out.append(f"backend='cuda' supports head dims {SUPPORTED_HEAD_DIMS}, got D={d}{hint}")
    for name, t in (("query", q), ("key", k), ("value", v)):
        st = t.stride()
        if st[3] != 1 or any(s % 8 for s in st[:3]) or t.data_ptr() % 16:
            out.append(
                f"backend='cuda' needs {name} with a contiguous last dim, other strides "
                f"multiples of 8 elements and a 16-byte aligned start for 16-byte copies, got "
                f"strides {tuple(st)} (data_ptr % 16 = {t.data_ptr() % 16}){hint}"
            )
    return out
