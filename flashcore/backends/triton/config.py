"""Launch configurations of the Triton forward kernel: default, search space, prune predicate.

A config is what the tuner varies and what dispatch selects; everything else about a launch is
decided by the problem (dtype, head dim, causal) and is not tunable.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass

__all__ = [
    "TritonFwdConfig",
    "SEARCH_SPACE",
    "block_d_for",
    "cross_tile",
    "default_config",
    "hopper_fallback",
    "hopper_grid",
    "hopper_head_dim",
    "is_valid",
    "search_space",
    "stream_k",
    "stream_k_grid",
]

# Hopper: 227 KiB of shared memory per block after opting in (sm_90), 65536 registers per SM.
_SMEM_LIMIT_BYTES = 227 * 1024
# Triton keeps the fp32 accumulator, the fp32 score tile and the Q tile in registers; above this
# many live fp32 values per thread the compiler starts spilling (seen on H100 with BLOCK_D=256).
_MAX_LIVE_F32_PER_THREAD = 192


@dataclass(frozen=True, order=True)
class TritonFwdConfig:
    """Tile shape and schedule of one launch of ``_attn_fwd_kernel``.

    block_m: query rows per program; block_n: keys per inner-loop step; num_warps: warps per
    program; num_stages: software-pipelining depth of the K/V loads.

    hopper=1 selects the Gluon warp-specialised kernel of ``fwd_hopper.py`` (sm_90, fp16/bf16,
    D 64/128/256 and the dims it runs padded to them: ``hopper_head_dim``), where the fields
    read: block_m query rows per consumer warpgroup,
    num_warps // 4 consumer warpgroups (plus a 4-warp TMA producer), num_stages the depth of
    the K and V rings; overlap=1 pipelines PV of block j-1 under the softmax of block j inside
    a warpgroup, pingpong=1 makes the consumers issue their wgmma in turn; persistent=1
    launches one program per SM that walks the tiles, so a tile's Q, K and V loads overlap the
    previous tile's last blocks and O store; ksplit=1 (not with persistent) gives the
    consumers one shared 64-row tile and splits its key blocks among them, merged at the end:
    for grids with fewer tiles than SMs, where each tile's serial chain of key blocks is the
    time.
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    tma: int = 0  # 1: K/V/Q/O through the copy engine (tensor descriptors), where strides allow
    ws: int = 0  # 1: warp-specialised main loop (needs tma=1)
    hopper: int = 0  # 1: the Gluon Hopper kernel (fwd_hopper.py); the fields below need it
    overlap: int = 0
    pingpong: int = 0
    persistent: int = 0
    ksplit: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TritonFwdConfig:
        return cls(**{k: int(d.get(k, 0)) for k in (
            "block_m", "block_n", "num_warps", "num_stages", "tma", "ws", "hopper", "overlap",
            "pingpong", "persistent", "ksplit")})

    def short(self) -> str:
        if self.hopper:
            extra = ("o" if self.overlap else "") + ("p" if self.pingpong else "") + (
                "P" if self.persistent else "") + ("k" if self.ksplit else "")
            return f"h{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}{extra}"
        extra = ("t" if self.tma else "") + ("ws" if self.ws else "")
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}{extra}"

    @classmethod
    def from_short(cls, name: str) -> TritonFwdConfig:
        """The config :meth:`short` names (``m64n64w4s3t``, ``h64n128w8s2oP``, ...)."""
        cfg = None
        m = re.fullmatch(r"m(\d+)n(\d+)w(\d+)s(\d+)(t?)(ws)?", name)
        if m:
            bm, bn, w, st, t, ws = m.groups()
            cfg = cls(int(bm), int(bn), int(w), int(st), tma=int(bool(t)), ws=int(bool(ws)))
        m = re.fullmatch(r"h(\d+)n(\d+)w(\d+)s(\d+)(o?)(p?)(P?)(k?)", name)
        if m:
            bm, bn, w, st, o, p, pp, k = m.groups()
            cfg = cls(int(bm), int(bn), int(w), int(st), tma=1, hopper=1, overlap=int(bool(o)),
                      pingpong=int(bool(p)), persistent=int(bool(pp)), ksplit=int(bool(k)))
        if cfg is None or cfg.short() != name:  # e.g. leading zeros: not a name short() gives
            raise ValueError(
                f"config name {name!r} is not a Triton config name: expected "
                "m<block_m>n<block_n>w<warps>s<stages>[t][ws] or "
                "h<block_m>n<block_n>w<warps>s<stages>[o][p][P][k] (e.g. m64n64w4s3t, "
                "h64n128w8s2oP)")
        return cfg


SEARCH_SPACE: dict[str, tuple[int, ...]] = {
    "block_m": (32, 64, 128),
    "block_n": (32, 64, 128),
    "num_warps": (4, 8, 12),
    "num_stages": (1, 2, 3, 4),
    "tma": (0, 1),
    # Warp specialisation (tl.range(warp_specialize=True)) stays out of the search: on H100
    # with triton 3.6 it compiled for 8-warp tiles only, crashed the compiler for 4-warp ones,
    # and was never faster than the same tile without it (docs/perf-notes.md, 2026-11-25).
    "ws": (0,),
    "hopper": (0, 1),
    "overlap": (0, 1),
    "pingpong": (0, 1),
    "persistent": (0, 1),
    "ksplit": (0, 1),
}

# The Gluon Hopper kernel: the head dims and element size it is built for, and registers per
# consumer thread that setmaxnreg grants with 2 / 3 consumer warpgroups (240 / 160).
HOPPER_HEAD_DIMS = (64, 128, 256)
_HOPPER_LIVE_LIMIT = {8: 176, 12: 128}


def block_d_for(head_dim: int) -> int:
    """Head dim padded to the next power of two (at least 16): the kernel's BLOCK_D."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def hopper_head_dim(head_dim: int) -> int | None:
    """The Gluon kernel's HEAD_DIM for a problem's head dim, or None where it cannot run it.

    64 / 128 / 256 run as themselves; a padded dim (a multiple of 8 from 40: 40, 80, 96, 192,
    ...) runs the kernel of the next of them. Its descriptors keep the tensors' own head dim,
    so the copy engine zero-fills the columns past it on every load (they add nothing to
    QK^T and give zero columns of O) and drops them on the store: no copy, no mask. A
    multiple of 8 keeps a dense tensor's rows 16-byte multiples, as TMA needs; a smaller dim
    (<= 32) would need a 16 / 32-wide kernel that is not built."""
    bd = block_d_for(head_dim)
    return bd if bd in HOPPER_HEAD_DIMS and head_dim % 8 == 0 else None


def smem_bytes(cfg: TritonFwdConfig, head_dim: int, elem_bytes: int = 2,
               cross_tile: bool = False) -> int:
    """Estimate of the shared memory the pipelined K/V ring and the Q tile take
    (``cross_tile``: the Gluon kernel's double-buffered Q, see :func:`cross_tile`)."""
    bd = block_d_for(head_dim)
    if cfg.hopper:
        consumers = cfg.num_warps // 4
        if cfg.ksplit:
            # One shared Q tile (reused for O); the other consumers' fp32 partials (O, max, sum).
            q = cfg.block_m * bd * elem_bytes + (consumers - 1) * cfg.block_m * (bd + 2) * 4
        else:
            # Q tile per consumer (two when tiles are pipelined), plus O's own unless it can
            # reuse Q's (without a persistent grid).
            q = consumers * cfg.block_m * bd * elem_bytes * (1 + int(cross_tile) + cfg.persistent)
        # The K and V rings, mbarriers.
        return q + 2 * cfg.num_stages * cfg.block_n * bd * elem_bytes + 1024
    kv = 2 * max(cfg.num_stages, 1) * cfg.block_n * bd * elem_bytes
    return kv + cfg.block_m * bd * elem_bytes


def is_valid(cfg: TritonFwdConfig, head_dim: int, elem_bytes: int = 2) -> bool:
    """Prune predicate: shared memory within the card's limit and registers without spills."""
    if cfg.hopper:
        return _hopper_valid(cfg, head_dim, elem_bytes)
    if cfg.overlap or cfg.pingpong or cfg.persistent or cfg.ksplit or cfg.num_warps not in (4, 8):
        return False
    if cfg.ws and not cfg.tma:
        return False
    # Each warp needs at least a 16-row MMA tile of its own.
    if cfg.block_m * cfg.block_n < 256 * cfg.num_warps:
        return False
    if smem_bytes(cfg, head_dim, elem_bytes) > _SMEM_LIMIT_BYTES:
        return False
    bd = block_d_for(head_dim)
    threads = 32 * cfg.num_warps
    # The fp32 accumulator and score tile live in registers; Q stays in shared memory (wgmma
    # reads its A operand from there), so it does not count.
    live = (cfg.block_m * bd + cfg.block_m * cfg.block_n) / threads
    return live <= _MAX_LIVE_F32_PER_THREAD


def _hopper_valid(cfg: TritonFwdConfig, head_dim: int, elem_bytes: int) -> bool:
    # One 64-row wgmma tile per consumer warpgroup, 2 or 3 consumers, K/V through TMA.
    kd = hopper_head_dim(head_dim)
    if kd is None or elem_bytes != 2:
        return False
    if cfg.block_m != 64 or cfg.num_warps not in _HOPPER_LIVE_LIMIT or not cfg.tma or cfg.ws:
        return False
    if cfg.block_n < 64 or cfg.num_stages < 2:
        return False
    # The key split runs one tile a program (not persistent); ping-pong between consumers
    # that never share a key block buys nothing. Each consumer waits only on every C-th block,
    # and a parity wait for a ring slot's fill n passes wrongly while fill n - 1 is still in
    # flight, so fill n - 1 (block j - STAGES) must be one this consumer already waited for
    # (block j - C, j - 2C, ...): STAGES a multiple of C. TMA gives no completion order between
    # loads, so another consumer's earlier block may still be landing. (3 consumers on 2-deep
    # rings read stale blocks and faulted on the H200, 2026-12-01.)
    if cfg.ksplit and (cfg.persistent or cfg.pingpong or cfg.num_stages % (cfg.num_warps // 4)):
        return False
    if smem_bytes(cfg, head_dim, elem_bytes) > _SMEM_LIMIT_BYTES:
        return False
    # Per consumer thread: S (fp32), O (fp32) and P (16-bit) fragments of a 64-row tile.
    live = cfg.block_n // 2 + kd // 2 + cfg.block_n // 4
    return live <= _HOPPER_LIVE_LIMIT[cfg.num_warps]


def search_space(head_dim: int, elem_bytes: int = 2) -> list[TritonFwdConfig]:
    """Every valid config of :data:`SEARCH_SPACE` for this head dim."""
    out = []
    for values in itertools.product(*SEARCH_SPACE.values()):
        cfg = TritonFwdConfig(*values)
        if is_valid(cfg, head_dim, elem_bytes):
            out.append(cfg)
    return out


def default_config(
    head_dim: int,
    sq: int,
    sk: int,
    batch_heads: int,
    is_causal: bool,
    elem_bytes: int = 2,
    num_sms: int = 132,
    sm90: bool = False,
) -> TritonFwdConfig:
    """Analytic default, used when no tuned entry matches. ``sm90``: the GPU is a Hopper
    (compute capability 9.0), where the Gluon kernel may be chosen.

    Starting points from the FlashAttention-2/3 papers' tile shapes; thresholds are refined by
    measurement in docs/perf-notes.md.
    """
    bd = block_d_for(head_dim)
    # The Gluon kernel's head dim on an sm_90 GPU (fp16 / bf16), else None: padded dims (40,
    # 80, 96, 192) take the Gluon branches of the dim they are padded to, as they run its
    # kernel (the tl.dot branches keep their own tiles for them).
    # H100, bf16, B8 H16 S2k, two suite runs (docs/perf-notes.md, nineteenth session): D = 40 /
    # 80 / 96 / 192 at 1.03-1.10 / 1.05-1.15 / 1.05-1.17 / 0.82-0.92x SDPA this way (80 / 96
    # non-causal at parity against SDPA's times beside the old tile), where the tl.dot tiles
    # tuned for them ran 0.53-0.83x: the padding's FLOPs cost less than the tl.dot tile.
    kd = hopper_head_dim(head_dim) if sm90 and elem_bytes == 2 else None
    if elem_bytes == 4:
        # fp32 dots run on FMA units ("ieee"), whose operand layouts hold far more registers
        # than wgmma's: spill-free tiles per `flashcore gate --search-space` (2026-11-25).
        if bd <= 32:
            return TritonFwdConfig(64, 32, 4, 2)
        if bd <= 64:
            return TritonFwdConfig(64, 32, 8, 2)
        if bd <= 128:
            return TritonFwdConfig(32, 64, 8, 2)
        return TritonFwdConfig(32, 16, 8, 1)
    # Tile choices measured on H100 (fp16, 2026-11-25, docs/perf-notes.md): 128x64 tiles on 8
    # warps won for D <= 64 at S 512-4k; the copy engine (tma) won from D = 128 up, and a
    # 128x64 tile on 8 warps beat every 64-row tile at D = 256 (571 vs 783 us).
    if bd <= 64:
        # Padded head dims (D = 40: 80-byte rows) defeat vectorised pointer loads under the
        # column mask; the copy engine fetches the box and zero-fills the padding instead
        # (H100, B8 H16 S2048 D40 bf16 causal: 247 us with tma, 637 without).
        cfg = TritonFwdConfig(128, 64, 8, 3, tma=int(head_dim != bd))
    elif bd <= 128:
        cfg = TritonFwdConfig(128, 64, 8, 3, tma=1)
    else:
        cfg = TritonFwdConfig(128, 64, 8, 2, tma=1)
    # Too few programs to fill the 132 SMs (the mission shape: 8 heads x 512 rows): 64-row
    # tiles on 4 warps. 128-key blocks ran the mission 0.4-0.7 us faster than 64-key ones but
    # spill (255 registers + 12 bytes at D = 64): the gate keeps dispatch spill-free.
    if batch_heads * -(-sq // cfg.block_m) < num_sms:
        if kd in (64, 128) and batch_heads * -(-sq // 64) <= num_sms // 2:
            # At most half the SMs get a 64-row tile (the mission, B1 H8 S512 D64: 64 tiles):
            # the Gluon kernel's two consumers split each tile's key blocks, 4-deep rings keep
            # them all in flight. H200, fp16, 2026-12-01 (docs/perf-notes.md): the mission
            # 8.12 / 8.32 us (non-causal / causal) with 128-key blocks, where the tl.dot tile
            # below ran 8.95 / 9.42 (SDPA 9.84 / 10.16); B1 H4 S512 D128 10.01 us with 64-key
            # blocks (4-deep 128-key rings do not fit at D = 128) against 10.77 (SDPA 11.88).
            # With more tiles the split lost (B1 H16 S1k D128: 29.0 us, persistent grid 27.6).
            cfg = TritonFwdConfig(64, 128 if kd == 64 else 64, 8, 4, tma=1, hopper=1,
                                  ksplit=1)
        else:
            cfg = _small_grid_tile(head_dim)
    elif kd == 256:
        # D = 256 on the Gluon kernel: 2 consumers x 64 rows, 64-key blocks (O alone is 128
        # registers a thread), 2-deep rings: 0.95-1.12x SDPA from S = 512 to 16k, where the
        # tl.dot tile ran 0.63-0.84x (H100, fp16, 2026-11-25, docs/perf-notes.md). The other
        # three Hopper configs that fit (no overlap, ping-pong) were slower at every S.
        cfg = TritonFwdConfig(64, 64, 8, 2, tma=1, hopper=1, overlap=1)
    elif kd is not None:
        # Enough programs for the grid: the Gluon kernel (H100, fp16, 2026-11-25,
        # docs/perf-notes.md). D = 128: 2 consumers x 64 rows, 128 keys, 2-deep rings and the
        # in-warpgroup pipeline; below 8k keys a persistent grid (the next tile's loads under
        # this tile's tail) ran 1.01-1.04x SDPA non-causal and 0.91-1.09x causal, where one
        # program per tile ran 0.80-1.04x; from 8k keys one program per tile is faster.
        # D = 64: 3 consumers from 2k keys (16k: 1.14x with 3-deep rings), 2 consumers on a
        # persistent grid below that and for causal rows below 8k keys (0.84-0.96x causal,
        # where the tl.dot kernel ran 0.74-0.94x).
        persistent = int(sk < 8192)
        if kd == 128:
            cfg = TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1, overlap=1,
                                  persistent=persistent)
        elif sk >= 8192:
            cfg = TritonFwdConfig(64, 128, 12, 2 + int(not is_causal), tma=1, hopper=1, overlap=1)
        elif sk >= 2048 and not is_causal:
            cfg = TritonFwdConfig(64, 128, 12, 2, tma=1, hopper=1, overlap=1, persistent=1)
        else:
            cfg = TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1, overlap=1, persistent=1)
    if not is_valid(cfg, head_dim, elem_bytes):
        cfg = TritonFwdConfig(64, 32, 4, 1)
    return cfg


def _small_grid_tile(head_dim: int) -> TritonFwdConfig:
    """The heuristic's tl.dot tile for grids that leave SMs idle (64-row tiles), fp16/bf16."""
    bd = block_d_for(head_dim)
    if bd <= 64 and head_dim != bd:
        # Padded dims (40): on 4 warps the column masks spill (the gate).
        return TritonFwdConfig(64, 64, 8, 3)
    if bd <= 128:
        return TritonFwdConfig(64, 64, 4, 3)
    return TritonFwdConfig(64, 32, 4, 2, tma=1)


CROSS_TILE_ENV = "FLASHCORE_CROSS_TILE"
# The longest key length a causal launch with head_dim > 64 pipelines its tiles into one another
# at (cross_tile); head_dim <= 64 has no limit.
CROSS_TILE_CAUSAL_MAX_SK = 1024


def cross_tile(cfg: TritonFwdConfig, head_dim: int, is_causal: bool, sk: int,
               elem_bytes: int = 2, causal_off: int = 0) -> bool:
    """Whether a Gluon-kernel launch pipelines each program's tiles into one another: the next
    tile's first QK^T issued with this tile's last PV (Q double-buffered). Needs a persistent
    grid with the in-warpgroup pipeline and two consumers, and the second Q buffer must fit in
    shared memory. Non-causal: no ragged last key block (every block of every tile unmasked).
    Causal: the diagonal at offset 0 (``causal_off``; Sq = Sk, or top-left alignment), where
    each 64-row consumer meets exactly one diagonal block, the first of its tile's reversed
    stream, and every later block is full.
    ``FLASHCORE_CROSS_TILE=0`` turns it off (read when a launch plan is built)."""
    if not (cfg.hopper and cfg.persistent and cfg.overlap) or cfg.ksplit:
        return False
    # Two consumers only: with three (D = 64 from 2k keys) it ran 3.6 % slower (H200, fp16,
    # B8 H32 S2k D64, 2026-12-01, docs/perf-notes.md); they also keep the forward causal order.
    if cfg.num_warps != 8 or sk <= 0 or os.environ.get(CROSS_TILE_ENV, "1") == "0":
        return False
    if is_causal:
        # One diagonal block per consumer: 64-row consumers, 64 | block_n <= 128, offset 0.
        if causal_off != 0 or cfg.block_m != 64 or cfg.block_n not in (64, 128):
            return False
        # A one-slot ring would hang: the consumer with a tile's upper rows releases its
        # skipped block before the previous tile's last V slot (is_valid rejects it; an
        # override might not).
        if cfg.num_stages < 2:
            return False
        # D128: short keys only. Against the same kernel without the pipeline
        # (FLASHCORE_CROSS_TILE=0; H200 same-call A/B, docs/perf-notes.md, fifteenth session)
        # it tied at 4k and lost 1.5 / 5 % at 8k / 16k; 2k was mixed across calls (-2 to
        # +9 %). D64 won at every length measured (same config with and without: fp16 2k / 4k
        # / 8k / 16k +7 / +3 / +1.5 / +3 %, bf16 2k / 4k +5 / +2 %).
        if head_dim > 64 and sk > CROSS_TILE_CAUSAL_MAX_SK:
            return False
    elif sk % cfg.block_n:
        return False
    return smem_bytes(cfg, head_dim, elem_bytes, cross_tile=True) <= _SMEM_LIMIT_BYTES


STREAM_K_ENV = "FLASHCORE_STREAM_K"
# The least fraction of a launch's time a stream-K last wave must save (stream_k): a first
# guess, not yet measured, at where the split tiles' merges cost what the balance gains.
STREAM_K_MIN_GAIN = 0.02
# The fewest key blocks a tile must have for a stream-K launch: each part of a split tile pays a
# pipeline fill and drain, a Q load without prefetch and the merge's fp32 round trip. H100,
# fp16 D = 128 (docs/perf-notes.md, twentieth session): at 4 blocks (S = 512) it took 23 %
# more time, at 64 and 128 (8k, 16k) -2 % to +6 % speed (a tie within the runs' spread);
# tiles between those were not measured.
STREAM_K_MIN_BLOCKS = 64


def stream_k_grid(n_tiles: int, num_sms: int) -> int:
    """Programs of a stream-K launch that take one whole tile each (see :func:`stream_k`):
    all but the last one to two waves' worth of tiles, which the other ``num_sms`` programs
    share out evenly."""
    return num_sms * (n_tiles // num_sms - 1)


def stream_k(cfg: TritonFwdConfig, head_dim: int, is_causal: bool, sk: int, n_tiles: int,
             num_sms: int, enabled: bool | None = None) -> bool:
    """Whether a Gluon-kernel launch balances its last wave stream-K style: ``n_tiles`` tiles
    of equal cost on ``num_sms`` SMs, one program per tile, take ceil(n_tiles / num_sms)
    tile times (B1 H16 S16k D128: 2048 tiles, 16 waves for 15.5 waves of work). Instead
    :func:`stream_k_grid` programs take one tile each and the last ``num_sms`` programs split
    the (tile, key block) iterations of the remaining tiles evenly; a tile split between two
    programs is merged by the second to finish its part, through an fp32 workspace.

    Needs a config with the in-warpgroup pipeline on one program per tile (not persistent, no
    key split; the kernel and its shared memory are the config's own), a non-causal launch
    with whole key blocks (every block unmasked), at least :data:`STREAM_K_MIN_BLOCKS` of them
    a tile, at least two waves of tiles, and a last wave short enough that balancing it saves
    :data:`STREAM_K_MIN_GAIN` of the time; two consumer warpgroups, D <= 128.

    Opt-in, since it has not beaten one program per tile on the H100 beyond the runs' spread:
    ``FLASHCORE_STREAM_K=1`` turns it on (read when a launch plan is built; ``enabled``
    overrides the variable, e.g. for the resource gate, which compiles these variants whether
    or not dispatch uses them)."""
    if not (cfg.hopper and cfg.overlap) or cfg.persistent or cfg.ksplit or is_causal:
        return False
    # The merge's registers spill (ptxas) at D = 256 (12 bytes, 64-key blocks) and with three
    # consumers (160 registers each: 44-48 bytes at D = 64, the gate; 160 at D = 128).
    kd = hopper_head_dim(head_dim) or 256
    if kd > 128 or cfg.num_warps != 8:
        return False
    nb = sk // cfg.block_n  # key blocks a tile
    if sk % cfg.block_n or nb < STREAM_K_MIN_BLOCKS or n_tiles < 2 * num_sms:
        return False
    # The kernel's span arithmetic is 32-bit: tiles x key blocks, and a program's share of the
    # last waves' iterations times the program count, must stay below 2^31.
    if n_tiles * nb >= 2**31 or 2 * num_sms * num_sms * nb >= 2**31:
        return False
    if enabled is None:
        enabled = os.environ.get(STREAM_K_ENV, "0") == "1"
    if not enabled:
        return False
    waves = -(-n_tiles // num_sms)
    return 1 - n_tiles / (num_sms * waves) >= STREAM_K_MIN_GAIN


def hopper_grid(cfg: TritonFwdConfig, b: int, hq: int, sq: int, is_causal: bool,
                num_sms: int) -> tuple[int, int]:
    """(work units, programs launched) of the Gluon kernel for one problem: a unit is one tile
    of 64 rows per consumer (one shared 64-row tile with ksplit), or a pair of row blocks of one
    head on a persistent causal grid; a persistent grid launches at most one program per SM."""
    rows = cfg.block_m if cfg.ksplit else cfg.block_m * (cfg.num_warps // 4)
    n_m = -(-sq // rows)
    units = (n_m + 1) // 2 * b * hq if cfg.persistent and is_causal else n_m * b * hq
    return units, (min(units, num_sms) if cfg.persistent else units)


def hopper_fallback(cfg: TritonFwdConfig, head_dim: int) -> TritonFwdConfig:
    """The tl.dot config a launch uses when a Hopper-kernel config cannot run (not an sm_90
    GPU, a dtype or head dim it is not built for, or strides/pointers TMA cannot take): the
    heuristic's tl.dot tile for that head dim, its small-grid one for a key-split config."""
    if not cfg.hopper:
        return cfg
    if cfg.ksplit and block_d_for(head_dim) <= 128:
        return _small_grid_tile(head_dim)  # a key split runs where tiles are few
    if block_d_for(head_dim) > 128:
        return TritonFwdConfig(128, 64, 8, 2, tma=1)  # the heuristic's D = 256 tile
    return TritonFwdConfig(128, 64, 8, 3, tma=int(block_d_for(head_dim) > 64 or
                                                 head_dim != block_d_for(head_dim)))


def tma_fallback(cfg: TritonFwdConfig, head_dim: int) -> TritonFwdConfig:
    """The config a launch uses when its layout cannot go through the copy engine (strides or
    pointers not 16-byte aligned). Without TMA the loaded tiles pass through registers, so
    the largest head dims need narrower tiles to stay spill-free (m128n64w8s2 spills 152
    bytes at D = 256; m64n32w8s2 does not, per the gate, 2026-11-25)."""
    if cfg.hopper:
        cfg = hopper_fallback(cfg, head_dim)
    if not cfg.tma and not cfg.ws:
        return cfg
    if block_d_for(head_dim) > 128:
        return TritonFwdConfig(64, 32, 8, 2)
    return TritonFwdConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
