"""solo_fast: the SOLO family of instance segmentation models (SOLO, Decoupled SOLO, SOLOv2) with
fused CPU, CUDA and Triton kernels."""

from solo_fast import ops

__version__ = "0.1.0"

__all__ = ["__version__", "ops"]
