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

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import sigmoid_with_derivative

__all__ = ["PIXELS_PER_CHUNK", "dice_loss_backward", "dice_loss_forward", "launch_config"]

# Pixels per program (8 float32 tiles): a 100k-pixel mask spreads over 13 programs, enough that a
# few dozen masks fill an H100, while each float32 partial stays a short sum.
PIXELS_PER_CHUNK = 8192


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
            p, _ = sigmoid_with_derivative(value)
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
            p, dp = sigmoid_with_derivative(value)
            grad = (coef_p * p - coef_t * t) * dp
        else:
            grad = coef_p * value - coef_t * t
        tl.store(grad_row + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# Host launchers


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
        ValueError: a mask of 2^31 pixels or more (Triton's int32 offsets). The other rules are
            checked before: ``solo_fast.ops.dice_loss``'s contract.
    """
    pred = pred.contiguous()
    target = target.contiguous()
    num_masks, num_pixels = pred.shape
    if num_masks == 0 or num_pixels == 0:
        return _common.loss_and_sums(_common.dice_partials(num_masks, 0, pred), eps, pred.dtype)

    default_block, num_warps = launch_config(pred.dtype, backward=False)
    block = default_block if block is None else block
    pixels_per_chunk, num_chunks = _common.grid_layout(
        num_pixels, block, PIXELS_PER_CHUNK if pixels_per_chunk is None else pixels_per_chunk,
        "dice_loss")
    partials = _common.dice_partials(num_masks, num_chunks, pred)  # (K, chunks, 3)
    with _common.device_guard(pred):
        _dice_loss_fwd_kernel[(num_masks, num_chunks)](
            pred, target, partials, num_pixels, num_chunks, pixels_per_chunk,
            LOGITS=bool(logits), BLOCK=block, num_warps=num_warps)
    return _common.loss_and_sums(partials, eps, pred.dtype)


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
        ValueError: a mask of 2^31 pixels or more (Triton's int32 offsets). The other rules are
            checked before: ``solo_fast.ops.dice_loss``'s contract.
    """
    num_masks, num_pixels = pred.shape
    pred = pred.contiguous()
    target = target.contiguous()
    grad = torch.empty((num_masks, num_pixels), dtype=pred.dtype, device=pred.device)
    if num_masks == 0 or num_pixels == 0:
        return grad

    coefs = _common.dice_coefficients(grad_loss, sums, eps,
                                      _common.accumulation_dtype(pred.dtype))  # (N, 2)

    default_block, num_warps = launch_config(pred.dtype, backward=True)
    block = default_block if block is None else block
    pixels_per_chunk, num_chunks = _common.grid_layout(
        num_pixels, block, PIXELS_PER_CHUNK if pixels_per_chunk is None else pixels_per_chunk,
        "dice_loss")
    with _common.device_guard(pred):
        _dice_loss_bwd_kernel[(num_masks, num_chunks)](
            pred, target, coefs, grad, num_pixels, pixels_per_chunk,
            LOGITS=bool(logits), BLOCK=block, num_warps=num_warps)
    return grad
