"""Config selection for backend="auto" and for a named backend: the user's tuning cache, then
the table shipped in the package, then the analytic heuristic.

- A named backend ("triton" / "cuda") looks up that backend's entries only.
- ``backend="auto"`` (a :class:`ProblemKey` whose backend is "auto") looks up both backends'
  entries in each source and takes the faster recorded time; with no entry it falls back to
  the Triton heuristic (the backend that supports every dtype and head dim).
- Every entry is validated against the current config space (the prune predicate) before it
  is used: a config the kernel can no longer run is skipped with a warning, never dispatched.
- Nothing here raises on bad files: a corrupt cache or table warns and is ignored.

``$FLASHCORE_DISPATCH`` restricts the sources, for benchmarks that compare them:
``all`` (default), ``table`` (shipped table, then heuristic: ignores the user's cache) or
``heuristic`` (the analytic default only).

Called once per problem (``flashcore.api`` memoises the Selection); file reads are lazy and
cached per process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .key import ProblemKey

__all__ = ["Selection", "select_config", "heuristic_config", "DISPATCH_ENV"]

DISPATCH_ENV = "FLASHCORE_DISPATCH"
_MODES = ("all", "table", "heuristic")


@dataclass(frozen=True)
class Selection:
    """What dispatch picked and why.

    backend: "triton" | "cuda" (never "auto": auto is resolved here). config: the backend's
    frozen config dataclass. source: "cache" | "table" | "heuristic". reason: one line for
    ``flashcore info``. time_us: the tuned time recorded for this entry (None for heuristic).
    """

    backend: str
    config: object  # the backend's frozen config dataclass
    source: str  # "cache" | "table" | "heuristic"
    reason: str
    time_us: float | None = None


def heuristic_config(key: ProblemKey, batch_heads: int, sq: int, sk: int, num_sms: int):
    """The backend's analytic default for this problem (Triton's for backend "auto")."""
    elem = 4 if key.dtype == "fp32" else 2
    if key.backend == "cuda":
        from ..backends.cuda.config import default_config as cuda_default
        from ..backends.cuda.config import smem_limit_for

        return cuda_default(key.head_dim, sq, sk, batch_heads, key.causal, num_sms=num_sms,
                            dtype=key.dtype, smem_limit=smem_limit_for(key.cc))
    from ..backends.triton.config import default_config

    return default_config(key.head_dim, sq, sk, batch_heads, key.causal, elem, num_sms,
                          sm90=key.cc == "9.0")


@dataclass(frozen=True)
class _Candidate:
    backend: str
    config: Any
    time_us: float
    reason: str


def _date(entry: dict[str, Any]) -> str:
    t = entry.get("tuned_at")
    return t[:10] if isinstance(t, str) and t else "unknown date"


def _vs_heuristic(entry: dict[str, Any]) -> str:
    h = entry.get("heuristic_time_us")
    if isinstance(h, (int, float)) and h > 0:
        return f"; heuristic {h:.1f} us"
    return ""


def _validated(key: ProblemKey, backend: str, entry: dict[str, Any], where: str) -> Any | None:
    """The entry's config object if the current config space accepts it, else None (warned)."""
    from .space import space_for

    space = space_for(backend, key.head_dim, key.dtype)
    try:
        cfg = space.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError) as e:
        warnings.warn(
            f"{where}: entry for {replace(key, backend=backend).to_str()} has a config that does "
            f"not fit {backend}'s config ({type(e).__name__}: {e}); ignored",
            _warning_category(), stacklevel=4,
        )
        return None
    if not space.contains(cfg):
        warnings.warn(
            f"{where}: {backend} config {entry['config']} for "
            f"{replace(key, backend=backend).to_str()} is not valid for the current kernel "
            "(outside its search space or rejected by its prune predicate); ignored",
            _warning_category(), stacklevel=4,
        )
        return None
    return cfg


def _warning_category() -> type[Warning]:
    from .cache import TuningCacheWarning

    return TuningCacheWarning


def _from_cache(key: ProblemKey, backends: tuple[str, ...], notes: list[str]) -> list[_Candidate]:
    from .cache import default_cache

    cache = default_cache()
    out = []
    for b in backends:
        entry, why = cache.lookup(replace(key, backend=b).to_str())
        if why is not None:
            notes.append(f"{b}: {why}")
        if entry is None:
            continue
        cfg = _validated(key, b, entry, f"tuning cache {cache.path}")
        if cfg is None:
            notes.append(f"{b}: cached config invalid for the current kernel")
            continue
        out.append(_Candidate(
            b, cfg, float(entry["time_us"]),
            f"user cache {cache.path} (tuned {_date(entry)}, {entry['time_us']:.1f} us"
            f"{_vs_heuristic(entry)})",
        ))
    return out


def _from_tables(key: ProblemKey, backends: tuple[str, ...], notes: list[str]) -> list[_Candidate]:
    from . import tables

    out = []
    for b in backends:
        for table, entry in tables.lookup(replace(key, backend=b).to_str(), key.gpu, key.cc):
            cfg = _validated(key, b, entry, f"shipped table {table.path}")
            if cfg is None:
                notes.append(f"{b}: table config invalid for the current kernel")
                continue
            older = "" if table.entry_current(entry) else "tuned for an older kernel, "
            out.append(_Candidate(
                b, cfg, float(entry["time_us"]),
                f"shipped table {table.name} ({older}tuned {_date(entry)}, "
                f"{entry['time_us']:.1f} us{_vs_heuristic(entry)})",
            ))
            break  # first table (by file name) holding this key wins for this backend
    return out


def _pick(cands: list[_Candidate], source: str, auto: bool) -> Selection:
    best = min(cands, key=lambda c: c.time_us)
    reason = best.reason
    if auto:
        others = [c for c in cands if c is not best]
        if others:
            o = others[0]
            reason += (
                f"; auto chose {best.backend} ({best.time_us:.1f} us) over {o.backend} "
                f"({o.time_us:.1f} us)"
            )
        else:
            reason += f"; auto: only {best.backend} is tuned for this key"
    return Selection(best.backend, best.config, source, reason, best.time_us)


def _mode() -> str:
    m = os.environ.get(DISPATCH_ENV, "all").strip().lower() or "all"
    if m not in _MODES:
        warnings.warn(
            f"${DISPATCH_ENV}={m!r} is not one of {_MODES}; using 'all'", _warning_category(),
            stacklevel=3,
        )
        return "all"
    return m


@functools.lru_cache(maxsize=1)
def _cuda_available() -> bool:
    """Whether the CUDA C++ backend can load here (its launcher and cuda.core are installed),
    without importing either. "auto" never dispatches to a backend that cannot run."""
    try:
        return (
            importlib.util.find_spec("cuda.core") is not None
            and importlib.util.find_spec("flashcore.backends.cuda.fwd") is not None
        )
    except (ImportError, ValueError):  # parent package "cuda" missing, or a broken install
        return False


def select_config(
    key: ProblemKey, batch_heads: int, sq: int, sk: int, num_sms: int
) -> Selection:
    """Pick the config for ``key``: user cache, then shipped table, then heuristic.

    ``key.backend`` may be "triton", "cuda" or "auto" (both, faster recorded time wins; cuda
    only where its backend is installed). Exact shapes are passed for the heuristic; tuned
    entries are looked up by the bucketed key.
    """
    auto = key.backend == "auto"
    notes: list[str] = []
    backends: tuple[str, ...] = (key.backend,)
    if auto:
        backends = ("triton", "cuda") if _cuda_available() else ("triton",)
        if len(backends) == 1:
            notes.append("auto: cuda backend not installed, triton only")
    mode = _mode()
    sources: list[tuple[str, Callable[..., list[_Candidate]]]] = []
    if mode == "all":
        sources.append(("cache", _from_cache))
    if mode in ("all", "table"):
        sources.append(("table", _from_tables))
    for source, find in sources:
        try:
            cands = find(key, backends, notes)
        except Exception as e:  # noqa: BLE001 - tuned data must never break attention()
            warnings.warn(
                f"flashcore dispatch: reading the {source} failed ({type(e).__name__}: {e}); "
                "skipped", _warning_category(), stacklevel=2,
            )
            notes.append(f"{source} unreadable")
            continue
        if cands:
            return _pick(cands, source, auto)
    hkey = replace(key, backend="triton") if auto else key
    cfg = heuristic_config(hkey, batch_heads, sq, sk, num_sms)
    if mode == "heuristic":
        why = f"heuristic: tuned entries disabled by ${DISPATCH_ENV}=heuristic"
    else:
        skipped = " (user cache skipped: $FLASHCORE_DISPATCH=table)" if mode == "table" else ""
        why = f"heuristic: no tuned entry for this shape bucket on {key.gpu} (cc {key.cc})"
        why += skipped
    if notes:
        why += "; " + "; ".join(notes)
    return Selection(hkey.backend, cfg, "heuristic", why)
