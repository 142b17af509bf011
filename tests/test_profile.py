"""flashcore profile: the ncu CSV parser, the summary and roofline, the ncu command, and the
clear errors (ncu missing, counters not readable, nothing profiled). CPU only: ncu is faked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flashcore import cli
from flashcore.tools import profile as P
from flashcore.tools.hardware import gpu_spec_for
from flashcore.tools.ncu import (
    NcuCsvError,
    parse_ncu_csv,
    parse_ncu_source_csv,
    parse_value,
    to_base_units,
)

DATA = Path(__file__).parent / "data" / "tools"
RAW = DATA / "ncu_fixture_raw.csv"
DETAILS = DATA / "ncu_fixture_details.csv"
# The fixtures describe this launch: Triton, fp16, B=4, Hq=32, S=4096, D=128, causal.
SHAPE = "4,32,4096,128"
PROBLEM = P.ProfileProblem(4, 32, 4096, 128, 32, 4096, "fp16", True)


# -- values and units --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("1,234.56", 1234.56), ("1,352,480", 1352480.0), ("0", 0.0), ("-3.5e+02", -350.0),
     ("(256, 1, 1)", None), ("n/a", None), ("CachePreferNone", None), ("", None)],
)
def test_parse_value(text, value):
    assert parse_value(text) == value


@pytest.mark.parametrize(
    "value, unit, base, base_unit",
    [(1.5, "usecond", 1.5e-6, "second"), (1.35, "msecond", 1.35e-3, "second"),
     (412.0, "nsecond", 412e-9, "second"), (2.0, "Kbyte/block", 2000.0, "byte/block"),
     (3.0, "Gbyte/second", 3e9, "byte/second"), (1.75, "cycle/nsecond", 1.75e9, "cycle/second"),
     (1.75, "Ghz", 1.75e9, "hz"), (412.35, "Mbyte", 412.35e6, "byte"), (5.0, "%", 5.0, "%"),
     (244.0, "register/thread", 244.0, "register/thread"), (7.0, "", 7.0, "")],
)
def test_to_base_units(value, unit, base, base_unit):
    got, got_unit = to_base_units(value, unit)
    assert got == pytest.approx(base) and got_unit == base_unit


# -- the CSV parser ----------------------------------------------------------------------------


def test_parse_raw_page_wide_layout_with_units_row():
    (rec,) = parse_ncu_csv(RAW.read_text())
    assert rec.kernel == "_attn_fwd_kernel" and rec.id == "0"
    assert rec.info["Block Size"] == "(256, 1, 1)" and rec.info["CC"] == "9.0"
    dur = rec.get("gpu__time_duration.sum")
    assert (dur.raw, dur.unit) == ("1,352,480", "nsecond")
    assert dur.value == pytest.approx(1.35248e-3)
    assert rec.value("dram__bytes_read.sum") == 412_345_600
    assert rec.value("launch__shared_mem_per_block_dynamic") == 131_072
    assert rec.value("dram__bytes.sum.per_second") == pytest.approx(503_367_289_445.6)
    assert "ID" not in rec.metrics and "Kernel Name" not in rec.metrics


def test_parse_details_page_long_layout():
    (rec,) = parse_ncu_csv(DETAILS.read_text())
    assert rec.kernel == "_attn_fwd_kernel"
    assert rec.value("Duration") == pytest.approx(1.35e-3)
    assert rec.get("Duration").section == "GPU Speed Of Light Throughput"
    assert rec.value("GPU Speed Of Light Throughput/SM Frequency") == pytest.approx(1.75e9)
    assert rec.value("Dynamic Shared Memory Per Block") == pytest.approx(131_070)
    assert rec.value("Elapsed Cycles") == 2_366_840
    assert rec.get("Function Cache Configuration").value is None
    assert rec.value("dram__bytes_read.sum") == pytest.approx(412.35e6)


def test_parse_groups_launches_and_tolerates_extra_columns():
    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Kernel Time",'
            '"Context","Stream","Section Name","Metric Name","Metric Unit","Metric Value"\n')
    row = ('"{id}","1","py","h","{k}","2024-May-01 10:00:00","1","7","","gpu__time_duration.sum",'
           '"usecond","{v}"\n')
    text = ("some program output\n" + head + row.format(id=0, k="other(int)", v="1.0")
            + row.format(id=1, k="_attn_fwd_kernel", v="2,000.5") + "trailing junk\n")
    recs = parse_ncu_csv(text)
    assert [r.kernel for r in recs] == ["other(int)", "_attn_fwd_kernel"]
    assert recs[1].value("gpu__time_duration.sum") == pytest.approx(2000.5e-6)


@pytest.mark.parametrize(
    "text", ["", "==PROF== Disconnected\n", '"ID","Process ID","Kernel Name","Metric Name"\n']
)
def test_parse_without_a_launch_raises(text):
    with pytest.raises(NcuCsvError):
        parse_ncu_csv(text)


# -- summary and roofline ----------------------------------------------------------------------


def test_attention_flops_counts_visible_pairs():
    full = P.ProfileProblem(2, 8, 100, 64, 8, 300, "fp16", False)
    assert P.attention_flops(full) == 4 * 2 * 8 * 100 * 300 * 64
    sq = P.ProfileProblem(1, 1, 4, 16, 1, 4, "fp16", True)
    assert P.attention_flops(sq) == 4 * 16 * (1 + 2 + 3 + 4)
    tall = P.ProfileProblem(1, 1, 6, 16, 1, 4, "bf16", True)  # rows 4, 5 see all 4 keys
    assert P.attention_flops(tall) == 4 * 16 * (1 + 2 + 3 + 4 + 4 + 4)


def _summary(path: Path) -> dict:
    (rec,) = parse_ncu_csv(path.read_text())
    spec, matched = gpu_spec_for("NVIDIA H100 80GB HBM3")
    assert matched and spec.name == "H100 SXM"
    return P.summarize(rec, PROBLEM, spec)


@pytest.mark.parametrize("path", [RAW, DETAILS], ids=["raw", "details"])
def test_summary_from_either_layout(path):
    s = _summary(path)
    assert s["duration_s"] == pytest.approx(1.3525e-3, rel=2e-3)
    assert s["sm_throughput_pct"] == pytest.approx(71.52)
    assert s["dram_throughput_pct"] == pytest.approx(15.03)
    assert s["achieved_occupancy_pct"] == pytest.approx(12.42)
    assert s["registers_per_thread"] == 244
    assert s["smem_per_block_bytes"] == pytest.approx(131_072, rel=1e-4)
    t = s["tensor_pipe"]
    assert t["pct"] == pytest.approx(58.7) and t["pipe"] == "gmma"
    assert [x["reason"] for x in s["stalls"][:5]] == [
        "math_pipe_throttle", "long_scoreboard", "wait", "not_selected", "barrier"]
    assert all(x["reason"] != "selected" for x in s["stalls"])
    r = s["roofline"]
    assert r["flops"] == 4 * 4 * 32 * 128 * (4096 * 4097 // 2)
    assert r["dram_vs_ideal"] == pytest.approx(680_781_056 / 536_870_912, rel=1e-4)
    assert r["arithmetic_intensity"] == pytest.approx(r["flops"] / 680_781_056, rel=1e-4)
    assert r["bound"] == "compute" and r["ridge_flop_per_byte"] == pytest.approx(989.4 / 3.35)
    assert r["achieved_flops"] == pytest.approx(r["flops"] / 1.35248e-3, rel=2e-3)
    assert r["pct_of_peak"] == pytest.approx(100 * r["achieved_flops"] / 989.4e12)


def test_mma_sync_kernel_reports_the_hmma_pipe():
    (rec,) = parse_ncu_csv(RAW.read_text())
    rec.metrics[P.TENSOR_HMMA].value = 40.0
    del rec.metrics[P.TENSOR_GMMA]  # an sm_80 report has no gmma metric at all
    s = P.summarize(rec, PROBLEM, gpu_spec_for("NVIDIA A100-SXM4-80GB")[0])
    assert s["tensor_pipe"]["pipe"] == "hmma" and s["tensor_pipe"]["pct"] == 40.0
    assert s["gpu_spec"]["name"] == "A100 SXM 80GB"


def test_fp32_without_tensor_cores_uses_the_fma_roof():
    (rec,) = parse_ncu_csv(RAW.read_text())
    for m in (P.TENSOR_HMMA, P.TENSOR_GMMA):
        rec.metrics[m].value = 0.0
    p32 = P.ProfileProblem(4, 32, 4096, 128, 32, 4096, "fp32", True)
    r = P.summarize(rec, p32, gpu_spec_for("H100")[0])["roofline"]
    assert r["peak_kind"] == "fp32 FMA" and r["peak_flops"] == 66.9e12


# -- the ncu command ---------------------------------------------------------------------------


def test_build_ncu_command_profiles_one_launch_without_touching_clocks():
    cmd = P.build_ncu_command((4, 32, 4096, 128, 8, 4096), "triton", "bf16", True, "basic",
                              warmup=5, report="r", info="i.json", ncu="/opt/ncu", python="py")
    s = " ".join(cmd)
    assert cmd[0] == "/opt/ncu"
    assert "--clock-control none" in s and "--cache-control all" in s
    # Both Triton entry points: the tl.dot kernel and, on sm_90, the Gluon Hopper kernel.
    assert ("--kernel-name regex:^(_attn_fwd_kernel|_attn_fwd_hopper_kernel) --launch-skip 5 "
            "--launch-count 1") in s
    assert "--export r" in s and "--set" not in cmd
    metrics = cmd[cmd.index("--metrics") + 1].split(",")
    assert "gpu__time_duration.sum" in metrics and P.TENSOR_GMMA in metrics
    assert cmd[cmd.index("--metrics") + 2:] == [
        "py", "-m", "flashcore.tools.profile_driver", "--shape", "4,32,4096,128,8,4096",
        "--backend", "triton", "--dtype", "bf16", "--warmup", "5", "--causal", "--info",
        "i.json"]
    a100 = P.build_ncu_command((1, 1, 128, 64, 1, 128), "cuda", cc=(8, 0), metrics="full")
    assert "regex:^(flashcore_attn_fwd)" in a100 and "--set" in a100
    assert P.TENSOR_GMMA not in a100[a100.index("--metrics") + 1]
    extra = P.metric_list("l1tex__t_bytes.sum, gpu__time_duration.sum")
    assert extra.count("gpu__time_duration.sum") == 1 and extra[-1] == "l1tex__t_bytes.sum"
    assert P.build_import_command("out/r") == [
        "ncu", "--import", "out/r.ncu-rep", "--csv", "--page", "raw", "--print-units", "base"]


# -- the CLI, with ncu missing or faked ---------------------------------------------------------


def run_profile(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["profile", "--shape", SHAPE, "--backend", "triton", "--causal", *argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_from_csv_prints_and_writes_json(capsys, tmp_path):
    out = tmp_path / "p.json"
    rc, text = run_profile(capsys, "--from-csv", str(RAW), "--json", str(out),
                           "--gpu", "NVIDIA H100 80GB HBM3")
    assert rc == 0, text
    for needle in ("duration          1352.48 us", "58.7 % busy (gmma pipe metric)",
                   "math_pipe_throttle", "compute-bound", "244 per thread"):
        assert needle in text
    doc = json.loads(out.read_text())
    assert doc["summary"]["registers_per_thread"] == 244
    assert doc["metrics"]["gpu__time_duration.sum"]["raw"] == "1,352,480"


def test_missing_ncu_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("NCU", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(P, "NCU_FALLBACK_DIRS", ())
    rc, text = run_profile(capsys, "--out-dir", str(tmp_path))
    assert rc == 2
    assert "ncu (Nsight Compute CLI) not found on PATH" in text


def _fake_ncu(tmp_path: Path, body: str) -> Path:
    """An executable named ncu on an otherwise empty PATH, running ``body`` (Python)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "ncu"
    exe.write_text(f"#!{sys.executable}\nimport sys\nargs = sys.argv[1:]\n{body}\n")
    exe.chmod(0o755)
    return bin_dir


def test_unreadable_counters_are_a_clear_error(capsys, monkeypatch, tmp_path):
    bin_dir = _fake_ncu(tmp_path, (
        "print('==PROF== Connected to process 1 (/usr/bin/python3)')\n"
        "print('==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access "
        "NVIDIA GPU Performance Counters on the target device 0.')\n"
        "sys.exit(1)"
    ))
    monkeypatch.setenv("PATH", str(bin_dir))
    rc, text = run_profile(capsys, "--out-dir", str(tmp_path / "o"))
    assert rc == 2
    assert "cannot read the GPU performance counters (ERR_NVGPUCTRPERM)" in text


def test_nothing_profiled_is_a_clear_error(capsys, monkeypatch, tmp_path):
    bin_dir = _fake_ncu(tmp_path, "print('==WARNING== No kernels were profiled.')")
    monkeypatch.setenv("PATH", str(bin_dir))
    rc, text = run_profile(capsys, "--out-dir", str(tmp_path / "o"))
    assert rc == 2 and "ncu profiled no kernel" in text and "_attn_fwd_kernel" in text


def test_full_run_through_a_fake_ncu(capsys, monkeypatch, tmp_path):
    # Profile step: create the report; import step: print the recorded raw CSV.
    bin_dir = _fake_ncu(tmp_path, (
        "if '--import' in args:\n"
        f"    print(open({str(RAW)!r}).read())\n"
        "else:\n"
        "    assert '--clock-control' in args and args[args.index('--clock-control') + 1] "
        "== 'none'\n"
        "    open(args[args.index('--export') + 1] + '.ncu-rep', 'w').write('report')\n"
    ))
    monkeypatch.setenv("PATH", str(bin_dir))
    out_dir = tmp_path / "o"
    rc, text = run_profile(capsys, "--out-dir", str(out_dir))
    assert rc == 0, text
    assert "peaks assumed: H100 SXM" in text  # the fake never ran the driver: no device name
    (js,) = out_dir.glob("*.json")
    doc = json.loads(js.read_text())
    assert js.name == "triton-fp16-4x32x4096x128-causal.json"
    assert doc["summary"]["duration_s"] == pytest.approx(1.35248e-3)
    assert doc["ncu_commands"][1][1:3] == ["--import", str(out_dir / js.stem) + ".ncu-rep"]


# -- real recordings (ncu on an H100, dropped in by the lead) -----------------------------------

REAL_DETAILS = DATA / "ncu_real_details.csv"
REAL_RAW = DATA / "ncu_real_raw.csv"


@pytest.mark.skipif(not REAL_DETAILS.exists(), reason="no real details-page recording")
def test_real_details_recording():
    # Metric rows stop before the rule columns; rule rows have no metric name; "n/a" values.
    (rec,) = parse_ncu_csv(REAL_DETAILS.read_text())
    assert rec.kernel == "_attn_fwd_kernel" and rec.info["Grid Size"] == "(16, 64, 1)"
    assert "" not in rec.metrics
    s = P.summarize(rec, None, gpu_spec_for("NVIDIA H100 80GB HBM3")[0])
    assert s["duration_s"] == pytest.approx(309_376e-9)
    assert s["sm_frequency_hz"] == pytest.approx(1_763_687_228.49)
    assert s["memory_throughput_pct"] == pytest.approx(42.49)  # the %, not the byte/s one
    assert s["registers_per_thread"] == 244
    assert s["smem_per_block_bytes"] == 131_072
    assert s["achieved_occupancy_pct"] == pytest.approx(12.47)
    assert s["dram_bytes"] == 127_071_232
    t = s["tensor_pipe"]
    assert t["gmma_pct"] is None and (t["pipe"], t["pct"]) == ("hmma", 48.79)


@pytest.mark.skipif(not REAL_RAW.exists(), reason="no real raw-page recording")
def test_real_raw_recording(capsys, tmp_path):
    (rec,) = parse_ncu_csv(REAL_RAW.read_text())
    assert rec.get("gpu__time_duration.sum").unit == "ns"
    assert rec.value("gpu__time_duration.sum") == pytest.approx(309_408e-9)
    assert rec.value("launch__registers_per_thread") == 244
    # The raw page names the card: the profile picks its peaks from there.
    rc = cli.main(["profile", "--shape", "4,16,2048,128", "--backend", "triton",
                   "--from-csv", str(REAL_RAW), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "on NVIDIA H100 80GB HBM3" in out and "peaks assumed" not in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["gpu_spec"]["name"] == "H100 SXM"


def _hopper_raw(tmp_path: Path) -> Path:
    """The raw-page fixture as a launch of the Gluon Hopper kernel."""
    raw = tmp_path / "hopper.csv"
    raw.write_text(RAW.read_text().replace("_attn_fwd_kernel", "_attn_fwd_hopper_kernel"))
    return raw


def test_a_hopper_kernel_launch_is_profiled(capsys, monkeypatch, tmp_path):
    """On sm_90 the Triton backend may launch the Gluon kernel: its record is the one kept."""
    raw = _hopper_raw(tmp_path)
    bin_dir = _fake_ncu(tmp_path, (
        "if '--import' in args:\n"
        f"    print(open({str(raw)!r}).read())\n"
        "else:\n"
        "    assert '_attn_fwd_hopper_kernel' in args[args.index('--kernel-name') + 1]\n"
        "    open(args[args.index('--export') + 1] + '.ncu-rep', 'w').write('report')\n"
    ))
    monkeypatch.setenv("PATH", str(bin_dir))
    rc, text = run_profile(capsys, "--out-dir", str(tmp_path / "o"))
    assert rc == 0, text
    (js,) = (tmp_path / "o").glob("*.json")
    assert json.loads(js.read_text())["summary"]["kernel"].startswith("_attn_fwd_hopper_kernel")


# -- the source view (PC sampling per SASS instruction) -----------------------------------------

SOURCE = DATA / "ncu_real_source_hopper.csv"
_SRC_HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)",'
               '"Warp Stall Sampling (Not-issued Samples)","Instructions Executed",'
               '"stall_wait","stall_wait (Not Issued)"')


def _page(name: str, rows: list[tuple[str, str, int]]) -> str:
    """A small source page: one launch of ``name`` with (address, sass, samples) rows, every
    sample a "wait" stall."""
    body = "\n".join(f'"{a}","{sass}","{n}","{n}","8","{n}","{n}"' for a, sass, n in rows)
    return f'"Kernel Name","{name}",\n{_SRC_HEADER}\n{body}\n'


def test_parse_source_page_keeps_sass_positions_and_stall_counts():
    ((name, lines),) = parse_ncu_source_csv("==PROF== Disconnected\n" + SOURCE.read_text())
    assert name == "_attn_fwd_hopper_kernel" and len(lines) == 237
    # The recording is trimmed: positions come from the addresses (16-byte instructions).
    assert [ln.index for ln in lines[:2]] == [0, 1] and lines[-1].index == 3289
    hot = next(ln for ln in lines if ln.index == 3238)
    assert hot.sass.startswith("@!P0  BRA") and hot.samples == 1099 and hot.executed == 40960
    assert hot.stalls["long_sb"] == 1093 and "long_sb (Not Issued)" not in hot.stalls
    assert sum(hot.stalls.values()) == hot.samples


def test_parse_source_page_keeps_each_launch_and_orders_positions():
    rows = [("0x100", "NOP", 1), ("0x120", "NOP", 2)]
    text = _page("k", rows) + _page("k", rows) + _page("other", [("pc?", "EXIT", 0)])
    pages = parse_ncu_source_csv(text)
    assert [(k, len(v)) for k, v in pages] == [("k", 2), ("k", 2), ("other", 1)]
    assert [ln.index for ln in pages[1][1]] == [0, 2]
    # Rows out of order or without a hex address still get increasing positions.
    (_, lines), = parse_ncu_source_csv(_page("k", [("0x200", "A", 0), ("0x100", "B", 0),
                                                    ("n/a", "C", 0), ("0x240", "D", 0)]))
    assert [ln.index for ln in lines] == [0, 1, 2, 4]


@pytest.mark.parametrize("text, match", [
    ("", "--page source"), ('"ID","Kernel Name"\n"1","k"\n', "--page source"),
    ("==PROF== nothing\n", "--page source"),
    ('"Kernel Name","k",\n"Address","Source","stall_wait"\n"0x0","NOP","3"\n',
     "Warp Stall Sampling"),
])
def test_parse_source_page_without_a_table_raises(text, match):
    with pytest.raises(NcuCsvError, match=match):
        parse_ncu_source_csv(text)


def test_source_summary_splits_the_partitions_at_setmaxnreg():
    ((_, lines),) = parse_ncu_source_csv(SOURCE.read_text())
    s = P.source_summary(lines, top=3)
    assert s["samples"] == 4127 and s["instructions"] == 237
    regs = [(r["first"], r["setmaxnreg"]) for r in s["regions"]]
    # The entry, then each partition sets its budget on entry and exit: two consumer
    # warpgroups at 240 registers, the producer at 24, glue at 120 / 256 between them.
    assert regs == [(0, None), (24, 120), (31, 240), (1456, 120), (1466, 240), (2850, 120),
                    (2853, 256), (3013, 24), (3269, 256)]
    producer = s["regions"][7]
    assert producer["samples"] == 3042 and producer["reasons"][0]["reason"] == "long_sb"
    assert [t["index"] for t in s["top"]] == [3238, 3218, 3118]
    assert all(t["region"] == 7 for t in s["top"])
    text = P.format_source_summary(s)
    assert "SASS  3013-3268  setmaxnreg 24   73.7 %  long_sb 86 %" in text
    assert "3238  26.6 % x40960" in text
    assert "setmaxnreg 256" not in text  # regions under 1 % of the samples are left out


def test_source_summary_without_samples():
    ((_, lines),) = parse_ncu_source_csv(_page("k", [("0x0", "USETMAXREG.DEALLOC 0x18", 0),
                                                     ("0x10", "NOP", 0)]))
    s = P.source_summary(lines, top=5)
    assert s["samples"] == 0 and s["top"] == []
    assert [(r["setmaxnreg"], r["share"]) for r in s["regions"]] == [(24, None)]
    assert "no samples" in P.format_source_summary(s)


def test_build_commands_for_the_source_view():
    cmd = P.build_ncu_command((1, 8, 512, 64, 8, 512), "triton", source=True)
    assert cmd[cmd.index("--section") + 1] == "SourceCounters"
    full = P.build_ncu_command((1, 8, 512, 64, 8, 512), "triton", metrics="full", source=True)
    assert "--set" in full and "--section" not in full  # the full set has the section
    assert P.build_source_import_command("o/r") == [
        "ncu", "--import", "o/r.ncu-rep", "--csv", "--page", "source", "--print-source", "sass"]


def test_from_csv_with_a_source_page(capsys, tmp_path):
    out = tmp_path / "p.json"
    rc, text = run_profile(capsys, "--from-csv", str(_hopper_raw(tmp_path)), "--source-csv",
                           str(SOURCE), "--source", "4", "--json", str(out))
    assert rc == 0, text
    assert "source view       4127 warp samples over 237 SASS instructions" in text
    doc = json.loads(out.read_text())
    assert len(doc["source"]["top"]) == 4 and doc["source"]["top"][0]["index"] == 3238
    assert doc["source_page_csv"] == str(SOURCE) and doc["source_error"] is None
    # Without --source the page is summarised with the default 20 instructions.
    rc, _ = run_profile(capsys, "--from-csv", str(_hopper_raw(tmp_path)), "--source-csv",
                        str(SOURCE), "--json", str(out))
    assert rc == 0 and len(json.loads(out.read_text())["source"]["top"]) == 20


def test_source_page_of_another_kernel_is_an_error_but_the_report_is_written(capsys, tmp_path):
    # The raw fixture is a launch of the tl.dot kernel; the source page is the Hopper kernel's.
    out = tmp_path / "p.json"
    rc, text = run_profile(capsys, "--from-csv", str(RAW), "--source-csv", str(SOURCE),
                           "--json", str(out))
    assert rc == 2
    assert "no launch of '_attn_fwd_kernel' (it has: '_attn_fwd_hopper_kernel')" in text
    doc = json.loads(out.read_text())
    assert doc["source"] is None and str(SOURCE) in doc["source_error"]
    assert doc["summary"]["kernel"] == "_attn_fwd_kernel"


@pytest.mark.parametrize("argv, needle", [
    (["--source-csv", str(SOURCE)], f"--source-csv {SOURCE} summarises a saved source page"),
    (["--source", "-1"], "--source -1: give the number of instructions"),
    (["--source", "3", "--from-csv", str(RAW)], "also give the saved source page"),
    (["--from-csv", str(RAW), "--source-csv", "/nonexistent/s.csv"],
     "--source-csv /nonexistent/s.csv: [Errno 2]"),
    (["--from-csv", str(SOURCE)], f"--from-csv {SOURCE}: no ncu CSV table found"),
])
def test_source_options_misused(capsys, argv, needle):
    rc, text = run_profile(capsys, *argv)
    assert rc == 2 and needle in text


def test_source_run_through_a_fake_ncu(capsys, monkeypatch, tmp_path):
    """--source: the profile run collects SourceCounters, a second import prints the source
    page, which is saved beside the report and summarised."""
    raw = _hopper_raw(tmp_path)
    bin_dir = _fake_ncu(tmp_path, (
        "if '--import' in args and 'source' in args:\n"
        f"    print(open({str(SOURCE)!r}).read())\n"
        "elif '--import' in args:\n"
        f"    print(open({str(raw)!r}).read())\n"
        "else:\n"
        "    assert args[args.index('--section') + 1] == 'SourceCounters'\n"
        "    open(args[args.index('--export') + 1] + '.ncu-rep', 'w').write('report')\n"
    ))
    monkeypatch.setenv("PATH", str(bin_dir))
    out_dir = tmp_path / "o"
    rc, text = run_profile(capsys, "--out-dir", str(out_dir), "--source", "2")
    assert rc == 0, text
    assert "hottest instructions" in text
    (saved,) = out_dir.glob("*.source.csv")
    assert saved.read_text().startswith('"Kernel Name"')
    doc = json.loads(next(out_dir.glob("*causal.json")).read_text())
    assert [t["index"] for t in doc["source"]["top"]] == [3238, 3218]
    assert doc["ncu_commands"][2][-3:] == ["source", "--print-source", "sass"]
    assert doc["source_page_csv"] == str(saved)


def test_failed_source_import_keeps_the_report(capsys, monkeypatch, tmp_path):
    raw = _hopper_raw(tmp_path)
    bin_dir = _fake_ncu(tmp_path, (
        "if '--import' in args and 'source' in args:\n"
        "    print('==ERROR== the report has no source counters'); sys.exit(1)\n"
        "elif '--import' in args:\n"
        f"    print(open({str(raw)!r}).read())\n"
        "else:\n"
        "    open(args[args.index('--export') + 1] + '.ncu-rep', 'w').write('report')\n"
    ))
    monkeypatch.setenv("PATH", str(bin_dir))
    out_dir = tmp_path / "o"
    rc, text = run_profile(capsys, "--out-dir", str(out_dir), "--source", "2")
    assert rc == 2 and "the source page could not be imported" in text
    doc = json.loads(next(out_dir.glob("*causal.json")).read_text())
    assert doc["source"] is None and "no source counters" in doc["source_error"]
    assert doc["summary"]["duration_s"] == pytest.approx(1.35248e-3)
