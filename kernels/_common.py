"""What the Triton kernels' files share: the device helpers that reproduce the C++ kernels'
arithmetic (``csrc/dice_loss.h``'s exp and sigmoid, ``csrc/dynamic_mask_scores.h``'s soft mask),
and the host side of a launch (grid layout, device guard, dtypes, the dice loss from its sums).

The launchers get tensors that their op's contract has checked (``solo_fast/ops/<op>.py``, which
calls them from its Triton custom op); they check only what Triton itself needs (int32 offsets,
CUDA's grid limits).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MAX_GRID_Y", "MAX_PROGRAMS", "accumulation_dtype", "device_guard",
           "dice_coefficients", "dice_partials", "exp_nonpositive", "grid_layout", "loss_and_sums",
           "sigmoid_with_derivative", "soft_from_logit", "threshold_tensor"]

# CUDA's grid limits: axis 1 (and 2) 65535 programs, axis 0 2^31 - 1.
MAX_GRID_Y = 65535
MAX_PROGRAMS = 2**31 - 1


@triton.jit
def exp_nonpositive(x):
    """e^x for x <= 0, as csrc/dice_loss.h computes it.

    tl.exp on float32 is ex2.approx(x * log2 e), whose error grows with |x|; the Cody-Waite
    reduction and degree-6 minimax polynomial of the C++ kernels stay within 2 ulp, and keep the
    Triton and CUDA results alike. Inputs under -87 are clamped (e^-87 is still a normal float).
    """
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        # A select, not tl.maximum, so that NaN propagates as in C++.
        x = tl.where(x < -87.0, -87.0, x)
        n = tl.floor(x * 1.44269504088896341 + 0.5)
        r = x - n * 0.693359375
        r = r - n * -2.12194440e-4
        y = r * 1.9875691500e-4 + 1.3981999507e-3
        y = y * r + 8.3334519073e-3
        y = y * r + 4.1665795894e-2
        y = y * r + 1.6666665459e-1
        y = y * r + 5.0000001201e-1
        y = y * (r * r) + r + 1.0
        scale = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
        return y * scale


@triton.jit
def sigmoid_with_derivative(z):
    """sigmoid(z) and p(1 - p) from e = exp(-|z|); e/(1+e)^2 does not cancel to 0 at the tails."""
    e = exp_nonpositive(tl.where(z < 0, z, -z))
    inv = 1.0 / (1.0 + e)
    p = tl.where(z < 0, e * inv, inv)
    dp = e * inv * inv
    return p, dp


@triton.jit
def soft_from_logit(z):
    """csrc/dynamic_mask_scores.h's soft_from_logit: sigmoid(z) as torch stores it.

    z is in the input dtype; s comes back in the compute dtype (float32 for float16/bfloat16,
    rounded to their dtype as torch stores it). For z >= 0, s = 1 / (1 + e) with
    e = exp(-z) from the C++ kernels' exp polynomial; for z < 0 the equal e / (1 + e) with
    e = exp(z); 0 where torch's float exp(-z) overflows.
    """
    if z.dtype == tl.float64:
        zc = z
    else:
        zc = z.to(tl.float32)
    negative = zc < 0
    e = exp_nonpositive(tl.where(negative, zc, -zc))
    numerator = tl.where(negative, e, 1.0)
    if zc.dtype == tl.float64:
        s = numerator / (1.0 + e)
    else:
        # The IEEE division, as C++ and CUDA divide: Triton's `/` on float32 is a 2-ulp one.
        s = tl.math.div_rn(numerator, 1.0 + e)
        s = tl.where(zc < -88.7228394, 0.0, s)
    return s.to(z.dtype).to(zc.dtype)


# ----------------------------------------------------------------------------------------------
# Host side


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 end to end for float64 inputs, so that gradcheck sees float64 rounding.
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_guard(tensor: Tensor):
    # Triton launches on the current CUDA device; CPU tensors (interpreter) need no guard, and must
    # not touch torch.cuda on a machine without a GPU.
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def grid_layout(num_pixels: int, block: int, pixels_per_chunk: int,
                op: str) -> tuple[int, int]:
    """(pixels_per_chunk, num_chunks) for rows of ``num_pixels`` > 0 pixels, one chunk per program
    on grid axis 1."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    # Whole tiles per chunk (a tile never straddles two programs), and bigger chunks rather than a
    # grid CUDA refuses.
    pixels_per_chunk = max(pixels_per_chunk, -(-num_pixels // MAX_GRID_Y))
    pixels_per_chunk = max(block, -(-pixels_per_chunk // block) * block)
    if num_pixels + pixels_per_chunk >= 2**31:
        raise ValueError(f"{op} (triton): at most {2**31 - 1 - pixels_per_chunk} pixels per "
                         f"mask, got {num_pixels}")
    return pixels_per_chunk, -(-num_pixels // pixels_per_chunk)


def dice_partials(num_items: int, num_chunks: int, like: Tensor) -> Tensor:
    """(K, chunks, 3) uninitialised per-chunk partial sums [a, b, c] of a dice forward kernel, in
    the accumulation dtype of ``like``'s dtype."""
    return torch.empty((num_items, num_chunks, 3), dtype=accumulation_dtype(like.dtype),
                       device=like.device)


def loss_and_sums(partials: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(loss (K,) in ``dtype``, sums (K, 3) float64) of a dice forward from its (K, chunks, 3)
    partial sums, added in float64 (no chunk: the sums of no pixel, 0)."""
    sums = partials.to(torch.float64).sum(dim=1)
    a, b, c = sums.unbind(1)
    return (1 - 2 * a / ((b + eps) + (c + eps))).to(dtype), sums


def dice_coefficients(grad_loss: Tensor, sums: Tensor, eps: float,
                      dtype: torch.dtype) -> Tensor:
    """(K, 2) [coef_p, coef_t] = g * [4a/D^2, 2/D] per mask, formed in float64 in the C++
    kernels' order and stored in ``dtype``: dL/dp = coef_p * p - coef_t * t."""
    a, b, c = sums.to(torch.float64).unbind(1)
    g = grad_loss.to(torch.float64)
    inv_denominator = 1 / ((b + eps) + (c + eps))
    coef_p = g * 4 * a * inv_denominator * inv_denominator
    coef_t = g * 2 * inv_denominator
    return torch.stack((coef_p, coef_t), dim=1).to(dtype).contiguous()


def threshold_tensor(threshold: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1,) the threshold rounded as csrc/dynamic_mask_scores.h's threshold_as: to the compute
    dtype, then to the inputs' ``dtype``."""
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor([threshold], dtype=compute_dtype, device=device).to(dtype)
