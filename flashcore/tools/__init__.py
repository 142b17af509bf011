"""Kernel-engineering tools: the ptxas resource gate and the Nsight Compute profiler.

- :mod:`flashcore.tools.gate` (``flashcore gate``): compiles every kernel variant dispatch can
  select, on the CPU, and fails on spills, stack, registers or shared memory over budget.
- :mod:`flashcore.tools.profile` (``flashcore profile``): one kernel launch under ``ncu``,
  summarised (throughputs, occupancy, stalls, roofline) and written as JSON.
- :mod:`flashcore.tools.hardware` and :mod:`flashcore.tools.budgets`: the card limits, peak
  numbers and resource budgets both tools use, declared once.

Nothing here needs a GPU at import time.
"""
