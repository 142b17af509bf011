"""The user's tuning cache: a JSON file of tuned configs, safe to share between processes.

Where: ``$FLASHCORE_CACHE_DIR/tuning.json``, else ``$XDG_CACHE_HOME/flashcore/tuning.json``,
else ``~/.cache/flashcore/tuning.json``.

Format (version 1)::

    {"version": 1,
     "entries": {"<ProblemKey.to_str()>": {
         "backend": "triton", "config": {"block_m": 128, ...}, "time_us": 41.2,
         "heuristic_time_us": 48.0, "fingerprint": "3f2a...", "tuned_at": "2026-11-25T10:00:00Z",
         "method": "evo", "evaluations": 13, "grid_size": 51}}}

Each entry carries the :func:`fingerprint` of the kernel sources and triton/CUDA versions it was
tuned with. An entry with another fingerprint is *stale*: a kernel edit or a compiler upgrade
can move the optimum (or make a config fail), so it is ignored with a warning until the problem
is tuned again. A corrupt file is ignored with a warning (never an exception on the attention
path) and replaced on the next write, its bytes kept beside it as ``tuning.json.corrupt``.

Writers take an exclusive ``fcntl.flock`` on ``tuning.json.lock`` around read-modify-write and
replace the file atomically (temp file in the same directory + ``os.replace``), so two
``flashcore tune`` processes never lose each other's entries and readers, which take no lock,
never see a half-written file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_ENV",
    "CACHE_VERSION",
    "TuningCache",
    "TuningCacheWarning",
    "atomic_write_json",
    "cache_dir",
    "cache_path",
    "default_cache",
    "file_lock",
    "fingerprint",
    "make_entry",
    "now_utc",
]

CACHE_ENV = "FLASHCORE_CACHE_DIR"
CACHE_VERSION = 1
CACHE_FILE = "tuning.json"

# Files whose text decides what a config does on the GPU: the kernels, their launchers
# (fwd.py, fwd_hopper.py: how a config's fields become constexprs, grids and launch
# arguments) and the CUDA compile helper (NVRTC flags, -D defines). An edit to any of them
# may move a config's optimum, so entries tuned before it are stale. Not the config modules
# (search spaces, prune predicates, heuristics): they decide which configs are tried or
# picked, not what a given config runs, and editing a heuristic must not throw away a table.
# Relative to flashcore/.
_FINGERPRINT_GLOBS = (
    "backends/**/fwd.py", "backends/**/fwd_*.py", "backends/**/compiler.py", "backends/**/*.cu",
    "backends/**/*.cuh",
)


class TuningCacheWarning(UserWarning):
    """A tuning cache or shipped table was ignored (corrupt, stale, or an invalid entry)."""


def cache_dir() -> Path:
    """Directory of the user's tuning cache (``$FLASHCORE_CACHE_DIR`` moves it)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flashcore"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _dist_version(name: str) -> str:
    # importlib.metadata reads the installed version without importing triton (slow, and
    # `flashcore info` must stay fast on a machine without a GPU).
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """Hash of FlashCore's kernel sources + triton version + torch's CUDA version (16 hex).

    Computed once per process: the sources do not change under a running program.
    """
    import torch

    h = hashlib.sha256()
    root = _package_root()
    files = sorted({p for g in _FINGERPRINT_GLOBS for p in root.glob(g) if p.is_file()})
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    h.update(f"triton={_dist_version('triton')}\0cuda={torch.version.cuda}".encode())
    return h.hexdigest()[:16]


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_entry(
    backend: str, config: Mapping[str, Any], time_us: float, *,
    heuristic_time_us: float | None = None, method: str = "evo", evaluations: int | None = None,
    grid_size: int | None = None, fp: str | None = None, tuned_at: str | None = None,
) -> dict[str, Any]:
    """One cache/table entry in the on-disk format."""
    return {
        "backend": backend,
        "config": dict(config),
        "time_us": round(float(time_us), 4),
        "heuristic_time_us": None if heuristic_time_us is None else round(heuristic_time_us, 4),
        "fingerprint": fp or fingerprint(),
        "tuned_at": tuned_at or now_utc(),
        "method": method,
        "evaluations": evaluations,
        "grid_size": grid_size,
    }


def entry_problem(entry: Any) -> str | None:
    """Why ``entry`` is malformed, or None if it has the fields dispatch relies on."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, not an object"
    if entry.get("backend") not in ("triton", "cuda"):
        return f"backend {entry.get('backend')!r} is not 'triton' or 'cuda'"
    if not isinstance(entry.get("config"), dict):
        return "config is missing or not an object"
    t = entry.get("time_us")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        return f"time_us {t!r} is not a positive number"
    return None


# -- file primitives ---------------------------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path, lock_path: Path | None = None) -> Iterator[None]:
    """Exclusive advisory lock on ``lock_path`` (default ``<path>.lock``: a sidecar, so the
    data file itself can be replaced atomically while the lock is held). A no-op where fcntl
    does not exist (Windows): there concurrent tuners may lose each other's entries, but never
    corrupt the file."""
    lock_path = lock_path or path.with_name(path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that readers see the old file or the new one,
    never a prefix: temp file in the same directory (same filesystem), fsync, os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is not a secret
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None), or (None, why) if the file is missing, unreadable or not JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e})"


def _warn(msg: str) -> None:
    warnings.warn(msg, TuningCacheWarning, stacklevel=3)


# -- the cache ---------------------------------------------------------------------------------


class TuningCache:
    """The user's cache file. Reads are lazy, cached per process and refreshed when the file
    changes (so a ``flashcore tune`` in another process is picked up); writes lock and merge."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else cache_path()
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, Any] = {}
        self._warned: set[tuple[str, str]] = set()

    # reading

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def entries(self) -> dict[str, Any]:
        """Every entry of the file (stale ones included); {} if missing or corrupt."""
        stamp = self._stat()
        if stamp is None:
            self._stamp, self._entries = None, {}
            return self._entries
        if stamp != self._stamp:
            self._stamp = stamp
            data, why = read_json(self.path)
            entries, why = self._check_file(data, why)
            if why is not None and why != "missing":
                self._warn_once(
                    "corrupt", f"tuning cache {self.path} is {why}; ignored. The next "
                    "`flashcore tune` replaces it (keeping the old bytes as "
                    f"{self.path.name}.corrupt)",
                )
            self._entries = entries
        return self._entries

    @staticmethod
    def _check_file(data: Any, why: str | None) -> tuple[dict[str, Any], str | None]:
        if why is not None:
            return {}, why
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            return {}, "not a FlashCore tuning cache (no 'entries' object)"
        if data.get("version") != CACHE_VERSION:
            return {}, f"format version {data.get('version')!r}, expected {CACHE_VERSION}"
        return data["entries"], None

    def lookup(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(entry, None) for a current, well-formed entry of ``key``; else (None, why) where
        why is None if there simply is no entry. Stale or malformed entries warn once."""
        entry = self.entries().get(key)
        if entry is None:
            return None, None
        bad = entry_problem(entry)
        if bad is not None:
            self._warn_once(key, f"tuning cache {self.path}: entry {key} ignored: {bad}")
            return None, f"malformed cache entry ignored ({bad})"
        fp = fingerprint()
        if entry.get("fingerprint") != fp:
            self._warn_once(
                key, f"tuning cache {self.path}: entry {key} is stale (tuned with kernel "
                f"sources / triton / CUDA fingerprint {entry.get('fingerprint')!r}, current "
                f"{fp!r}); ignored. Rerun `flashcore tune` for this shape",
            )
            return None, "stale cache entry ignored (kernel sources or triton/CUDA changed)"
        return entry, None

    def _warn_once(self, what: str, msg: str) -> None:
        tag = (what, repr(self._stamp))
        if tag not in self._warned:
            self._warned.add(tag)
            _warn(msg)

    # writing

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        self.put_many({key: entry})

    def put_many(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge ``entries`` into the file under the lock (a newer tuning replaces the old
        entry of its key; other keys, written by other processes meanwhile, are kept)."""
        for k, e in entries.items():
            bad = entry_problem(dict(e))
            if bad is not None:
                raise ValueError(f"refusing to write a malformed entry for {k}: {bad}")
        with file_lock(self.path):
            data, why = read_json(self.path)
            current, why = self._check_file(data, why)
            if why is not None and why != "missing":
                # Keep the bytes of a corrupt file for a post-mortem, then start afresh.
                with contextlib.suppress(OSError):
                    os.replace(self.path, self.path.with_name(self.path.name + ".corrupt"))
                current = {}
            merged = dict(current)
            merged.update({k: dict(e) for k, e in entries.items()})
            atomic_write_json(self.path, {"version": CACHE_VERSION, "entries": merged})
        self._stamp = None  # re-read on next lookup


_CACHES: dict[Path, TuningCache] = {}


def default_cache() -> TuningCache:
    """The per-process :class:`TuningCache` of :func:`cache_path` (re-resolved each call, so
    changing ``$FLASHCORE_CACHE_DIR`` takes effect)."""
    p = cache_path()
    c = _CACHES.get(p)
    if c is None:
        c = _CACHES[p] = TuningCache(p)
    return c
