"""The problem key: what a tuned config is looked up by.

Shapes are bucketed (powers of two) so one tuned entry serves a band of sequence lengths and
batch sizes; the GPU is part of the key so an H100 table never configures another card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ProblemKey", "bucket"]


def bucket(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclass(frozen=True)
class ProblemKey:
    gpu: str  # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    cc: str  # compute capability, e.g. "9.0"
    backend: str  # "triton" | "cuda"
    dtype: str  # "fp16" | "bf16" | "fp32"
    head_dim: int
    causal: bool
    gqa: int  # Hq // Hkv
    sq: int  # bucketed
    sk: int  # bucketed
    bh: int  # bucketed batch * query heads

    @classmethod
    def make(
        cls, gpu: str, cc: str, backend: str, dtype: str, head_dim: int, causal: bool,
        gqa: int, sq: int, sk: int, bh: int,
    ) -> ProblemKey:
        return cls(gpu, cc, backend, dtype, int(head_dim), bool(causal), int(gqa),
                   bucket(sq), bucket(sk), bucket(bh))

    def to_str(self) -> str:
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())

    @classmethod
    def from_str(cls, s: str) -> ProblemKey:
        d = dict(kv.split("=", 1) for kv in s.split("|"))
        return cls(
            gpu=d["gpu"], cc=d["cc"], backend=d["backend"], dtype=d["dtype"],
            head_dim=int(d["head_dim"]), causal=d["causal"] == "True", gqa=int(d["gqa"]),
            sq=int(d["sq"]), sk=int(d["sk"]), bh=int(d["bh"]),
        )
