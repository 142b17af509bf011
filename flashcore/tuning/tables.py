"""Tuned-config tables shipped in the package: ``flashcore/tuning/tables/<gpu-slug>.json``.

Format (version 1)::

    {"version": 1, "gpu": "NVIDIA H100 80GB HBM3", "cc": "9.0", "fingerprint": "3f2a...",
     "entries": {"<ProblemKey.to_str()>": {"backend": "triton", "config": {...},
                                           "time_us": 41.2, "heuristic_time_us": 48.0, ...}}}

A table serves a GPU whose name and compute capability match its ``gpu`` and ``cc`` exactly
(keys carry both too). ``$FLASHCORE_TABLES_DIR`` points dispatch at another directory (tests,
or trying a table before committing it).

A table whose fingerprint differs from the current sources is *still used*, unlike a stale
user-cache entry: the shipped table is the only tuned data most users have, each entry is
validated against the current config space before use (so a config the kernel can no longer
run is never dispatched), and a config tuned for a slightly older kernel is still a better
start than the analytic heuristic. Dispatch says "tuned for an older kernel" in its reason, and
``flashcore tune --write-table`` refreshes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import (
    TuningCacheWarning,
    atomic_write_json,
    cache_dir,
    entry_problem,
    file_lock,
    fingerprint,
    read_json,
)

__all__ = [
    "TABLES_ENV",
    "TABLE_VERSION",
    "ShippedTable",
    "gpu_slug",
    "load_tables",
    "tables_dir",
    "write_table",
]

TABLES_ENV = "FLASHCORE_TABLES_DIR"
TABLE_VERSION = 1


def tables_dir() -> Path:
    env = os.environ.get(TABLES_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parent / "tables"


def gpu_slug(gpu: str) -> str:
    """File stem for a GPU's table: "NVIDIA H100 80GB HBM3" -> "h100"."""
    words = [w for w in re.split(r"[^a-z0-9]+", gpu.lower()) if w and w not in ("nvidia",)]
    return words[0] if words else "gpu"


@dataclass
class ShippedTable:
    name: str  # file name, e.g. "h100.json"
    path: Path
    gpu: str
    cc: str
    fingerprint: str | None
    entries: dict[str, Any] = field(default_factory=dict)

    def entry_current(self, entry: Mapping[str, Any]) -> bool:
        """True if ``entry`` was tuned with the current kernel sources and triton/CUDA
        versions (its own fingerprint, else the table's: merged tables mix tunings)."""
        return entry.get("fingerprint", self.fingerprint) == fingerprint()


def _parse(path: Path) -> tuple[ShippedTable | None, str | None]:
    data, why = read_json(path)
    if why is not None:
        return None, why
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return None, "not a FlashCore tuning table (no 'entries' object)"
    if data.get("version") != TABLE_VERSION:
        return None, f"format version {data.get('version')!r}, expected {TABLE_VERSION}"
    if not isinstance(data.get("gpu"), str) or not isinstance(data.get("cc"), str):
        return None, "'gpu' and 'cc' must be strings"
    fp = data.get("fingerprint")
    return ShippedTable(
        path.name, path, data["gpu"], data["cc"], fp if isinstance(fp, str) else None,
        data["entries"],
    ), None


_LOADED: dict[Path, tuple[tuple, list[ShippedTable]]] = {}
_WARNED: set[tuple] = set()


def load_tables(directory: Path | None = None) -> list[ShippedTable]:
    """Every readable table in ``directory`` (default :func:`tables_dir`), sorted by name.

    Cached per process, keyed by the directory listing's names, mtimes and sizes; a corrupt
    table warns once and is skipped.
    """
    d = directory if directory is not None else tables_dir()
    try:
        files = sorted(p for p in d.glob("*.json") if p.is_file())
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    except OSError:
        return []
    hit = _LOADED.get(d)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    tables = []
    for p, st in zip(files, stamp, strict=True):
        t, why = _parse(p)
        if t is None:
            if ("corrupt", st) not in _WARNED:
                _WARNED.add(("corrupt", st))
                warnings.warn(
                    f"shipped tuning table {p} is {why}; ignored", TuningCacheWarning,
                    stacklevel=2,
                )
            continue
        tables.append(t)
    _LOADED[d] = (stamp, tables)
    return tables


def lookup(key: str, gpu: str, cc: str) -> list[tuple[ShippedTable, dict[str, Any]]]:
    """(table, entry) for each table of this GPU holding a well-formed entry for ``key``."""
    out = []
    for t in load_tables():
        if t.gpu != gpu or t.cc != cc:
            continue
        e = t.entries.get(key)
        if e is None:
            continue
        bad = entry_problem(e)
        if bad is not None:
            if (t.path, key) not in _WARNED:
                _WARNED.add((t.path, key))
                warnings.warn(
                    f"shipped tuning table {t.path}: entry {key} ignored: {bad}",
                    TuningCacheWarning, stacklevel=2,
                )
            continue
        out.append((t, e))
    return out


def write_table(
    path: Path | str, gpu: str, cc: str, entries: Mapping[str, Mapping[str, Any]]
) -> Path:
    """Merge ``entries`` into the table at ``path`` (created if missing) and stamp it with the
    current fingerprint. Entries of the existing table that ``entries`` does not replace are
    kept, so a suite can be tuned in several runs. Refuses to mix GPUs in one table."""
    path = Path(path)
    for k, e in entries.items():
        bad = entry_problem(dict(e))
        if bad is not None:
            raise ValueError(f"refusing to write a malformed entry for {k}: {bad}")
    # The lock lives in the user's cache dir, not beside a table inside the package (a stray
    # .lock file in the source tree would show up in git).
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with file_lock(path, cache_dir() / "locks" / f"table-{digest}.lock"):
        current: dict[str, Any] = {}
        if path.exists():
            old, why = _parse(path)
            if old is None:
                raise ValueError(f"{path} exists but is {why}; move it away first")
            if (old.gpu, old.cc) != (gpu, cc):
                raise ValueError(
                    f"{path} holds a table for {old.gpu} (cc {old.cc}), not {gpu} (cc {cc}); "
                    "write each GPU's table to its own file"
                )
            current = dict(old.entries)
        current.update({k: dict(e) for k, e in entries.items()})
        atomic_write_json(path, {
            "version": TABLE_VERSION, "gpu": gpu, "cc": cc, "fingerprint": fingerprint(),
            "entries": current,
        })
    return path
