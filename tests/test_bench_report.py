"""Report writers from a fake result set: console, JSON round trip, markdown, PNG."""

from __future__ import annotations

import json
import math
import sys

import pytest

from flashcore.bench import report
from flashcore.bench.env import gpu_short_name
from flashcore.bench.runner import BenchResult, Row, derive_metrics
from flashcore.bench.suites import Case, suite_cases
from flashcore.bench.timing import TimingStats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ENV = {
    "gpu": "NVIDIA H100 80GB HBM3", "gpu_short": "h100", "sm_count": 132,
    "date": "2026-11-25T10:00:00+00:00", "git_commit": "0123456789abcdef", "torch": "2.13.0",
    "triton": "3.6.0", "cuda": "12.8", "cudnn": 91000, "driver": "570.1",
    "clocks": {"clocks.max.sm": "1980"},
}
# Fake TFLOP/s per provider; the time follows from each case's FLOPs.
FAKE_TFLOPS = {"sdpa": 400.0, "flex": 300.0, "flashcore-triton": 500.0}


def _stats(us: float) -> TimingStats:
    return TimingStats(us, 0.95 * us, 1.1 * us, us, 0.9 * us, 100, 3, "cuda-graph")


def fake_result() -> BenchResult:
    rows = []
    for case in suite_cases("mission") + suite_cases("sweep"):
        for prov, tf in FAKE_TFLOPS.items():
            if prov == "flex" and case.d == 256 and case.causal:
                rows.append(Row(case, prov, "unfused-fallback", "no fused flex kernel ran"))
                continue
            if prov == "flashcore-triton" and case.sq == 16384 and case.dtype == "bf16":
                rows.append(Row(case, prov, "mismatch", "max error 0.5 > tol 0.01 at ...",
                                max_err=math.inf, tol=0.01))
                continue
            us = case.flops() / (tf * 1e6)
            rows.append(Row(case, prov, "ok", max_err=1e-3, tol=1e-2, n_sets=3, l2_cold=True,
                            gpu=_stats(us), wall=_stats(us + 20.0)))
    derive_metrics(rows, 800.0)
    return BenchResult(rows, dict(ENV), {"reps": 100, "timer": "cuda-graph"}, 800.0)


def test_fake_result_metrics():
    res = fake_result()
    r = next(r for r in res.rows if r.provider == "flashcore-triton" and r.status == "ok")
    assert r.tflops == pytest.approx(500.0)
    assert r.pct_peak == pytest.approx(62.5)
    assert r.speedup_vs_sdpa == pytest.approx(500 / 400)


def test_json_round_trip(tmp_path):
    res = fake_result()
    path = report.write_json(res, tmp_path / "sub" / "r.json")
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    data = json.loads(text)
    assert data["schema"] == report.SCHEMA and data["env"]["gpu"] == ENV["gpu"]
    assert data["peak_tflops_bf16"] == 800.0
    assert len(data["rows"]) == len(res.rows)
    row0 = data["rows"][0]
    for key in ("b", "hq", "hkv", "sq", "sk", "d", "dtype", "causal", "suite", "flops",
                "provider", "status", "gpu", "wall", "tflops", "pct_peak", "speedup_vs_sdpa"):
        assert key in row0
    assert set(row0["gpu"]) >= {"median_us", "p10_us", "p90_us", "reps", "calls_per_rep"}
    back = report.load_json(path)
    assert back.rows == res.rows  # inf max_err survives as well
    assert back.env == res.env and back.peak_tflops == 800.0


def test_load_json_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a flashcore bench result"):
        report.load_json(p)


def test_merge_results_keeps_later_rows_and_refuses_mixed_gpus():
    a, b = fake_result(), fake_result()
    b.rows = [r for r in b.rows if r.case.suite == "mission"]
    for r in b.rows:
        r.reason = "second run"
    merged = report.merge_results([a, b])
    assert len(merged.rows) == len(a.rows)
    assert all(r.reason == "second run" for r in merged.rows if r.case.suite == "mission")
    b.env = {**b.env, "gpu": "NVIDIA A100"}
    with pytest.raises(ValueError, match="different devices"):
        report.merge_results([a, b])


def test_merge_records_every_run_and_drops_a_peak_they_disagree_on():
    a, b = fake_result(), fake_result()
    b.env = {**b.env, "git_commit": "bbbbbbbbbb"}
    b.peak_tflops = 700.0
    merged = report.merge_results([a, b])
    assert merged.peak_tflops is None
    assert merged.env["git_commit"] == f"{str(a.env['git_commit'])[:7]}+bbbbbbb"
    runs = merged.settings["merged_from"]
    assert [r["peak_tflops_bf16"] for r in runs] == [800.0, 700.0]
    md = report.markdown(merged)
    assert "commit bbbbbbb, bf16 matmul peak 700" in md and "per run, above" in md


def test_console_table():
    res = fake_result()
    res.rows[1].gpu.method = "cuda-events (graph capture failed: no)"
    text = report.format_console(res)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["case", "provider", "GPU"]
    mission = next(ln for ln in lines if ln.startswith("B1 H8 S512 D64 fp16 "))
    assert "sdpa" in mission and "1.00" in mission
    flex = lines[lines.index(mission) + 1]
    assert "flex" in flex and flex.endswith("[cuda-events (graph capture failed: no)]")
    assert any("unfused-fallback" in ln for ln in lines)
    assert any("mismatch (err inf > tol 0.01)" in ln for ln in lines)


def test_markdown_tables():
    md = report.markdown(fake_result())
    assert "NVIDIA H100 80GB HBM3" in md and "132 SMs" in md and "commit 0123456789ab" in md
    assert "#### mission: B1 H8 S512 D64 fp16" in md
    # Mission: one line per (mask, provider) with µs, wall, TFLOP/s, % peak, × SDPA.
    line = next(ln for ln in md.splitlines() if ln.startswith("| causal | flashcore-triton |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] == "500.0" and cells[6] == "62.5" and cells[7] == "1.25"
    # Sweep: TFLOP/s by S, one table per dtype, a line per (mask, D, provider).
    assert md.count("#### sweep") == 2
    header = next(ln for ln in md.splitlines() if ln.startswith("| Mask | D | Provider |"))
    assert header.split("|")[4].strip() == "S=512" and "S=16k" in header
    fp16 = md[md.index("#### sweep fp16"):md.index("#### sweep bf16")]
    bf16 = md[md.index("#### sweep bf16"):]
    flex = next(ln for ln in fp16.splitlines() if ln.startswith("| causal | 256 | flex |"))
    assert flex.count("| fb ") == 6
    fc = next(ln for ln in bf16.splitlines()
              if ln.startswith("| non-causal | 64 | flashcore-triton |"))
    assert fc.rstrip(" |").endswith("✗") and fc.count("| 500 ") == 5
    assert "fb Flex fell back" in md  # legend


def test_markdown_says_when_providers_ran_out_of_registry_order():
    res = fake_result()
    assert "Providers ran" not in report.markdown(res)  # the default says nothing
    res.settings.update(order="alternate", gap_s=2.0)
    md = report.markdown(res)
    assert "reversed on even ones, with a 2 s idle gap before each timed round." in md
    res.settings.update(order="reverse", gap_s=0.0)
    assert "Providers ran in reverse registry order (SDPA last)." in report.markdown(res)
    other = fake_result()  # registry order, no gap
    merged = report.merge_results([res, other])
    assert "different orders or with different idle gaps" in report.markdown(merged)
    assert "Providers ran" not in report.markdown(report.merge_results([other, fake_result()]))


def test_output_stem():
    assert report.output_stem(ENV) == "h100-2026-11-25"
    assert report.output_stem(ENV, "sweep") == "h100-2026-11-25-sweep"


@pytest.mark.parametrize("name,short", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx4090"), ("cpu", "cpu"),
])
def test_gpu_short_name(name, short):
    assert gpu_short_name(name) == short


def test_png_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    assert report.write_plot(fake_result(), path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_plot_layout_sweep_curves():
    rws, cols, groups, curves = report.plot_layout(fake_result())
    assert curves  # the mission's single S is left out when there are S curves
    assert cols == [("sweep", 64, 1), ("sweep", 128, 1), ("sweep", 256, 1)]
    assert rws == [("fp16", False), ("fp16", True), ("bf16", False), ("bf16", True)]
    panel = groups[(("sweep", 128, 1), ("bf16", True))]
    assert {r.provider for r in panel} == set(FAKE_TFLOPS)
    assert {r.case.sq for r in panel} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(r.status == "ok" for rows in groups.values() for r in rows)


def test_png_plot_of_single_shapes(tmp_path):
    pytest.importorskip("matplotlib")
    res = fake_result()
    res.rows = [r for r in res.rows if r.case.suite == "mission"]
    rws, cols, groups, curves = report.plot_layout(res)
    assert not curves and cols == [("mission", 64, 1)] and len(rws) == 2
    assert report.write_plot(res, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG_MAGIC


def test_png_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert report.write_plot(fake_result(), tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists()


def test_case_round_trip_through_row_dict():
    c = Case(3, 4, 2, 5, 7, 16, "bf16", True, "custom")
    r = Row(c, "sdpa", "ok", gpu=_stats(1.0))
    assert Row.from_dict(r.to_dict()) == r


def test_git_commit_override_wins(monkeypatch):
    """A copied tree may carry a stale .git: FLASHCORE_GIT_COMMIT says what it really is."""
    from flashcore.bench.env import git_commit

    monkeypatch.setenv("FLASHCORE_GIT_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.delenv("FLASHCORE_GIT_COMMIT")
    assert git_commit() != "abc1234"


def test_markdown_says_how_the_repetitions_were_split():
    res = fake_result()
    assert "rounds interleaved" not in report.markdown(res)  # no "rounds": one block (old runs)
    res.settings.update(rounds=4)
    assert ("repetitions (4 rounds interleaved with the case's other providers, the order "
            "reversing every round), by") in report.markdown(res)
    assert "reps (4 rounds interleaved" in report.format_console(res)
    merged = report.merge_results([res, fake_result()])
    assert merged.settings["rounds"] == "mixed"
    assert "interleaved rounds in others" in report.markdown(merged)


def test_reports_say_whether_the_wall_rounds_were_interleaved():
    res = fake_result()  # an old run: no wall_rounds key, each provider's rounds back to back
    assert "quietest of 5 rounds)" in report.markdown(res)
    assert "interleaved with the case's other providers)" not in report.markdown(res)
    res.settings.update(rounds=4, wall_rounds="interleaved")
    for text in (report.markdown(res), report.format_console(res)):
        assert "quietest of 5 rounds, the rounds interleaved with the case's other providers)" \
            in text
    merged = report.merge_results([res, fake_result()])
    assert "wall_rounds" not in merged.settings
    assert "quietest of 5 rounds)" in report.markdown(merged)
