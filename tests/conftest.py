"""Test session set-up.

Without a CUDA device, Triton kernels run on CPU tensors under Triton's interpreter, which Triton
decides on when it is imported: set it here, before any test module can import triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
