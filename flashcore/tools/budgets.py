"""Resource budgets of the ptxas gate, declared in one place.

Every kernel variant dispatch can select must, as compiled by ptxas:
- spill nothing (0 bytes of spill stores and of spill loads): a spill in an attention inner
  loop is a local-memory round trip per tile;
- use no stack frame (0 bytes): a frame means local memory (a spill, a run-time indexed array
  or an ABI call), which FlashCore kernels never need;
- use at most the registers that let ``blocks_per_sm`` blocks of the config reside on one SM
  (the config's occupancy target, :data:`OCCUPANCY_TARGETS`): ``65536 / (threads * blocks)``
  rounded down to the allocation unit (8 per thread), capped at 255;
- use at most the card's per-block shared memory (227 KiB on sm_90, 163 KiB on sm_80;
  :mod:`flashcore.tools.hardware`), static plus dynamic.

The occupancy targets are data: one row per (backend, warps[, config][, head dims]), the most
specific match wins, each with the reason it holds. To hold a config to a higher occupancy,
add a row; the register budget follows from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .hardware import arch_limits

__all__ = [
    "MAX_SPILL_STORE_BYTES",
    "MAX_SPILL_LOAD_BYTES",
    "MAX_STACK_BYTES",
    "OCCUPANCY_TARGETS",
    "Budget",
    "BudgetOverrides",
    "Breach",
    "OccupancyTarget",
    "budget_for",
    "check",
    "occupancy_target",
    "register_budget",
    "resident_blocks",
]

MAX_SPILL_STORE_BYTES = 0
MAX_SPILL_LOAD_BYTES = 0
MAX_STACK_BYTES = 0


@dataclass(frozen=True)
class OccupancyTarget:
    """Blocks per SM a class of configs is designed to keep resident. ``None`` fields match
    anything; the most specific matching row (config, then head dims, then warps) wins."""

    backend: str
    blocks_per_sm: int
    why: str
    num_warps: int | None = None
    config: str | None = None  # the config's short() string, e.g. "m128n64w8s3"
    head_dims: tuple[int, ...] | None = None

    def matches(self, backend: str, num_warps: int, config: str, head_dim: int | None) -> bool:
        return (
            self.backend == backend
            and (self.num_warps is None or self.num_warps == num_warps)
            and (self.config is None or self.config == config)
            and (self.head_dims is None or head_dim in self.head_dims)
        )

    def specificity(self) -> tuple[bool, bool, bool]:
        return (self.config is not None, self.head_dims is not None, self.num_warps is not None)


# Both backends are FlashAttention-2-style kernels, designed around 8 resident warps per SM:
# one 8-warp block or two 4-warp blocks, enough to overlap one warp group's softmax with
# another's MMAs. The big-tile configs could not hold more anyway: their K/V ring fills the SM
# (Triton m128n64w8s3 at D=128 takes 128 KiB of the 228 KiB). At 8 warps the budget equals the
# 255-register cap, so today spills and stack are the binding budgets; a config meant to run
# at higher occupancy (e.g. 3 blocks of 4 warps: 168 registers) must say so with a row here.
OCCUPANCY_TARGETS: tuple[OccupancyTarget, ...] = (
    OccupancyTarget("triton", 2, "two 4-warp programs per SM (8 warps)", num_warps=4),
    OccupancyTarget("triton", 1, "one 8-warp program per SM (8 warps)", num_warps=8),
    # Dispatch picks 2-warp blocks only when 4-warp ones would not fill the SMs
    # (backends/cuda/config.py default_config), so at most two of them share an SM.
    OccupancyTarget("cuda", 2, "small grids only: at most two 2-warp blocks per SM", num_warps=2),
    OccupancyTarget("cuda", 2, "two 4-warp blocks per SM (8 warps)", num_warps=4),
    OccupancyTarget("cuda", 1, "one 8-warp block per SM (8 warps)", num_warps=8),
)


def occupancy_target(
    backend: str, num_warps: int, config: str, head_dim: int | None = None
) -> OccupancyTarget:
    """The declared target for a config; 8 warps per SM if no row matches."""
    rows = [r for r in OCCUPANCY_TARGETS if r.matches(backend, num_warps, config, head_dim)]
    if rows:
        return max(rows, key=OccupancyTarget.specificity)
    return OccupancyTarget(
        backend, max(1, 8 // max(num_warps, 1)), "default: 8 warps per SM", num_warps
    )


def register_budget(threads_per_block: int, blocks_per_sm: int, cc: int) -> int:
    """Most registers per thread that still let ``blocks_per_sm`` blocks reside on one SM."""
    lim = arch_limits(cc)
    per_thread = lim.regs_per_sm // (threads_per_block * blocks_per_sm)
    per_thread -= per_thread % lim.reg_alloc_unit_per_thread
    return min(per_thread, lim.max_regs_per_thread)


def resident_blocks(threads_per_block: int, registers: int, smem_bytes: int, cc: int) -> int:
    """Theoretical blocks per SM given registers per thread and shared memory per block (the
    occupancy calculator's register, shared-memory and warp limits)."""
    lim = arch_limits(cc)
    warps = -(-threads_per_block // 32)
    unit = lim.reg_alloc_unit_per_thread
    regs_per_warp = -(-max(registers, 1) // unit) * unit * 32
    by_regs = lim.regs_per_sm // (regs_per_warp * warps)
    by_warps = lim.max_warps_per_sm // warps
    by_smem = (
        lim.smem_per_sm // (smem_bytes + lim.reserved_smem_per_block)
        if smem_bytes > 0
        else lim.max_blocks_per_sm
    )
    return max(0, min(by_regs, by_warps, by_smem, lim.max_blocks_per_sm))


@dataclass(frozen=True)
class BudgetOverrides:
    """Command-line overrides (tests and experiments); ``None`` keeps the declared budget."""

    max_registers: int | None = None
    max_spill_bytes: int | None = None
    max_stack_bytes: int | None = None
    max_smem_bytes: int | None = None


@dataclass(frozen=True)
class Budget:
    max_registers: int
    max_spill_stores: int
    max_spill_loads: int
    max_stack_bytes: int
    max_smem_bytes: int
    blocks_per_sm: int  # the occupancy target the register budget comes from
    why: str  # where the register budget comes from, for the report

    def to_dict(self) -> dict:
        return asdict(self)


def budget_for(
    backend: str,
    config: str,
    num_warps: int,
    cc: int,
    head_dim: int | None = None,
    overrides: BudgetOverrides | None = None,
    threads: int | None = None,
) -> Budget:
    """The budget one compiled kernel is held to. ``num_warps`` is the config's (it selects
    the occupancy target); ``threads`` the block size the kernel really launches with, if the
    compiler changed it (Triton's warp specialisation adds warps)."""
    ov = overrides or BudgetOverrides()
    target = occupancy_target(backend, num_warps, config, head_dim)
    threads = threads or 32 * num_warps
    regs = register_budget(threads, target.blocks_per_sm, cc)
    why = f"{target.blocks_per_sm} block(s)/SM x {threads} threads: {target.why}"
    if ov.max_registers is not None:
        regs, why = ov.max_registers, "overridden on the command line"
    spill = ov.max_spill_bytes
    return Budget(
        max_registers=regs,
        max_spill_stores=MAX_SPILL_STORE_BYTES if spill is None else spill,
        max_spill_loads=MAX_SPILL_LOAD_BYTES if spill is None else spill,
        max_stack_bytes=MAX_STACK_BYTES if ov.max_stack_bytes is None else ov.max_stack_bytes,
        max_smem_bytes=(
            arch_limits(cc).max_smem_per_block
            if ov.max_smem_bytes is None
            else ov.max_smem_bytes
        ),
        blocks_per_sm=target.blocks_per_sm,
        why=why,
    )


@dataclass(frozen=True)
class Breach:
    """One budget a kernel broke: ``budget`` names it (registers, spill_stores, spill_loads,
    stack, smem), ``value`` and ``limit`` are in its unit."""

    budget: str
    value: int
    limit: int
    unit: str

    def __str__(self) -> str:
        return f"{self.budget} {self.value} {self.unit} > budget {self.limit} {self.unit}"


def check(
    budget: Budget,
    registers: int | None,
    spill_stores: int,
    spill_loads: int,
    stack_bytes: int,
    smem_bytes: int,
) -> list[Breach]:
    """Every budget the numbers break ([] when within all). ``registers=None`` (a device
    function, which has no register count of its own) skips the register budget."""
    out = []
    if registers is not None and registers > budget.max_registers:
        out.append(Breach("registers", registers, budget.max_registers, "regs/thread"))
    if spill_stores > budget.max_spill_stores:
        out.append(Breach("spill_stores", spill_stores, budget.max_spill_stores, "bytes"))
    if spill_loads > budget.max_spill_loads:
        out.append(Breach("spill_loads", spill_loads, budget.max_spill_loads, "bytes"))
    if stack_bytes > budget.max_stack_bytes:
        out.append(Breach("stack", stack_bytes, budget.max_stack_bytes, "bytes"))
    if smem_bytes > budget.max_smem_bytes:
        out.append(Breach("smem", smem_bytes, budget.max_smem_bytes, "bytes"))
    return out
