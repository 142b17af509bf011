"""GPU fitness for EvoTuner: correctness as a hard constraint, then the bench's timing.

:class:`GpuFitness` is a ``config -> time_us | None`` callable for one problem and backend:

1. inputs: fresh ``randn`` q, k, v; as many rotating sets as the bench uses to keep L2 cold
   (:func:`flashcore.bench.timing.cold_l2_sets`);
2. correctness: the candidate's output on set 0, with the output buffer poisoned (NaN) so
   unwritten elements fail, against :func:`flashcore.reference.attention_reference` in fp32
   on a subset of query rows (first, last and random ones). The tolerance follows DESIGN.md:
   at most twice the error of the same attention computed by PyTorch in the input dtype, plus
   a small atol; any NaN/Inf fails. A failing config returns None: never selected;
3. time: :func:`flashcore.bench.timing.time_cuda_graph` over the rotating sets (CUDA graph
   replay, cold L2), median in us, exactly as ``flashcore bench`` measures.

GPU only; nothing here runs at import time, and torch.cuda is touched only when a fitness is
built. The tests exercise the search with synthetic fitness functions instead.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .evo import FatalFitnessError
from .key import ProblemKey

__all__ = ["Problem", "GpuFitness", "TOLERANCE_ATOL", "precompile"]

# Added to 2x PyTorch's own error in the input dtype (DESIGN.md's pass rule); these match the
# kernel tests' atol for outputs of magnitude ~1.
TOLERANCE_ATOL = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 1e-4}


@dataclass(frozen=True)
class Problem:
    """One attention problem: q [b, hq, sq, d], k/v [b, hkv, sk, d]."""

    b: int
    hq: int
    hkv: int
    sq: int
    sk: int
    d: int
    dtype: str = "fp16"  # "fp16" | "bf16" | "fp32"
    causal: bool = False
    causal_align: str = "top_left"

    @classmethod
    def from_case(cls, case: Any) -> Problem:
        """From a :mod:`flashcore.bench.suites` Case (fields b, hq, hkv, sq, sk, d, dtype,
        causal)."""
        return cls(
            int(case.b), int(case.hq), int(case.hkv), int(case.sq), int(case.sk), int(case.d),
            str(case.dtype), bool(case.causal),
        )

    @property
    def batch_heads(self) -> int:
        return self.b * self.hq

    def key(self, gpu: str, cc: str, backend: str) -> ProblemKey:
        return ProblemKey.make(
            gpu, cc, backend, self.dtype, self.d, self.causal, self.hq // self.hkv, self.sq,
            self.sk, self.batch_heads,
        )

    def label(self) -> str:
        gqa = f"/{self.hkv}" if self.hkv != self.hq else ""
        sk = f" Sk{self.sk}" if self.sk != self.sq else ""
        return (
            f"B{self.b} H{self.hq}{gqa} S{self.sq}{sk} D{self.d} {self.dtype}"
            + (" causal" if self.causal else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class GpuFitness:
    """``config -> median us`` (None if the config is wrong or fails) for one problem.

    Args:
        problem: shapes, dtype, causal.
        backend: "triton" or "cuda".
        device: CUDA device (default: the current one).
        reps, warmup, min_graph_us: passed to ``time_cuda_graph``.
        check_rows: query rows checked against the reference (all rows if sq is smaller).
        seed: seed of the input tensors and the checked rows.

    ``details[config]`` keeps, per config tried, its latest call: max error, tolerance,
    timing statistics or the error message, for the JSON report (a config re-timed by
    ``tune --confirm`` shows its last round there; the report's ``confirm`` has every round).
    """

    def __init__(
        self, problem: Problem, backend: str, *, device: Any = None, reps: int = 100,
        warmup: int = 3, min_graph_us: float = 200.0, check_rows: int = 128, seed: int = 0,
    ) -> None:
        import torch

        from ..bench.timing import cold_l2_sets  # lazy: written in parallel, GPU-side only
        from ..reference import attention_reference

        if backend not in ("triton", "cuda"):
            raise ValueError(f"backend must be 'triton' or 'cuda', got {backend!r}")
        self.problem = problem
        self.backend = backend
        self.reps, self.warmup, self.min_graph_us = reps, warmup, min_graph_us
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None \
            else torch.device(device)
        p = problem
        dtype = getattr(torch, _TORCH_DTYPES[p.dtype])
        self.scale = 1.0 / math.sqrt(p.d)
        elem = torch.empty((), dtype=dtype).element_size()
        # q, k, v and the output: what one call streams through L2.
        bytes_per_set = elem * (2 * p.b * p.hq * p.sq * p.d + 2 * p.b * p.hkv * p.sk * p.d)
        l2 = 50 * 2**20  # H100's L2; used when the device does not say (and in CPU tests)
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            l2 = int(getattr(props, "L2_cache_size", 0) or l2)
        n_sets = cold_l2_sets(bytes_per_set, l2)
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=self.device, dtype=dtype)

        self.sets = [
            (randn(p.b, p.hq, p.sq, p.d), randn(p.b, p.hkv, p.sk, p.d),
             randn(p.b, p.hkv, p.sk, p.d))
            for _ in range(n_sets)
        ]
        q, k, v = self.sets[0]
        # The reference materialises [B, Hq, rows, Sk] scores: keep that under ~1 GiB of fp32.
        rows_cap = max(8, (1 << 28) // max(p.b * p.hq * p.sk, 1))
        self.rows = self._check_rows(p.sq, min(check_rows, rows_cap), gen)
        ref, _ = attention_reference(
            q, k, v, is_causal=p.causal, scale=self.scale, causal_align=p.causal_align,
            compute_dtype=torch.float32, rows=self.rows,
        )
        low, _ = attention_reference(
            q, k, v, is_causal=p.causal, scale=self.scale, causal_align=p.causal_align,
            compute_dtype=dtype, rows=self.rows,
        )
        self.ref = ref
        torch_err = (low.float() - ref).abs().nan_to_num(0.0).max().item()
        self.tolerance = 2.0 * torch_err + TOLERANCE_ATOL[p.dtype]
        self.details: dict[Any, dict[str, Any]] = {}

    def _check_rows(self, sq: int, n: int, gen: Any) -> Any:
        import torch

        if sq <= n:
            return torch.arange(sq, device=self.device)
        # First and last rows always (the ragged tail tile and, causal, the diagonal's ends).
        mid = torch.randperm(sq - 2, generator=gen, device=self.device)[: n - 2] + 1
        ends = torch.tensor([0, sq - 1], device=self.device)
        return torch.cat([ends, mid]).sort().values

    def _call(self, cfg: Any, i: int) -> Any:
        from ..api import _forward

        q, k, v = self.sets[i]
        p = self.problem
        return _forward(
            q, k, v, self.scale, p.causal, p.causal_align, False, self.backend, config=cfg
        )

    @contextlib.contextmanager
    def _poisoned_outputs(self) -> Iterator[None]:
        """Make the backend allocate its output NaN-filled for the correctness run, so rows it
        never writes fail (instead of reading a previous config's correct output that the
        caching allocator happens to hand back)."""
        import importlib

        import torch

        try:
            mod = importlib.import_module(f"flashcore.backends.{self.backend}.fwd")
        except ImportError as e:
            raise FatalFitnessError(
                f"backend {self.backend!r} cannot be imported ({type(e).__name__}: {e})"
            ) from e
        orig = getattr(mod, "_alloc_out", None)
        if orig is None:  # a launcher without the hook: check unpoisoned
            yield
            return

        def poisoned(q: torch.Tensor) -> torch.Tensor:
            return orig(q).fill_(float("nan"))

        mod._alloc_out = poisoned
        try:
            yield
        finally:
            mod._alloc_out = orig

    def __call__(self, cfg: Any) -> float | None:
        """Median us of ``cfg`` on this problem, or None if it is wrong or fails to run."""
        import torch

        from ..bench.timing import time_cuda_graph

        info: dict[str, Any] = {}
        self.details[cfg] = info
        try:
            with self._poisoned_outputs():
                out, _ = self._call(cfg, 0)
            got = out[:, :, self.rows].float()
            if not torch.isfinite(got).all():
                info["error"] = "NaN/Inf in the output (or rows left unwritten)"
                return None
            err = (got - self.ref).abs().max().item()
            info.update(max_err=err, tolerance=self.tolerance)
            if not err <= self.tolerance:
                info["error"] = f"max error {err:.3g} > tolerance {self.tolerance:.3g}"
                return None
            calls = [functools.partial(self._call, cfg, i) for i in range(len(self.sets))]
            stats = time_cuda_graph(
                calls, reps=self.reps, warmup=self.warmup, min_graph_us=self.min_graph_us
            )
        except FatalFitnessError:
            raise
        except Exception as e:  # noqa: BLE001 - compile/launch failure rejects this config
            info["error"] = f"{type(e).__name__}: {e}"
            self._check_context(cfg, e)
            return None
        info.update(
            median_us=stats.median_us, p10_us=stats.p10_us, p90_us=stats.p90_us,
            reps=stats.reps, calls_per_rep=stats.calls_per_rep,
        )
        return float(stats.median_us)

    def _check_context(self, cfg: Any, exc: Exception) -> None:
        """A failed launch can leave the CUDA context unusable (illegal address is sticky):
        then every later config would 'fail' too, so stop the search instead."""
        import torch

        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001
            raise FatalFitnessError(
                f"the CUDA context is broken after config {cfg} failed ({exc}); later configs "
                f"cannot be measured in this process ({type(e).__name__}: {e}). Exclude it with "
                "the resource gate (--gate ptxas) and rerun"
            ) from e


def _worker_init() -> None:
    # Real compiles even if the parent runs under Triton's interpreter (the CPU test suite).
    import os

    os.environ["TRITON_INTERPRET"] = "0"


def _compile_one(spec: Any, arch: int) -> str | None:
    """Worker: compile one Triton variant for ``sm_<arch>`` into Triton's on-disk cache."""
    try:
        from triton.backends.compiler import GPUTarget

        from ..backends.triton.fwd import compile_fwd

        compile_fwd(spec, target=GPUTarget("cuda", arch, 32))
        return None
    except Exception as e:  # noqa: BLE001 - reported; the search rejects the config anyway
        return f"{type(e).__name__}: {e}"


def precompile(
    problem: Problem, backend: str, configs: list[Any], *, cc: str, workers: int | None = None
) -> tuple[int, int, float]:
    """Compile ``configs`` for ``problem`` in parallel worker processes and wait for them.

    Compiling dominates an evaluation's wall time (~1-3 s of single-threaded LLVM/ptxas per
    config against well under a second of timing). The workers compile the same kernel
    variants the launcher will (``flashcore.tools.variants.triton_spec`` for contiguous BHSD
    inputs) into Triton's on-disk cache, where the search's own compile then finds them. The
    blocking form of :class:`Prefetcher`'s compile step, without the gate. Triton only;
    returns (compiled, tried, seconds).
    """
    import time

    if backend != "triton" or not configs:
        return 0, 0, 0.0
    t0 = time.perf_counter()
    pf = Prefetcher(cc, gate=False, workers=workers or min(len(configs), _default_workers()))
    try:
        tried = pf.submit(problem, backend, configs)
        ok = sum(pf.compile_error(problem, backend, c) is None for c in configs)
    finally:
        pf.close()
    return ok, tried, time.perf_counter() - t0


def _default_workers() -> int:
    import os

    return max(1, (os.cpu_count() or 2) - 1)


def _prefetch_one(
    spec: Any, arch: int, gate_args: tuple | None
) -> tuple[str | None, bool | None]:
    """Worker: compile one launcher variant (``spec``; None for none) and, with ``gate_args``,
    the resource gate's verdict on the config (None: the gate could not judge it here)."""
    if isinstance(spec, tuple):  # ("cuda", defines): an NVRTC cubin into FlashCore's cache
        try:
            from ..backends.cuda.compiler import compile_cubin

            compile_cubin(list(spec[1]), f"sm_{arch}")
            err = None
        except Exception as e:  # noqa: BLE001 - the launcher compiles (and reports) it
            err = f"{type(e).__name__}: {e}"
    else:
        err = _compile_one(spec, arch) if spec is not None else None
    verdict = None
    if gate_args is not None:
        try:
            from ..tools.gate import config_verdict

            verdict = bool(config_verdict(*gate_args))
        except Exception:  # noqa: BLE001 - the search's own gate judges it instead
            verdict = None
    return err, verdict


class Prefetcher:
    """Compiles ahead in a pool of worker processes while the search measures on the GPU.

    For every config of every queued problem class it compiles the launcher's variant into
    Triton's on-disk cache (as :func:`precompile`; for the CUDA backend, the NVRTC cubin into
    FlashCore's cubin cache) and runs the resource gate, whose verdict
    holds for the whole class (dtype, head dim, causal): a tuning run over a suite queues all
    of its classes up front, so the CPU-bound compiles of later problems overlap the GPU-bound
    timing of earlier ones, instead of one compile after another inside the search. Purely an
    optimisation: a config the workers did not (or could not) judge is judged by the search's
    own gate, and a variant they did not build is compiled by the launcher as usual.
    """

    def __init__(self, cc: str, *, gate: bool, workers: int | None = None) -> None:
        self.arch = int(cc.replace(".", ""))
        self.gate = gate
        self.workers = workers or _default_workers()
        self._ex: Any = None
        self._futs: dict[tuple, Any] = {}

    @staticmethod
    def _class_key(problem: Problem, backend: str, cfg: Any) -> tuple:
        return (backend, problem.d, problem.dtype, bool(problem.causal), cfg)

    def submit(self, problem: Problem, backend: str, configs: list[Any]) -> int:
        """Queue the configs of ``problem``'s class not queued yet; returns how many."""
        import concurrent.futures as cf
        import multiprocessing as mp

        spec_of = None
        if backend == "cuda":
            from ..backends.cuda.compiler import compile_defines

            def spec_of(c: Any) -> Any:
                return ("cuda", tuple(compile_defines(c, problem.dtype, problem.d,
                                                      problem.causal)))
        elif backend == "triton":
            try:
                from ..tools.variants import Problem as VariantProblem
                from ..tools.variants import triton_spec
            except ImportError:
                return 0
            vp = VariantProblem(problem.dtype, problem.d, problem.causal, problem.b,
                                problem.hq, problem.hkv, problem.sq, problem.sk)

            def spec_of(c: Any) -> Any:
                return triton_spec(vp, c)

        if self._ex is None:
            # spawn: the parent has a CUDA context, which a forked child must not inherit.
            self._ex = cf.ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init
            )
        n = 0
        for c in configs:
            key = self._class_key(problem, backend, c)
            if key in self._futs:
                continue
            gate_args = ((backend, problem.d, problem.dtype, bool(problem.causal), self.arch, c)
                         if self.gate else None)
            spec = spec_of(c) if spec_of is not None else None
            self._futs[key] = self._ex.submit(_prefetch_one, spec, self.arch, gate_args)
            n += 1
        return n

    def _result(self, problem: Problem, backend: str, cfg: Any) -> tuple[str | None, bool | None]:
        """(compile error, gate verdict) of a queued config, waiting for it; a config never
        queued, or a dead worker, reads (why, None)."""
        fut = self._futs.get(self._class_key(problem, backend, cfg))
        if fut is None:
            return "not queued", None
        try:
            return fut.result()
        except Exception as e:  # noqa: BLE001 - a dead worker only costs the speed-up
            return f"{type(e).__name__}: {e}", None

    def compile_error(self, problem: Problem, backend: str, cfg: Any) -> str | None:
        """None if the workers built ``cfg``'s launcher variant (waits for it), else why not."""
        return self._result(problem, backend, cfg)[0]

    def verdict(self, problem: Problem, backend: str, cfg: Any) -> bool | None:
        """The workers' gate verdict on ``cfg`` (waits for it); None if none was queued or
        the workers could not judge it."""
        return self._result(problem, backend, cfg)[1]

    def wrap_gate(self, gate: Any, problem: Problem, backend: str) -> Any:
        """``gate`` answered from the workers' verdicts where they have one."""
        if gate is None:
            return None

        def prefetched_gate(cfg: Any) -> bool:
            v = self.verdict(problem, backend, cfg)
            return gate(cfg) if v is None else v

        return prefetched_gate

    def close(self) -> None:
        """Stop the workers; queued work that has not started is dropped."""
        if self._ex is not None:
            self._ex.shutdown(wait=False, cancel_futures=True)
            self._ex = None
