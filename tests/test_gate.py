"""The ptxas resource gate (flashcore gate): parser, budgets, enumeration, and that it fails.

Runs on the CPU. The compile tests need Triton's bundled ptxas (always there) and nvcc for the
CUDA fixtures (skipped without it). Recorded ptxas outputs live in tests/data/tools/ (see the
README there for how each was produced).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from flashcore import cli
from flashcore.tools import budgets as B
from flashcore.tools import gate
from flashcore.tools.ptxas import PtxasParseError, find_nvcc, parse_ptxas_log
from flashcore.tools.variants import (
    TRITON_DTYPES,
    TRITON_HEAD_DIMS,
    GateItem,
    TritonJob,
    cuda_items,
    triton_items,
    triton_space_items,
)

DATA = Path(__file__).parent / "data" / "tools"
FIXTURE_CU = DATA / "gate_fixture.cu"
# CI sets FLASHCORE_REQUIRE_NVCC=1: there a missing nvcc fails these tests instead of skipping.
needs_nvcc = pytest.mark.skipif(
    find_nvcc() is None and os.environ.get("FLASHCORE_REQUIRE_NVCC") != "1",
    reason="nvcc not installed",
)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["gate", *argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


# -- ptxas -v parser on recorded output --------------------------------------------------------


def test_parse_recorded_triton_clean():
    (f,) = parse_ptxas_log((DATA / "ptxas_triton_sm90a_clean.txt").read_text())
    assert (f.name, f.arch, f.entry) == ("_attn_fwd_kernel", "sm_90a", True)
    assert (f.registers, f.barriers) == (244, 1)
    assert (f.spill_stores, f.spill_loads, f.stack, f.smem_static) == (0, 0, 0, 0)


def test_parse_recorded_triton_spill():
    (f,) = parse_ptxas_log((DATA / "ptxas_triton_sm90a_spill.txt").read_text())
    assert f.registers == 168
    assert (f.spill_stores, f.spill_loads) == (3596, 4388)
    assert (f.stack_frame, f.cumulative_stack, f.stack) == (2360, 2360, 2360)


def test_parse_recorded_nvcc_two_archs_with_device_function():
    funcs = parse_ptxas_log((DATA / "ptxas_nvcc_multi_sm80_sm90.txt").read_text())
    got = {(f.name, f.arch): f for f in funcs}
    assert set(got) == {
        (n, a) for n in ("k_a", "k_b", "_Z6helperPKfi") for a in ("sm_80", "sm_90")
    }
    for arch in ("sm_80", "sm_90"):
        a, b, h = got["k_a", arch], got["k_b", arch], got["_Z6helperPKfi", arch]
        assert a.entry and b.entry and not h.entry
        assert (a.registers, a.stack_frame, a.cumulative_stack) == (24, 64, 64)
        assert (b.registers, b.stack, b.barriers) == (10, 0, 0)
        assert h.registers is None and h.stack == 0
    assert got["k_b", "sm_80"].cmem == 368 and got["k_b", "sm_90"].cmem == 0


def test_parse_static_smem_and_old_format_without_barriers():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 32 registers, 4096 bytes smem, 376 bytes cmem[0]\n"
    )
    (f,) = parse_ptxas_log(log)
    assert (f.registers, f.smem_static, f.barriers, f.spill_stores, f.stack) == (
        32, 4096, None, 4, 8)


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "no 'ptxas info'"),
        ("nvcc warning : something\n", "no 'ptxas info'"),
        ("ptxas info    : 0 bytes gmem\n", "no entry function"),
        (
            "ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
            "ptxas info    : Function properties for k\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n",
            "no register count",
        ),
    ],
)
def test_parse_never_passes_on_nothing(text, why):
    with pytest.raises(PtxasParseError, match=why):
        parse_ptxas_log(text)


# -- budgets -----------------------------------------------------------------------------------


def test_register_budget_follows_occupancy_target():
    assert B.register_budget(128, 2, 90) == 255  # 256, capped
    assert B.register_budget(128, 3, 90) == 168  # 170 rounded down to the unit of 8
    assert B.register_budget(256, 2, 90) == 128
    assert B.register_budget(64, 2, 80) == 255
    assert B.resident_blocks(256, 244, 128 * 1024, 90) == 1
    assert B.resident_blocks(128, 82, 14 * 1024, 90) == 5  # 88 regs allocated: 11 KiB/warp
    # sm_80 fits one 94 KiB block (164 KiB per SM), sm_90 two.
    assert B.resident_blocks(128, 190, 94 * 1024, 80) == 1
    assert B.resident_blocks(128, 190, 94 * 1024, 90) == 2


def test_occupancy_targets_are_data_and_most_specific_wins(monkeypatch):
    assert B.budget_for("triton", "m128n64w8s3", 8, 90).max_registers == 255
    rows = B.OCCUPANCY_TARGETS + (
        B.OccupancyTarget("triton", 3, "test row", num_warps=4, config="m64n64w4s3"),
        B.OccupancyTarget("triton", 4, "test row", num_warps=4, config="m64n64w4s3",
                          head_dims=(16,)),
    )
    monkeypatch.setattr(B, "OCCUPANCY_TARGETS", rows)
    assert B.budget_for("triton", "m64n64w4s3", 4, 90, head_dim=64).max_registers == 168
    assert B.budget_for("triton", "m64n64w4s3", 4, 90, head_dim=16).max_registers == 128
    assert B.budget_for("triton", "m128n64w4s3", 4, 90, head_dim=16).max_registers == 255


def test_budget_uses_the_launched_block_size():
    # Warp specialisation can launch more warps than the config names: the register budget
    # follows the real block (384 threads at 1 block/SM: 170 -> 168), the target the config.
    bud = B.budget_for("triton", "m128n64w8s3tws", 8, 90, threads=384)
    assert bud.blocks_per_sm == 1 and bud.max_registers == 168


def test_check_names_every_broken_budget():
    bud = B.budget_for("cuda", "w4n64s2", 4, 80)
    assert bud.max_smem_bytes == 163 * 1024
    got = B.check(bud, 200, 8, 12, 16, 200 * 1024)
    assert [b.budget for b in got] == ["spill_stores", "spill_loads", "stack", "smem"]
    assert B.check(bud, 255, 0, 0, 0, 163 * 1024) == []
    tight = B.budget_for("cuda", "w4n64s2", 4, 80, overrides=B.BudgetOverrides(max_registers=64))
    assert [str(b) for b in B.check(tight, 65, 0, 0, 0, 0)] == [
        "registers 65 regs/thread > budget 64 regs/thread"
    ]


def test_output_with_nothing_to_parse_is_an_error_not_a_pass():
    item = triton_items(head_dims=(16,), dtypes=("fp16",))[0]
    empty = gate.CompileOutput(True, "", None, [], 0, "-", 0.0)
    (row,) = gate.rows_for(item, empty, B.BudgetOverrides())
    assert not row.ok and row.verdict() == "ERROR"
    assert "could not parse" in row.error
    wrong = gate.CompileOutput(
        True, (DATA / "ptxas_nvcc_multi_sm80_sm90.txt").read_text(), None, [], 0, "-", 0.0
    )
    (row,) = gate.rows_for(item, wrong, B.BudgetOverrides())
    assert not row.ok and "no entry '_attn_fwd_kernel'" in row.error
    assert gate.breach_lines([row])[0].startswith("ERROR triton sm_90a")


def test_compiler_dumps_on_fd2_are_captured_and_summarised():
    import os

    with gate._captured_fd2() as dump:
        os.write(2, b"module {\n  %0 = tt.get_program_id x : i32\n}\n"
                    b"fwd.py:114:0: error: Failures have been detected\n"
                    b"fwd.py:114:0: note: Pipeline failed while executing\n")
        text = dump()
    assert "tt.get_program_id" in text
    assert gate._error_lines(text).splitlines() == [
        "fwd.py:114:0: error: Failures have been detected",
        "fwd.py:114:0: note: Pipeline failed while executing",
    ]


# -- enumeration -------------------------------------------------------------------------------


def test_triton_enumeration_covers_dispatch_and_dedupes():
    from flashcore.tuning.dispatch import heuristic_config
    from flashcore.tuning.key import ProblemKey

    items = triton_items()
    assert items
    jobs = [it.job for it in items]
    assert len(set(jobs)) == len(jobs)
    assert len({it.label for it in items}) == len(items)
    specs = [it.job.spec for it in items]
    assert {s.dtype for s in specs} == set(TRITON_DTYPES)
    assert {s.head_dim for s in specs} == set(TRITON_HEAD_DIMS)
    assert {s.is_causal for s in specs} == {False, True}
    assert all(it.arch == "sm_90a" for it in items)
    # Large-grid D = 64/128 problems on sm_90 get the Gluon kernel, the rest the tl.dot one.
    assert all(it.kernel == ("_attn_fwd_hopper_kernel" if it.job.spec.config.hopper
                             else "_attn_fwd_kernel") for it in items)
    assert {it.kernel for it in items} == {"_attn_fwd_kernel", "_attn_fwd_hopper_kernel"}
    # Both heuristic branches (few programs -> smaller tile, many -> big tile) are present.
    d64 = {s.config for s in specs if s.dtype == "fp16" and s.head_dim == 64}
    assert len(d64) >= 2
    # A TMA config comes with the config the launcher falls back to for other layouts.
    from flashcore.backends.triton.config import tma_fallback

    tma_specs = [s for s in specs if s.config.tma]
    assert tma_specs
    for s in tma_specs:
        fb = tma_fallback(s.config, s.head_dim)
        assert not fb.tma
        assert fb in {t.config for t in specs if t.head_dim == s.head_dim}
    # Every config the heuristic returns for these problems is enumerated.
    by_problem = {(s.dtype, s.head_dim, s.is_causal, s.config) for s in specs}
    for dt in ("fp16", "fp32"):
        for d in (40, 128):
            for bh, s in ((16, 256), (128, 2048)):
                key = ProblemKey.make("x", "9.0", "triton", dt, d, True, 1, s, s, bh)
                cfg = heuristic_config(key, bh, s, s, 132)
                assert (dt, d, True, cfg) in by_problem
    # Specialised like the launcher specialises contiguous BHSD tensors: unit strides are
    # compile-time 1, GQA group 1 too; the other strides are 16-divisible for D % 16 == 0.
    s = next(s for s in specs if s.head_dim == 128)
    names = ("stride_qb", "stride_qh", "stride_qs", "stride_qd")
    flags = dict(zip(names, s.int_flags[:4], strict=True))
    assert flags["stride_qd"] == (False, False, True)
    assert flags["stride_qs"] == (False, True, False)
    assert s.int_flags[19] == (False, False, True)  # GROUP == 1


def test_tables_are_enumerated_and_rejected_entries_skipped():
    notes: list[str] = []
    items = triton_items(DATA / "tables", notes)
    from_table = [it for it in items if any("h100.json" in o for o in it.origins)]
    assert [it.label for it in from_table] == ["triton sm_90a m128n128w8s2 fp16 d128 gqa4"]
    assert from_table[0].job.spec.int_flags[19] == (False, False, False)  # GROUP = 4
    assert any("num_stages': 7" in n and "rejected" in n for n in notes)
    plain = triton_items(DATA / "no-such-dir", notes)
    assert len(plain) == len(items) - 1
    assert any("no tuning tables" in n for n in notes)


def test_search_space_mode_enumerates_the_tuners_space():
    from flashcore.backends.triton.config import is_valid, search_space

    items = triton_space_items(("bf16",), (64,))
    cfgs = {it.job.spec.config for it in items}
    assert cfgs == set(search_space(64, 2)) and all(is_valid(c, 64, 2) for c in cfgs)
    assert len(items) == 2 * len(cfgs)  # causal and not
    assert all(it.origins == ["search space"] for it in items)


def test_cuda_enumeration_uses_the_backend_compiler():
    items = cuda_items()
    assert items and {it.arch for it in items} == {"sm_80", "sm_90"}
    assert len({it.job for it in items}) == len(items)
    for it in items:
        assert it.job.defines and all(d.startswith("-D") for d in it.job.defines)
        assert it.job.dynamic_smem > 0 and it.kernel == "flashcore_attn_fwd"


def test_missing_cuda_backend_is_a_setup_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flashcore.backends.cuda.compiler", None)
    rc, out = run_cli(capsys, "--backend", "cuda", "--list")
    assert rc == 2 and "cannot gate the CUDA backend" in out


# -- compiling for real ------------------------------------------------------------------------


def _first(items: list[GateItem], variant: str, arch: str) -> GateItem:
    """The first enumerated item of one variant (its config is whatever dispatch picks)."""
    return next(it for it in items if it.variant == variant and it.arch == arch)


def test_one_real_triton_config_compiles_and_parses():
    item = _first(triton_items(head_dims=(16,), dtypes=("fp16",)), "fp16 d16", "sm_90a")
    assert isinstance(item.job, TritonJob)
    (row,) = gate.run_gate([item], jobs=1)
    assert row.error is None, row.error
    assert row.function == "_attn_fwd_kernel" and row.item.arch == "sm_90a"
    assert 32 <= row.registers <= 255
    assert row.smem_dynamic >= 64 * 16 * 2 * 2  # at least one K and one V tile
    assert row.mma == "wgmma"
    assert row.command[0].endswith("ptxas") and "--gpu-name=sm_90a" in row.command


def test_tight_register_budget_fails_naming_config_and_budget(capsys, tmp_path):
    out_json = tmp_path / "gate.json"
    item = _first(triton_items(head_dims=(16,), dtypes=("fp16",)), "fp16 d16", "sm_90a")
    rc, out = run_cli(
        capsys, "--backend", "triton", "--filter", f"^{item.label}$",
        "--max-registers", "32", "--jobs", "1", "--json", str(out_json),
    )
    assert rc == 1
    fail = [ln for ln in out.splitlines() if ln.startswith("FAIL ")]
    assert len(fail) == 1
    assert fail[0].startswith(f"FAIL {item.label} [_attn_fwd_kernel]: registers ")
    assert "> budget 32 regs/thread" in fail[0]
    doc = json.loads(out_json.read_text())
    assert doc["passed"] is False and doc["rows"][0]["breaches"][0]["budget"] == "registers"
    assert doc["rows"][0]["config"] == item.config


@needs_nvcc
def test_cuda_fixture_clean_passes(capsys):
    rc, out = run_cli(capsys, "--backend", "cuda", "--cuda-source", str(FIXTURE_CU),
                      "--cuda-variant", "clean=-DFC_FIXTURE_MODE=0", "--jobs", "2")
    assert rc == 0, out
    assert "gate passed: 2 kernels" in out
    assert out.count("fixture_kernel") == 2  # sm_80 and sm_90 rows


@needs_nvcc
@pytest.mark.parametrize(
    "mode, budgets",
    [(1, {"stack"}), (2, {"spill_stores", "spill_loads", "stack"})],
)
def test_cuda_fixture_stack_and_spills_fail(capsys, mode, budgets):
    rc, out = run_cli(capsys, "--backend", "cuda", "--cuda-source", str(FIXTURE_CU),
                      "--cuda-variant", f"bad{mode}=-DFC_FIXTURE_MODE={mode}",
                      "--cuda-arch", "sm_90", "--jobs", "1")
    assert rc == 1
    (fail,) = [ln for ln in out.splitlines() if ln.startswith("FAIL ")]
    assert f"cuda sm_90 bad{mode}" in fail
    assert {b.split()[0] for b in fail.split(": ", 1)[1].split("; ")} == budgets


@needs_nvcc
def test_cuda_fixture_static_smem_counts_against_the_smem_budget(capsys):
    args = ("--backend", "cuda", "--cuda-source", str(FIXTURE_CU), "--cuda-arch", "sm_80",
            "--cuda-variant", "smem=-DFC_STATIC_SMEM=2048", "--jobs", "1")
    rc, out = run_cli(capsys, *args)
    assert rc == 0, out
    rc, out = run_cli(capsys, *args, "--max-smem-bytes", "4096")
    assert rc == 1 and "smem 8192 bytes > budget 4096 bytes" in out


def test_missing_nvcc_is_a_setup_error(capsys, monkeypatch):
    monkeypatch.setattr(gate, "find_nvcc", lambda: None)
    rc, out = run_cli(capsys, "--backend", "cuda", "--cuda-source", str(FIXTURE_CU))
    assert rc == 2 and "nvcc not found" in out


@needs_nvcc
def test_one_real_cuda_variant_compiles_and_parses():
    item = _first(cuda_items(archs=("sm_90",)), "fp16 d64", "sm_90")
    rows = gate.run_gate([item], jobs=1)
    assert [r.function for r in rows] == ["flashcore_attn_fwd"]
    assert rows[0].error is None and 32 <= rows[0].registers <= 255
    assert rows[0].smem_dynamic == item.job.dynamic_smem > 0

