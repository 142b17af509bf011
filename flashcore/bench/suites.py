"""Benchmark problems: the ``Case`` dataclass, FLOP/byte counts and the named suites.

FLOPs count the two matmuls of attention (Q @ K^T and P @ V), 2 FLOPs per multiply-add each,
over the (query row, key) pairs a row may see: ``4 * B * Hq * D * visible_pairs``. The softmax
is not counted, as in the FlashAttention papers, so TFLOP/s compares directly with theirs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = [
    "Case",
    "DTYPES",
    "SUITES",
    "attention_flops",
    "interpret_cases",
    "suite_cases",
    "visible_pairs",
]

DTYPES = ("fp16", "bf16")
SUITES = ("mission", "sweep", "gqa", "headdims")
_ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}

# The FlashAttention papers' sweep: 16k tokens per batch, model width 2048.
SWEEP_TOKENS = 16384
SWEEP_HIDDEN = 2048
SWEEP_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
SWEEP_HEAD_DIMS = (64, 128, 256)


def visible_pairs(sq: int, sk: int, causal: bool, offset: int = 0) -> int:
    """Number of (query row, key) pairs attention computes.

    Non-causal: ``sq * sk``. Causal: row ``i`` sees keys ``j <= i + offset`` (``offset`` = 0 is
    SDPA's top-left alignment, ``sk - sq`` FlashAttention's bottom-right one), i.e.
    ``clamp(i + offset + 1, 0, sk)`` keys; the sum has a closed form (O(1), any size).
    """
    if sq < 0 or sk < 0:
        raise ValueError(f"sequence lengths must be >= 0, got sq={sq}, sk={sk}")
    if not causal:
        return sq * sk
    # Rows [0, lo) see no key, rows [lo, full) see i + offset + 1 keys, rows [full, sq) see all.
    lo = min(max(-offset, 0), sq)
    full = min(max(sk - offset - 1, lo), sq)
    # sum_{i=lo}^{full-1} (i + offset + 1): an arithmetic series.
    partial = (lo + offset + 1 + full + offset) * (full - lo) // 2
    return partial + (sq - full) * sk


def attention_flops(
    b: int, h: int, sq: int, sk: int, d: int, causal: bool, offset: int = 0
) -> int:
    """FLOPs of one attention forward: ``4 * b * h * d * visible_pairs``.

    Convention: causal with ``sq == sk`` and ``offset == 0`` counts exactly half of the dense
    work (``2 * b * h * sq * sk * d``), as the FlashAttention papers and SDPA benchmarks do, so
    TFLOP/s compares with published numbers; the exact count is ``s * (s + 1) / 2`` pairs, which
    is ``1 / s`` more (0.2 % at s = 512). Every other causal problem (``sq != sk``, or an
    offset) counts its visible pairs exactly.
    """
    if causal and sq == sk and offset == 0:
        return 2 * b * h * sq * sk * d
    return 4 * b * h * d * visible_pairs(sq, sk, causal, offset)


@dataclass(frozen=True)
class Case:
    """One benchmark problem: q [b, hq, sq, d], k/v [b, hkv, sk, d] in ``dtype``.

    Causal uses SDPA's top-left alignment (row ``i`` sees keys ``j <= i``), the convention of
    every provider's default.
    """

    b: int
    hq: int
    hkv: int
    sq: int
    sk: int
    d: int
    dtype: str  # "fp16" | "bf16"
    causal: bool
    suite: str = "custom"

    def __post_init__(self) -> None:
        if min(self.b, self.hq, self.hkv, self.sq, self.sk, self.d) < 1:
            raise ValueError(f"every size must be >= 1: {self}")
        if self.hq % self.hkv:
            raise ValueError(f"hq={self.hq} must be a multiple of hkv={self.hkv}")
        if self.dtype not in _ELEM_BYTES:
            raise ValueError(f"dtype must be one of {tuple(_ELEM_BYTES)}, got {self.dtype!r}")

    @property
    def gqa(self) -> bool:
        return self.hq != self.hkv

    @property
    def elem_bytes(self) -> int:
        return _ELEM_BYTES[self.dtype]

    def flops(self) -> int:
        """FLOPs of one forward call (see :func:`attention_flops`)."""
        return attention_flops(self.b, self.hq, self.sq, self.sk, self.d, self.causal)

    def input_bytes(self) -> int:
        """Bytes of q, k and v: what one rotating input set occupies (L2 sizing)."""
        return self.elem_bytes * self.d * (self.b * self.hq * self.sq
                                           + 2 * self.b * self.hkv * self.sk)

    def bytes(self) -> int:
        """Minimum HBM traffic of one call: read q, k, v once and write o once."""
        return self.input_bytes() + self.elem_bytes * self.b * self.hq * self.sq * self.d

    def label(self) -> str:
        """Short human label, e.g. ``B1 H8 S512 D64 fp16 causal`` (GQA: ``H32/8``)."""
        heads = f"H{self.hq}" + (f"/{self.hkv}" if self.gqa else "")
        seq = f"S{self.sq}" + (f"/{self.sk}" if self.sk != self.sq else "")
        return (f"B{self.b} {heads} {seq} D{self.d} {self.dtype}"
                + (" causal" if self.causal else ""))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(**{f: d[f] for f in ("b", "hq", "hkv", "sq", "sk", "d", "dtype", "causal",
                                        "suite")})


def _mission() -> list[Case]:
    return [Case(1, 8, 8, 512, 512, 64, "fp16", c, "mission") for c in (False, True)]


def _sweep() -> list[Case]:
    out = []
    for dtype in DTYPES:
        for causal in (False, True):
            for d in SWEEP_HEAD_DIMS:
                h = SWEEP_HIDDEN // d
                for s in SWEEP_SEQLENS:
                    out.append(Case(SWEEP_TOKENS // s, h, h, s, s, d, dtype, causal, "sweep"))
    return out


def _gqa() -> list[Case]:
    # Llama-style 32 query heads sharing 8 K/V heads; 16k tokens per batch as in the sweep.
    # bf16 only: the dtype GQA models run in; the sweep already covers fp16 vs bf16.
    return [
        Case(SWEEP_TOKENS // s, 32, 8, s, s, 128, "bf16", causal, "gqa")
        for causal in (False, True)
        for s in (1024, 2048, 4096, 8192)
    ]


def _headdims() -> list[Case]:
    # Head dims that are not powers of two (padded to 64/128/256 inside tiled kernels).
    # H = 16 for all: 2048 / D is not an integer for 40, 96 and 192.
    return [
        Case(SWEEP_TOKENS // 2048, 16, 16, 2048, 2048, d, "bf16", causal, "headdims")
        for causal in (False, True)
        for d in (40, 80, 96, 192)
    ]


_BUILDERS = {"mission": _mission, "sweep": _sweep, "gqa": _gqa, "headdims": _headdims}


def suite_cases(name: str) -> list[Case]:
    """Cases of one suite (``mission``, ``sweep``, ``gqa``, ``headdims``) or ``all``."""
    if name == "all":
        return [c for s in SUITES for c in _BUILDERS[s]()]
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; choose from {SUITES + ('all',)}") from None


# Interpret mode runs every kernel through the Triton interpreter on the CPU (~0.1 s a call at
# these sizes), so each case shrinks to at most this many rows/keys.
_TINY_SEQ = 64


def interpret_cases(cases: list[Case]) -> list[Case]:
    """Tiny versions of ``cases`` for ``--interpret``: B=1, 2 heads (GQA keeps a ratio of up to
    4 over one K/V head), S <= 64; head dim, dtype, causal and suite kept. Duplicates dropped."""
    out: list[Case] = []
    for c in cases:
        hq, hkv = (min(c.hq // c.hkv, 4), 1) if c.gqa else (2, 2)
        t = replace(c, b=1, hq=hq, hkv=hkv, sq=min(c.sq, _TINY_SEQ), sk=min(c.sk, _TINY_SEQ))
        if t not in out:
            out.append(t)
    return out
