"""The environment a benchmark ran in: GPU, clocks, driver, versions, commit, date.

Everything is best effort: a field that cannot be read says so instead of failing the run.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = ["collect_env", "git_commit", "gpu_short_name", "nvidia_smi"]

_REPO = Path(__file__).resolve().parents[2]

# nvidia-smi --query-gpu fields: current and maximum clocks (MHz), power limit (W).
_SMI_FIELDS = (
    "name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
    "clocks.applications.graphics", "power.limit", "pstate",
)


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def nvidia_smi(index: int = 0) -> dict[str, str]:
    """Driver, clocks and power limit of GPU ``index`` from nvidia-smi ({} when unavailable).

    The index is nvidia-smi's, which matches torch's unless CUDA_VISIBLE_DEVICES reorders."""
    out = _run(["nvidia-smi", f"--id={index}", "--query-gpu=" + ",".join(_SMI_FIELDS),
                "--format=csv,noheader,nounits"])
    if not out:
        return {}
    vals = [v.strip() for v in out.splitlines()[0].split(",")]
    return {k: v for k, v in zip(_SMI_FIELDS, vals, strict=False)
            if v and "not supported" not in v.lower()}


def git_commit() -> str:
    """FLASHCORE_GIT_COMMIT if set (a copied tree whose .git is missing or stale says what it
    really is); else HEAD of the checkout flashcore runs from ('+dirty' with uncommitted
    tracked changes); else 'unknown'."""
    override = os.environ.get("FLASHCORE_GIT_COMMIT")
    if override:
        return override
    # Only a source checkout: an installed flashcore's parent may be some other repository.
    head = _run(["git", "rev-parse", "HEAD"], cwd=_REPO) if (_REPO / ".git").exists() else None
    if head:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO)
        return head + ("+dirty" if dirty else "")
    return "unknown"


def gpu_short_name(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'h100',
    'NVIDIA GeForce RTX 4090' -> 'rtx4090', 'cpu' -> 'cpu'."""
    words = [w for w in re.split(r"[\s_-]+", name.lower())
             if w and w not in ("nvidia", "geforce", "tesla", "quadro")]
    if not words:
        return "gpu"
    short = words[0] + (words[1] if words[0] in ("rtx", "gtx") and len(words) > 1 else "")
    return re.sub(r"[^a-z0-9]", "", short) or "gpu"


def _version(mod: str) -> str:
    try:
        return str(getattr(__import__(mod), "__version__", "installed"))
    except Exception as e:  # noqa: BLE001 - report, never fail
        return f"not available ({type(e).__name__})"


def collect_env(device: torch.device, interpret: bool = False) -> dict:
    """JSON-ready description of the machine and software."""
    import flashcore

    env: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "flashcore": flashcore.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "interpret": interpret,
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        env.update({
            "gpu": p.name,
            "cc": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_bytes": getattr(p, "L2_cache_size", None),
        })
        smi = nvidia_smi(idx)
        env["driver"] = smi.pop("driver_version", None)
        smi.pop("name", None)
        env["clocks"] = smi or "not readable (nvidia-smi unavailable)"
    else:
        env.update({"gpu": "cpu", "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count()})
    env["gpu_short"] = gpu_short_name(env["gpu"])
    return env
