"""``flashcore bench`` end to end on the CPU: interpret-mode smoke runs in a subprocess, the
no-CUDA exit, --from-json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bench_report import PNG_MAGIC, fake_result

import flashcore.cli
from flashcore.bench import report

ROOT = Path(__file__).resolve().parents[1]


# Triton 3.6's interpreter breaks with numpy >= 2.3 (`range` over runtime ints); the GPU host's
# environment may carry one, and these tests run the kernel through the interpreter.
_NP = tuple(int(x) for x in np.__version__.split(".")[:2])
needs_interpreter_numpy = pytest.mark.skipif(
    _NP >= (2, 3), reason=f"Triton 3.6's interpreter needs numpy < 2.3, found {np.__version__}"
)


def _bench(args: list[str], tmp_path: Path, interpret_env: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret_env:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "flashcore.cli", "bench", *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )


@needs_interpreter_numpy
def test_interpret_smoke_mission(tmp_path):
    """The whole pipeline on CPU: cases, providers (one real kernel through the interpreter),
    the reference check, timing, JSON, markdown and PNG."""
    proc = _bench(["--interpret", "--suite", "mission", "--reps", "2", "--wall-reps", "2",
                   "--rounds", "2", "--providers", "flashcore-triton,sdpa-cudnn", "--plot"],
                  tmp_path,
                  interpret_env=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("cpu-*-mission.json")
    data = json.loads(js.read_text())
    assert data["env"]["interpret"] is True and data["env"]["torch"] == torch.__version__
    assert data["settings"]["reps"] == 2 and data["settings"]["complete"] is True
    assert data["settings"]["rounds"] == 2  # one rep a round, the providers interleaved
    rows = {(r["causal"], r["provider"]): r for r in data["rows"]}
    # SDPA default is added as the baseline; every case x provider has a row.
    assert set(rows) == {(c, p) for c in (False, True)
                         for p in ("sdpa", "sdpa-cudnn", "flashcore-triton")}
    for causal in (False, True):
        fc = rows[(causal, "flashcore-triton")]
        assert fc["status"] == "ok", fc["reason"]
        assert fc["max_err"] <= fc["tol"] and fc["gpu"]["reps"] == 2
        assert fc["gpu"]["calls_per_rep"] == 3  # three rotating input sets
        assert fc["speedup_vs_sdpa"] > 0 and fc["tflops"] > 0
        assert (fc["sq"], fc["d"], fc["dtype"]) == (64, 64, "fp16")
        assert rows[(causal, "sdpa-cudnn")]["status"] == "unsupported"
    # Progress: one line per case and provider on stderr; the table on stdout.
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert len(progress) == 6 and progress[0].startswith("[1/2]")
    assert "flashcore-triton" in proc.stdout
    assert js.with_suffix(".md").read_text().startswith("Measured on **cpu**")
    if _has_matplotlib():
        assert js.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@needs_interpreter_numpy
def test_interpret_sets_the_interpreter_itself(tmp_path):
    """Without TRITON_INTERPRET in the environment, --interpret must still run the Triton
    kernel through the interpreter (the flag sets it before the backend is imported)."""
    proc = _bench(["--interpret", "--shape", "1,2,16,32", "--providers", "flashcore-triton",
                   "--reps", "1", "--wall-reps", "1", "--tag", "t"], tmp_path,
                  interpret_env=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("cpu-*-t.json")
    rows = {r["provider"]: r for r in json.loads(js.read_text())["rows"]}
    assert rows["flashcore-triton"]["status"] == "ok", rows["flashcore-triton"]["reason"]
    assert (rows["sdpa"]["b"], rows["sdpa"]["sq"], rows["sdpa"]["d"]) == (1, 16, 32)


def test_without_matplotlib_json_and_markdown_still_written(tmp_path):
    """The GPU machine may lack matplotlib: --plot must not cost the results."""
    code = ("import sys; sys.modules['matplotlib'] = None; import flashcore.cli; "
            "sys.exit(flashcore.cli.main(sys.argv[1:]))")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code, "bench", "--interpret", "--shape", "1,1,8,16",
         "--providers", "sdpa", "--reps", "1", "--wall-reps", "1", "--plot", "--tag", "m",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("cpu-*-m.json")
    assert js.with_suffix(".md").exists() and not js.with_suffix(".png").exists()
    assert f"--from-json {js}" in proc.stderr and "matplotlib is not installed" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_exits_2_with_a_message(tmp_path, capsys):
    assert flashcore.cli.main(["bench", "--suite", "mission", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--interpret" in err
    assert not list(tmp_path.iterdir())


def test_more_rounds_than_reps_exits_2_before_any_run(capsys, tmp_path):
    rc = flashcore.cli.main(["bench", "--shape", "1,1,8,16", "--reps", "2",
                             "--rounds", "3", "--out", str(tmp_path)])
    assert rc == 2 and "--rounds must be between 1 and --reps (2), got 3" in (
        capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_unknown_provider_exits_2(capsys, tmp_path):
    rc = flashcore.cli.main(["bench", "--providers", "sdpa,nope",
                             "--out", str(tmp_path)])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_from_json_remakes_markdown_and_png(tmp_path, capsys):
    res = fake_result()
    a = report.write_json(res, tmp_path / "in" / "h100-2026-11-25-sweep.json")
    out = tmp_path / "out"
    argv = ["bench", "--from-json", str(a), "--out", str(out)]
    if _has_matplotlib():
        argv.append("--plot")
    assert flashcore.cli.main(argv) == 0
    md = (out / "h100-2026-11-25-sweep.md").read_text()
    assert md == report.markdown(res)
    if _has_matplotlib():
        assert (out / "h100-2026-11-25-sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert "flashcore-triton" in capsys.readouterr().out


def test_from_json_merges_runs(tmp_path):
    res = fake_result()
    mission = fake_result()
    mission.rows = [r for r in mission.rows if r.case.suite == "mission"]
    res.rows = [r for r in res.rows if r.case.suite == "sweep"]
    a = report.write_json(mission, tmp_path / "a.json")
    b = report.write_json(res, tmp_path / "b.json")
    assert flashcore.cli.main(["bench", "--from-json", str(a), str(b),
                               "--out", str(tmp_path)]) == 0
    md = (tmp_path / "h100-2026-11-25.md").read_text()
    assert "#### mission" in md and "#### sweep fp16" in md
