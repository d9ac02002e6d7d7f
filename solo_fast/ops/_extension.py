"""Loads solo_fast's compiled library (``solo_fast._C``) once, when this module is imported.

Importing it registers the ``torch.ops.solo_fast`` operators of the C++ CPU kernels and, in a CUDA
build, of the CUDA kernels. A missing or broken build is not an error here: the ops fall back to the
PyTorch reference (with a one-time warning, see ``_backend.py``). The answers are plain module
constants so that torch.compile traces through them.
"""

from __future__ import annotations

import importlib

__all__ = ["has_ops", "cuda_compiled", "load_error"]

try:
    _LIBRARY = importlib.import_module("solo_fast._C")
    _LOAD_ERROR: ImportError | None = None
except ImportError as error:  # not built, or built against another torch
    _LIBRARY = None
    _LOAD_ERROR = error

_HAS_OPS = _LIBRARY is not None
_CUDA_COMPILED = _HAS_OPS and bool(_LIBRARY.cuda_compiled())


def has_ops() -> bool:
    """True when the compiled library is loaded and its operators are registered."""
    return _HAS_OPS


def cuda_compiled() -> bool:
    """True when the compiled library contains the CUDA kernels."""
    return _CUDA_COMPILED


def load_error() -> ImportError | None:
    """Why the compiled library could not be loaded (None when it was)."""
    return _LOAD_ERROR
