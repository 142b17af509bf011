"""Config spaces: what a kernel lets the tuner vary, over one generic interface.

Each backend declares its launch config as a frozen dataclass, an ordered tuple of candidate
values per field (``SEARCH_SPACE``) and a prune predicate (``is_valid``). :class:`ConfigSpace`
wraps the three so the search (:mod:`flashcore.tuning.evo`) never needs to know which kernel it
tunes. Values of a field are ordered, so "neighbouring" means adjacent in that tuple (64 -> 32
or 128 for a tile; 2 -> 1 or 3 for pipeline stages).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigSpace", "space_for", "triton_space", "cuda_space", "ELEM_BYTES"]

ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class ConfigSpace:
    """The searchable configs of one kernel for one problem class (head dim, dtype).

    Attributes:
        name: backend name ("triton", "cuda", or anything for synthetic spaces in tests).
        config_type: the frozen config dataclass; constructed with keyword arguments.
        fields: field name -> ordered tuple of candidate values (the grid's axes).
        predicate: prune predicate, True for a config the kernel can run (resources, shape).
    """

    name: str
    config_type: type
    fields: Mapping[str, tuple[Any, ...]]
    predicate: Callable[[Any], bool]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.fields)

    def make(self, values: Sequence[Any]) -> Any:
        """Config from one value per field, in :attr:`names` order."""
        return self.config_type(**dict(zip(self.names, values, strict=True)))

    def values_of(self, cfg: Any) -> tuple[Any, ...]:
        return tuple(getattr(cfg, n) for n in self.names)

    def coords(self, cfg: Any) -> tuple[int, ...]:
        """Index of each field's value in its axis; a value off the axis maps to the nearest."""
        out = []
        for n, axis in self.fields.items():
            v = getattr(cfg, n)
            if v in axis:
                out.append(axis.index(v))
            else:  # e.g. a cached config from an older, wider space: nearest value by distance
                out.append(min(range(len(axis)), key=lambda i, v=v, a=axis: abs(a[i] - v)))
        return tuple(out)

    def from_coords(self, idx: Sequence[int]) -> Any:
        return self.make([axis[i] for axis, i in zip(self.fields.values(), idx, strict=True)])

    def all_configs(self) -> Iterator[Any]:
        """Every point of the grid, valid or not, in lexicographic order of the axes."""
        for vals in itertools.product(*self.fields.values()):
            yield self.make(vals)

    def valid_configs(self) -> list[Any]:
        """Every config the predicate accepts: the exhaustive grid."""
        return [c for c in self.all_configs() if self.contains(c)]

    def contains(self, cfg: Any) -> bool:
        """True if ``cfg`` is of this space's type, on its axes and passes the predicate."""
        if not isinstance(cfg, self.config_type):
            return False
        if any(getattr(cfg, n) not in axis for n, axis in self.fields.items()):
            return False
        try:
            return bool(self.predicate(cfg))
        except Exception:  # noqa: BLE001 - a predicate that cannot judge a config rejects it
            return False

    def neighbours(self, cfg: Any) -> list[Any]:
        """Configs one step away along one axis (valid or not), in a fixed order."""
        c = self.coords(cfg)
        out = []
        for f, axis in enumerate(self.fields.values()):
            for step in (-1, 1):
                j = c[f] + step
                if 0 <= j < len(axis):
                    out.append(self.from_coords(c[:f] + (j,) + c[f + 1:]))
        return out

    def mutate(self, cfg: Any, rng: random.Random, rate: float | None = None) -> Any:
        """Move each field to an adjacent value with probability ``rate`` (default 1/#fields),
        at least one field always; steps of two happen with small probability so the search
        can hop over a single invalid value (e.g. one that breaks the shared-memory limit)."""
        c = list(self.coords(cfg))
        axes = list(self.fields.values())
        rate = 1.0 / len(axes) if rate is None else rate
        chosen = [f for f in range(len(axes)) if rng.random() < rate]
        if not chosen:
            chosen = [rng.randrange(len(axes))]
        for f in chosen:
            n = len(axes[f])
            ones = [c[f] + s for s in (-1, 1) if 0 <= c[f] + s < n]
            twos = [c[f] + s for s in (-2, 2) if 0 <= c[f] + s < n]
            opts = twos if twos and rng.random() < 0.15 else ones
            if opts:  # an axis of one value cannot move
                c[f] = rng.choice(opts)
        out = self.from_coords(c)
        if out == cfg and any(len(a) > 1 for a in axes):
            return self.mutate(cfg, rng, rate)  # only single-value axes were picked
        return out

    def crossover(self, a: Any, b: Any, rng: random.Random) -> Any:
        """Uniform crossover: each field from either parent with equal probability."""
        return self.make([
            va if rng.random() < 0.5 else vb
            for va, vb in zip(self.values_of(a), self.values_of(b), strict=True)
        ])

    def describe(self, cfg: Any) -> str:
        short = getattr(cfg, "short", None)
        return short() if callable(short) else repr(cfg)

    def to_dict(self, cfg: Any) -> dict[str, Any]:
        return {n: getattr(cfg, n) for n in self.names}

    def from_dict(self, d: Mapping[str, Any]) -> Any:
        """Config from a JSON dict; raises (KeyError/TypeError/ValueError) if malformed."""
        from_dict = getattr(self.config_type, "from_dict", None)
        if callable(from_dict):
            return from_dict(d)
        return self.config_type(**{n: d[n] for n in self.names})


def triton_space(head_dim: int, dtype: str = "fp16") -> ConfigSpace:
    """The Triton forward kernel's space for this head dim and dtype."""
    from ..backends.triton import config as tc

    elem = ELEM_BYTES[dtype]
    return ConfigSpace(
        "triton", tc.TritonFwdConfig, _check_axes(tc.TritonFwdConfig, tc.SEARCH_SPACE),
        lambda cfg: tc.is_valid(cfg, head_dim, elem),
    )


def cuda_space(head_dim: int, dtype: str = "fp16") -> ConfigSpace:
    """The CUDA C++ forward kernel's space; empty for a dtype or head dim it does not support."""
    from ..backends.cuda import config as cc

    ok_dtype = dtype in ("fp16", "bf16")
    return ConfigSpace(
        "cuda", cc.CudaFwdConfig, _check_axes(cc.CudaFwdConfig, cc.SEARCH_SPACE),
        lambda cfg: ok_dtype and cc.is_valid(cfg, head_dim),
    )


def space_for(backend: str, head_dim: int, dtype: str = "fp16") -> ConfigSpace:
    """:func:`triton_space` or :func:`cuda_space` by backend name."""
    if backend == "triton":
        return triton_space(head_dim, dtype)
    if backend == "cuda":
        return cuda_space(head_dim, dtype)
    raise ValueError(f"no config space for backend {backend!r}; expected 'triton' or 'cuda'")


def _check_axes(cls: type, axes: Mapping[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """The backend's SEARCH_SPACE, checked against its dataclass (a renamed field would
    otherwise surface as a confusing TypeError deep inside the search)."""
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(axes) - names
    if extra:
        raise TypeError(f"SEARCH_SPACE of {cls.__name__} names unknown fields {sorted(extra)}")
    for n, axis in axes.items():
        if list(axis) != sorted(axis) or len(set(axis)) != len(axis):
            raise ValueError(f"SEARCH_SPACE[{n!r}] of {cls.__name__} must be strictly increasing")
    return dict(axes)
