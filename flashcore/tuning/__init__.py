"""Tuning: config spaces, the EvoTuner search, the user's cache, shipped tables, dispatch.

Importing this package needs no GPU (nor torch until a cache fingerprint is computed); the GPU
fitness (:mod:`flashcore.tuning.fitness`) and the ``flashcore tune`` CLI load on demand.
"""

from .dispatch import Selection, heuristic_config, select_config
from .evo import (
    Comparison,
    EvoTuner,
    FatalFitnessError,
    TuneResult,
    compare_search,
    exhaustive_search,
)
from .key import ProblemKey, bucket
from .space import ConfigSpace, cuda_space, space_for, triton_space

__all__ = [
    "Comparison",
    "ConfigSpace",
    "EvoTuner",
    "FatalFitnessError",
    "ProblemKey",
    "Selection",
    "TuneResult",
    "bucket",
    "compare_search",
    "cuda_space",
    "exhaustive_search",
    "heuristic_config",
    "select_config",
    "space_for",
    "triton_space",
]
