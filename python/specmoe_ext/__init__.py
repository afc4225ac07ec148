"""specmoe-ext: speculative decoding for Mixture-of-Experts models (PyTorch C++/CUDA extension)."""
from __future__ import annotations

import torch  # noqa: F401  (loads libc10/libtorch before the extension: _C has no RPATH to them)

from . import _C  # registers the specmoe::* ops with the dispatcher
from . import ops
from .routing_types import Routing

__version__ = "0.1.0"


def cuda_kernels_available() -> bool:
    """True when this build has the CUDA kernels (built against a CUDA torch with nvcc present)."""
    return bool(_C.WITH_CUDA)


__all__ = ["ops", "Routing", "cuda_kernels_available", "__version__"]
