"""FlashCore: fused scaled-dot-product attention kernels for NVIDIA GPUs.

``import flashcore`` needs neither a GPU nor nvcc nor cuda.core; backends load lazily.
"""

from .api import BACKENDS, CAUSAL_ALIGNS, FlashCoreArgumentError, attention
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_reference",
    "FlashCoreArgumentError",
    "BACKENDS",
    "CAUSAL_ALIGNS",
    "__version__",
]
