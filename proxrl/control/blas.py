"""Limit the threads of numpy's BLAS (the numpy MLPs of :mod:`.mlp_grad` and the rollout policy use it).

``torch.set_num_threads`` does not reach numpy's bundled OpenBLAS, which by default starts one thread per
core; for the 256 x 64 x 64 matmuls of a PPO step on a busy 2-core machine, two threads measured ~20%
slower per training run than one (and up to 3x slower per matmul). numpy has no API for this, so the
library's own ``*_set_num_threads`` entry point is called through ctypes when it can be found (numpy
wheels ship it under ``numpy.libs``); otherwise nothing happens (set ``OPENBLAS_NUM_THREADS`` instead).
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

__all__ = ["set_blas_threads"]

_SYMBOLS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")


def set_blas_threads(n: int) -> bool:
    """Set numpy's OpenBLAS thread count to ``n`` (process-wide); returns whether it could."""
    libs_dir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: the same handle
        except OSError:
            continue
        for name in _SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False
