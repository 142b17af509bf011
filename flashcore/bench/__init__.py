"""``flashcore bench``: FlashCore against SDPA (each backend) and FlexAttention.

Modules, in the order data flows through them:

- :mod:`.suites`: the problems (``Case``), their FLOP and byte counts, the named suites.
- :mod:`.providers`: the peers, each a zero-argument closure per input set.
- :mod:`.check`: every provider's output against the reference before it is timed.
- :mod:`.timing`: CUDA-graph replay with a cold L2, eager wall time, the matmul peak; the
  ``Timer`` protocol the runner uses (so tests can inject a fake clock).
- :mod:`.runner`: one row per (case, provider): check, then time, then derived metrics.
- :mod:`.report`: console table, JSON, README markdown, PNG plot.
- :mod:`.cli`: the ``flashcore bench`` command.

Nothing here imports Triton or touches the GPU at import time.
"""
