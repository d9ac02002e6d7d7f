"""Which implementation of an op runs for a given call.

Backends: ``reference`` (PyTorch, always there), ``cpu`` (C++ kernels in ``solo_fast._C``),
``cuda`` (CUDA kernels in a CUDA build of ``solo_fast._C``) and ``triton`` (``solo_fast.kernels``).

Per call, the first of these that is set decides: the ``backend=`` argument, the environment
variable ``SOLO_FAST_BACKEND``, the default for the tensor's device. The default is the fastest
backend that has been *tested on that device*: on CPU tensors the C++ kernels; on CUDA tensors the
backends listed in ``VERIFIED_ON_GPU`` (empty until the GPU test suite has passed on a real GPU;
until then CUDA tensors run the reference). A backend that cannot run here (not built, wrong
device, Triton missing) falls back to the device default with a one-time warning; it never
silently computes something else.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from solo_fast.ops._extension import cuda_compiled, has_ops, load_error

__all__ = ["BACKENDS", "VERIFIED_ON_GPU", "choose_backend", "available_backends"]

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENVIRONMENT_VARIABLE = "SOLO_FAST_BACKEND"

# Backends whose GPU tests (tests marked `gpu`) have passed on a real GPU, fastest first. A kernel
# that has never run is never a default.
VERIFIED_ON_GPU: dict[str, tuple[str, ...]] = {}

_warned: set[tuple] = set()


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors only under its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, got {device.type} tensors"
        if not has_ops():
            return f"the compiled library solo_fast._C could not be loaded ({load_error()})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels take CUDA tensors, got {device.type} tensors"
        if not cuda_compiled():
            return "solo_fast._C was built without CUDA kernels (SOLO_FAST_CUDA=0 or no toolkit)"
        return None
    if backend == "triton":
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton kernels take CPU tensors only with TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels take CUDA tensors, got {device.type} tensors"
        return None
    raise AssertionError(backend)


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on tensors of this device in this process."""
    device = torch.device(device)
    return [name for name in BACKENDS if _why_unavailable(name, device) is None]


def _default(op: str, device: torch.device) -> str:
    if device.type == "cpu":
        candidates: tuple[str, ...] = ("cpu",)
    elif device.type == "cuda":
        candidates = VERIFIED_ON_GPU.get(op, ())
    else:
        candidates = ()
    for name in candidates:
        reason = _why_unavailable(name, device)
        if reason is None:
            return name
        _warn_once(op, name, device, reason)
    return "reference"


def _warn_once(op: str, backend: str, device: torch.device, reason: str) -> None:
    key = (op, backend, device.type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"solo_fast.ops.{op}: backend {backend!r} is unavailable on {device.type} tensors "
            f"({reason}); falling back", RuntimeWarning, stacklevel=4)


def choose_backend(op: str, device: torch.device, requested: str | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    Args:
        op: the op's name, e.g. ``"dice_loss"``.
        device: the device of the op's inputs.
        requested: the ``backend=`` argument of the call, or None.

    Raises:
        ValueError: ``requested`` (or ``SOLO_FAST_BACKEND``) names no backend.
    """
    source = "backend"
    if requested is None:
        requested = os.environ.get(ENVIRONMENT_VARIABLE) or None
        source = ENVIRONMENT_VARIABLE
    if requested is None:
        return _default(op, device)
    if requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)} (or unset), "
                         f"got {requested!r}")
    reason = _why_unavailable(requested, device)
    if reason is None:
        return requested
    _warn_once(op, requested, device, reason)
    return _default(op, device)
