"""Triton kernels of the SOLO dice loss and their host launchers.

Per mask k over its P pixels, with p = sigmoid(z) (logits) or p = z (probabilities):
a = sum p*t, b = sum p^2, c = sum t^2, D = (b + eps) + (c + eps), L = 1 - 2a / D;
dL/dp = 4a/D^2 * p - 2/D * t, and with logits dL/dz = dL/dp * p (1 - p).

The per-pixel arithmetic is that of ``csrc/dice_loss.h`` (the C++ and CUDA kernels), operation for
operation, so that every backend rounds alike. Both kernels run on a 2-D grid (mask, chunk of
pixels); a program walks its chunk in BLOCK-wide tiles. The forward writes one partial (a, b, c) per
program, reduced over chunks on the host in float64, so that results do not depend on scheduling.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["PIXELS_PER_CHUNK", "dice_loss_backward", "dice_loss_forward", "launch_config"]

# Pixels per program (8 float32 tiles): a 100k-pixel mask spreads over 13 programs, enough that a
# few dozen masks fill an H100, while each float32 partial stays a short sum.
PIXELS_PER_CHUNK = 8192
# Grid axis 1 (chunks) is limited to 65535 programs by CUDA.
_MAX_GRID_Y = 65535

_PRED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _exp_nonpositive(x):
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
def _sigmoid_with_derivative(z):
    """sigmoid(z) and p(1 - p) from e = exp(-|z|); e/(1+e)^2 does not cancel to 0 at the tails."""
    e = _exp_nonpositive(tl.where(z < 0, z, -z))
    inv = 1.0 / (1.0 + e)
    p = tl.where(z < 0, e * inv, inv)
    dp = e * inv * inv
    return p, dp


@triton.jit
def _dice_loss_fwd_kernel(
    pred_ptr,  # (N, P) contiguous, fp16/bf16/fp32/fp64: logits or probabilities
    target_ptr,  # (N, P) contiguous, uint8 (0/1) or pred's dtype
    partial_ptr,  # (N, num_chunks, 3) contiguous: a, b, c of each chunk; its dtype (fp32, fp64 for
    #               fp64 pred) is the accumulation dtype
    num_pixels,  # P: the row stride of pred and target, in elements
    num_chunks,  # programs per mask (grid axis 1): the stride of partial's mask axis, in triples
    pixels_per_chunk,  # a multiple of BLOCK
    LOGITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    mask_index = tl.program_id(0)
    chunk_index = tl.program_id(1)
    acc_dtype = partial_ptr.dtype.element_ty
    # N * P may pass 2^31 while P does not: 64-bit row offset, 32-bit offsets inside the row.
    row_offset = mask_index.to(tl.int64) * num_pixels
    pred_row = pred_ptr + row_offset
    target_row = target_ptr + row_offset
    chunk_begin = chunk_index * pixels_per_chunk
    chunk_end = tl.minimum(chunk_begin + pixels_per_chunk, num_pixels)
    lanes = tl.arange(0, BLOCK)

    # Per-lane sums over the tiles, one tree reduction at the end: shorter rounding chains than a
    # reduction per tile, and no cross-warp traffic inside the loop.
    sum_pt = tl.zeros([BLOCK], dtype=acc_dtype)
    sum_pp = tl.zeros([BLOCK], dtype=acc_dtype)
    sum_tt = tl.zeros([BLOCK], dtype=acc_dtype)
    for tile_begin in range(chunk_begin, chunk_end, BLOCK):
        offsets = tile_begin + lanes
        in_row = offsets < num_pixels
        value = tl.load(pred_row + offsets, mask=in_row, other=0).to(acc_dtype)
        t = tl.load(target_row + offsets, mask=in_row, other=0).to(acc_dtype)
        if LOGITS:
            p, _ = _sigmoid_with_derivative(value)
            # Padding lanes read z = 0, whose sigmoid 1/2 must not reach b.
            p = tl.where(in_row, p, 0.0)
        else:
            p = value
        sum_pt += p * t
        sum_pp += p * p
        sum_tt += t * t

    out = partial_ptr + (mask_index.to(tl.int64) * num_chunks + chunk_index) * 3
    tl.store(out, tl.sum(sum_pt, axis=0))
    tl.store(out + 1, tl.sum(sum_pp, axis=0))
    tl.store(out + 2, tl.sum(sum_tt, axis=0))


@triton.jit
def _dice_loss_bwd_kernel(
    pred_ptr,  # (N, P) contiguous, fp16/bf16/fp32/fp64: logits or probabilities
    target_ptr,  # (N, P) contiguous, uint8 (0/1) or pred's dtype
    coef_ptr,  # (N, 2) contiguous: [coef_p, coef_t] = g * [4a/D^2, 2/D] per mask; its dtype (fp32,
    #            fp64 for fp64 pred) is the compute dtype
    grad_ptr,  # (N, P) contiguous, pred's dtype: dL/dpred
    num_pixels,  # P: the row stride of pred, target and grad, in elements
    pixels_per_chunk,  # a multiple of BLOCK
    LOGITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    mask_index = tl.program_id(0)
    chunk_index = tl.program_id(1)
    acc_dtype = coef_ptr.dtype.element_ty
    row_offset = mask_index.to(tl.int64) * num_pixels
    pred_row = pred_ptr + row_offset
    target_row = target_ptr + row_offset
    grad_row = grad_ptr + row_offset
    coef_p = tl.load(coef_ptr + mask_index * 2)
    coef_t = tl.load(coef_ptr + mask_index * 2 + 1)
    chunk_begin = chunk_index * pixels_per_chunk
    chunk_end = tl.minimum(chunk_begin + pixels_per_chunk, num_pixels)
    lanes = tl.arange(0, BLOCK)

    for tile_begin in range(chunk_begin, chunk_end, BLOCK):
        offsets = tile_begin + lanes
        in_row = offsets < num_pixels
        value = tl.load(pred_row + offsets, mask=in_row, other=0).to(acc_dtype)
        t = tl.load(target_row + offsets, mask=in_row, other=0).to(acc_dtype)
        if LOGITS:
            p, dp = _sigmoid_with_derivative(value)
            grad = (coef_p * p - coef_t * t) * dp
        else:
            grad = coef_p * value - coef_t * t
        tl.store(grad_row + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# Host launchers


def _accumulation_dtype(pred: Tensor) -> torch.dtype:
    # float64 end to end for float64 inputs, so that gradcheck sees float64 rounding.
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _check_inputs(pred: Tensor, target: Tensor, op: str) -> None:
    if pred.dim() != 2:
        raise ValueError(f"{op}: pred must be 2-D (N, P), got shape {tuple(pred.shape)}")
    if pred.dtype not in _PRED_DTYPES:
        raise TypeError(f"{op}: pred must be float16, bfloat16, float32 or float64, "
                        f"got {pred.dtype}")
    if target.shape != pred.shape:
        raise ValueError(f"{op}: target must have pred's shape {tuple(pred.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.dtype not in (torch.uint8, pred.dtype):
        raise TypeError(f"{op}: target must be uint8 or pred's dtype {pred.dtype}, "
                        f"got {target.dtype}")
    if target.device != pred.device:
        raise ValueError(f"{op}: target is on {target.device} but pred is on {pred.device}")


def launch_config(dtype: torch.dtype, *, backward: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) of the forward or backward kernel for pred of ``dtype``.

    1024 pixels per tile. The forward runs 8 pixels per thread (4 warps): two 16-byte loads of
    float32 in flight per thread. The backward runs 4 per thread (8 warps): with 8, Triton loads a
    uint8 target 8 bytes wide but stores float32 16 bytes wide, and moves every tile between the two
    layouts through shared memory. float64 halves the tile: the same bytes per tile and fewer live
    doubles per thread (at 8 doubles per thread the backward spilled on sm_90).
    """
    block = 512 if dtype == torch.float64 else 1024
    return block, (8 if backward else 4)


def _grid_layout(num_pixels: int, block: int,
                 pixels_per_chunk: int | None) -> tuple[int, int]:
    """(pixels_per_chunk, num_chunks) for rows of ``num_pixels`` > 0 pixels."""
    pixels_per_chunk = PIXELS_PER_CHUNK if pixels_per_chunk is None else pixels_per_chunk
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    # Whole tiles per chunk: then a tile never straddles two programs.
    pixels_per_chunk = max(block, -(-pixels_per_chunk // block) * block)
    # Beyond 65535 chunks, bigger chunks rather than a grid CUDA refuses.
    min_chunk = -(-num_pixels // _MAX_GRID_Y)
    if pixels_per_chunk < min_chunk:
        pixels_per_chunk = -(-min_chunk // block) * block
    if num_pixels + pixels_per_chunk >= 2**31:
        raise ValueError(f"dice_loss (triton): at most {2**31 - 1 - pixels_per_chunk} pixels per "
                         f"mask, got {num_pixels}")
    return pixels_per_chunk, -(-num_pixels // pixels_per_chunk)


def _device_guard(tensor: Tensor):
    # Triton launches on the current CUDA device; CPU tensors (interpreter) need no guard, and must
    # not touch torch.cuda on a machine without a GPU.
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _loss_from_sums(sums: Tensor, eps: float) -> Tensor:
    a, b, c = sums.unbind(1)
    return 1 - 2 * a / ((b + eps) + (c + eps))


def dice_loss_forward(pred: Tensor, target: Tensor, logits: bool, eps: float, *,
                      block: int | None = None,
                      pixels_per_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Dice loss per mask and its three sums, in one pass over the pixels.

    Args:
        pred: (N, P) logits (``logits=True``) or probabilities; float16, bfloat16, float32 or
            float64; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        target: (N, P) uint8 (0/1) or pred's dtype, on pred's device.
        logits: apply a sigmoid to ``pred``.
        eps: added to each of the two squared sums.
        block: pixels per tile (a power of two); None: ``launch_config``'s. For tests.
        pixels_per_chunk: pixels per program, rounded up to whole tiles; None:
            ``PIXELS_PER_CHUNK``. For tests.

    Returns:
        loss: (N,) in pred's dtype, ``1 - 2a / ((b + eps) + (c + eps))`` computed in float64.
        sums: (N, 3) float64, ``[a, b, c]`` without eps (zeros when P = 0).

    Raises:
        TypeError, ValueError: a dtype, shape or device breaks the contract above.
    """
    _check_inputs(pred, target, "dice_loss_forward")
    pred = pred.contiguous()
    target = target.contiguous()
    num_masks, num_pixels = pred.shape
    if num_masks == 0 or num_pixels == 0:
        sums = torch.zeros((num_masks, 3), dtype=torch.float64, device=pred.device)
        return _loss_from_sums(sums, eps).to(pred.dtype), sums

    default_block, num_warps = launch_config(pred.dtype, backward=False)
    block = default_block if block is None else block
    pixels_per_chunk, num_chunks = _grid_layout(num_pixels, block, pixels_per_chunk)
    partials = torch.empty((num_masks, num_chunks, 3), dtype=_accumulation_dtype(pred),
                           device=pred.device)
    with _device_guard(pred):
        _dice_loss_fwd_kernel[(num_masks, num_chunks)](
            pred, target, partials, num_pixels, num_chunks, pixels_per_chunk,
            LOGITS=bool(logits), BLOCK=block, num_warps=num_warps)
    sums = partials.to(torch.float64).sum(dim=1)
    return _loss_from_sums(sums, eps).to(pred.dtype), sums


def dice_loss_backward(grad_loss: Tensor, pred: Tensor, target: Tensor, sums: Tensor,
                       logits: bool, eps: float, *, block: int | None = None,
                       pixels_per_chunk: int | None = None) -> Tensor:
    """Gradient of the dice loss with respect to pred; recomputes p rather than storing it.

    Args:
        grad_loss: (N,) upstream gradient of the loss, any floating dtype.
        pred: (N, P) as in ``dice_loss_forward``.
        target: (N, P) as in ``dice_loss_forward``.
        sums: (N, 3) ``[a, b, c]`` returned by ``dice_loss_forward``.
        logits: pred holds logits.
        eps: the forward's eps.
        block: as in ``dice_loss_forward``.
        pixels_per_chunk: as in ``dice_loss_forward``.

    Returns:
        (N, P) in pred's dtype: ``g (4a/D^2 p - 2/D t)``, times ``p (1 - p)`` with logits.

    Raises:
        TypeError, ValueError: a dtype, shape or device breaks the contract above.
    """
    _check_inputs(pred, target, "dice_loss_backward")
    num_masks, num_pixels = pred.shape
    if grad_loss.shape != (num_masks,):
        raise ValueError(f"dice_loss_backward: grad_loss must have shape ({num_masks},), got "
                         f"{tuple(grad_loss.shape)}")
    if sums.shape != (num_masks, 3):
        raise ValueError(f"dice_loss_backward: sums must have shape ({num_masks}, 3), got "
                         f"{tuple(sums.shape)}")
    pred = pred.contiguous()
    target = target.contiguous()
    grad = torch.empty((num_masks, num_pixels), dtype=pred.dtype, device=pred.device)
    if num_masks == 0 or num_pixels == 0:
        return grad

    # The coefficients are formed once per mask in float64, in the C++ kernels' order.
    a, b, c = sums.to(torch.float64).unbind(1)
    g = grad_loss.to(torch.float64)
    inv_denominator = 1 / ((b + eps) + (c + eps))
    coef_p = g * 4 * a * inv_denominator * inv_denominator
    coef_t = g * 2 * inv_denominator
    coefs = torch.stack((coef_p, coef_t), dim=1).to(_accumulation_dtype(pred)).contiguous()

    default_block, num_warps = launch_config(pred.dtype, backward=True)
    block = default_block if block is None else block
    pixels_per_chunk, num_chunks = _grid_layout(num_pixels, block, pixels_per_chunk)
    with _device_guard(pred):
        _dice_loss_bwd_kernel[(num_masks, num_chunks)](
            pred, target, coefs, grad, num_pixels, pixels_per_chunk,
            LOGITS=bool(logits), BLOCK=block, num_warps=num_warps)
    return grad
