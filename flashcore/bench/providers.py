"""The peers: SDPA (default dispatch and each backend), FlexAttention compiled, FlashCore.

A :class:`Provider` turns a :class:`~flashcore.bench.suites.Case` and one input set
(q, k, v: [B, H, S, D]) into a zero-argument closure that launches one forward call and
returns its output [B, Hq, Sq, D]. The runner builds one closure per rotating input set, checks
the first against the reference, then times them. Providers say "unsupported" (and why) rather
than fall back to another kernel: a row must time what its name says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch

from .suites import Case

__all__ = [
    "PROVIDERS",
    "Provider",
    "SdpaProvider",
    "FlexProvider",
    "FlashCoreProvider",
    "Unsupported",
    "UnfusedFallback",
    "classify_flex_kernels",
    "default_providers",
    "get_providers",
]

Call = Callable[[], torch.Tensor]


class Unsupported(Exception):
    """The provider cannot run this case (the message says why); the row is not timed."""


class UnfusedFallback(Exception):
    """FlexAttention did not run its fused kernel (the message says what ran instead)."""


class Provider:
    """Base class. Subclasses implement :meth:`closure`; the rest has sensible defaults.

    Order of use per case: ``setup(case, device)`` once, then ``with context():`` around
    everything else: ``closure`` per input set, the first call (checked against the reference),
    ``verify`` (e.g. that Flex ran fused), the timing. ``teardown()`` at the end of the case.
    """

    name: str = ""
    description: str = ""

    def setup(self, case: Case, device: torch.device) -> None:
        """Per-case preparation (compile state, masks); raise :class:`Unsupported` early."""

    def context(self) -> AbstractContextManager:
        """Entered around the calls, their check and their timing (e.g. SDPA backend pin).

        Outside the closures so its cost is not in the eager wall time."""
        return contextlib.nullcontext()

    def closure(self, case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Call:
        raise NotImplementedError

    def verify(self, call: Call) -> None:
        """After a correct first call: raise :class:`UnfusedFallback` if it did not run the
        kernel this provider stands for."""

    def teardown(self) -> None:
        """Drop per-case state."""


class SdpaProvider(Provider):
    """``torch.nn.functional.scaled_dot_product_attention``; ``backend=None`` is the default
    dispatch, otherwise the call is pinned with ``sdpa_kernel(backend)`` and SDPA raises if that
    backend rejects the input (reported as unsupported, with SDPA's warnings as the reason)."""

    def __init__(self, name: str, backend: str | None) -> None:
        self.name = name
        self.backend = backend
        self.description = (
            "SDPA default dispatch" if backend is None else f"SDPA pinned to {backend}"
        )

    def context(self) -> AbstractContextManager:
        if self.backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, self.backend)])

    def closure(self, case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Call:
        import torch.nn.functional as F

        causal, gqa = case.causal, case.gqa
        sdpa = F.scaled_dot_product_attention
        if gqa:
            return lambda: sdpa(q, k, v, is_causal=causal, enable_gqa=True)
        return lambda: sdpa(q, k, v, is_causal=causal)


# Inductor names the fused FlexAttention kernel after its template and op, e.g.
# ``triton_tem_fused_flex_attention_0`` (``flex_decoding`` for the short-Sq template).
_FLEX_FUSED_MARKERS = ("flex_attention", "flex_decoding")
# What the unfused path (eager flex_attention: the full score matrix) runs instead.
_UNFUSED_OPS = ("aten::bmm", "aten::mm", "aten::matmul", "aten::baddbmm", "aten::_softmax",
                "aten::softmax", "aten::logsumexp")


def classify_flex_kernels(names: Iterable[str]) -> tuple[bool, str]:
    """Did a FlexAttention call run fused? ``names``: the profiler events of one call: aten
    ops, dynamo/Inductor wrapper regions and, on CUDA, the launch records Inductor puts around
    each Triton kernel (GPU kernel names work too).

    Unfused: any matmul/softmax op ran (the unfused path, eager ``flex_attention`` after dynamo
    gave up compiling, materialises the score matrix with them). Fused: none ran, and either
    Inductor's flex template kernel was seen, or a compiled graph ran (kernel launches are not
    recorded on every backend; an Inductor graph of flex with no matmul op is the template).
    Returns (fused, explanation).
    """
    names = list(names)
    unfused = [n for n in names if n in _UNFUSED_OPS]
    if unfused:
        return False, "unfused ops ran: " + ", ".join(sorted(set(unfused)))
    kernels = [n for n in names if n.startswith("triton")
               and (n.startswith("triton_tem") or any(m in n for m in _FLEX_FUSED_MARKERS))]
    if kernels:
        return True, f"fused kernel {kernels[0]}"
    if any(n.startswith("Torch-Compiled Region") or "CompiledFxGraph" in n for n in names):
        return True, "compiled graph with no matmul/softmax op (kernel names not recorded)"
    shown = ", ".join(sorted(set(names))[:4]) or "nothing recorded"
    return False, f"no fused flex kernel ran ({len(names)} events: {shown})"


def _raise_dynamo_limits() -> None:
    """Each case compiles its own graph; the default recompile limit (8) would make dynamo fall
    back to eager (the unfused path) silently. Raise the limits and make hitting one an error."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


def _profile_event_names(call: Call) -> list[str]:
    """Names of the profiler events one call records: aten ops and, since Inductor wraps each
    kernel launch in a record function while profiling, its Triton kernels' names.

    CPU activity only, on purpose: CUDA activity would load CUPTI, whose callbacks can stay
    attached to the process and add host overhead to every later launch, i.e. to the wall
    times of the providers measured after this check."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    torch.cuda.synchronize()
    return [e.name for e in prof.events()]


class FlexProvider(Provider):
    """``flex_attention`` under ``torch.compile(fullgraph=True, dynamic=False)``, compiled for
    each case's shapes (dynamo is reset per case, so each case compiles once and the guard list
    stays one entry long, as in an application with one shape). The block mask is built once
    per case, outside the timed call: causal, or all-visible for non-causal (without a mask,
    flex builds one inside every call). Before timing, one call runs under the profiler and the
    row becomes ``unfused-fallback`` unless the fused flex kernel ran (and no matmul op did);
    hitting dynamo's recompile limit raises instead of silently running eager."""

    name = "flex"
    description = "FlexAttention, torch.compile'd per shape"

    def __init__(self) -> None:
        self._fn: Callable | None = None
        self._mask = None

    def setup(self, case: Case, device: torch.device) -> None:
        if device.type != "cuda":
            raise Unsupported(
                "FlexAttention is benchmarked on CUDA only (its CPU compile takes ~45 s)"
            )
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _raise_dynamo_limits()
        torch._dynamo.reset()

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx  # top-left, as SDPA's is_causal

        def visible(b, h, q_idx, kv_idx):
            return q_idx >= 0  # every pair visible: full blocks, no per-element mask

        self._mask = create_block_mask(
            causal if case.causal else visible, None, None, case.sq, case.sk, device=device
        )
        self._fn = torch.compile(flex_attention, fullgraph=True, dynamic=False)

    def closure(self, case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Call:
        fn, mask, gqa = self._fn, self._mask, case.gqa
        if fn is None:
            raise RuntimeError("FlexProvider.closure before setup")
        return lambda: fn(q, k, v, block_mask=mask, enable_gqa=gqa)

    def verify(self, call: Call) -> None:
        fused, why = classify_flex_kernels(_profile_event_names(call))
        if not fused:
            raise UnfusedFallback(why)

    def teardown(self) -> None:
        self._fn = None
        self._mask = None


class FlashCoreProvider(Provider):
    """``flashcore.attention(..., backend=...)``. Argument errors (e.g. the CUDA backend's head
    dims) and a backend that is not built report as unsupported, with FlashCore's message."""

    def __init__(self, backend: str) -> None:
        self.name = f"flashcore-{backend}"
        self.backend = backend
        self.description = f"FlashCore {backend} backend"

    def setup(self, case: Case, device: torch.device) -> None:
        if device.type != "cuda" and self.backend != "triton":
            raise Unsupported(f"backend='{self.backend}' needs a CUDA device")

    def closure(self, case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Call:
        import flashcore

        attn, causal, gqa, backend = flashcore.attention, case.causal, case.gqa, self.backend
        return lambda: attn(q, k, v, is_causal=causal, enable_gqa=gqa, backend=backend)


def default_providers() -> list[Provider]:
    """Every provider, in report order (SDPA default first: the ratio's denominator)."""
    return [
        SdpaProvider("sdpa", None),
        SdpaProvider("sdpa-flash", "FLASH_ATTENTION"),
        SdpaProvider("sdpa-cudnn", "CUDNN_ATTENTION"),
        SdpaProvider("sdpa-efficient", "EFFICIENT_ATTENTION"),
        FlexProvider(),
        FlashCoreProvider("triton"),
        FlashCoreProvider("cuda"),
    ]


PROVIDERS: tuple[str, ...] = tuple(p.name for p in default_providers())


def get_providers(names: Iterable[str] | None = None) -> list[Provider]:
    """Fresh provider objects for ``names`` (all when None), in registry order."""
    everything = default_providers()
    if names is None:
        return everything
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
    return [p for p in everything if p.name in wanted]
