"""Triton kernels of Decoupled SOLO's dice loss and their host launchers.

Positive k of image n sits in grid row i and column j. Over the P pixels of a mask map,
px = sigmoid(X[n, j]), py = sigmoid(Y[n, i]), p = py * px; a, b, c and L per positive as in
``kernels/dice_loss.py``, and dL_k/dp = coef_p * p - coef_t * t. Positives share rows, so a row of
the gradient gathers several of them:
dL/dX[n, j] = (sum over the positives of column j of image n of dL_k/dp * py_k) * px (1 - px),
and likewise dL/dY[n, i] with the roles of X and Y swapped.

The per-pixel arithmetic is that of ``csrc/decoupled_dice_loss.h`` (the C++ and CUDA kernels),
operation for operation. Nothing of size K x P is stored, neither products nor sigmoids:

* forward: grid (positive, chunk of pixels); a program recomputes both sigmoids of its chunk and
  writes one partial (a, b, c), reduced over chunks on the host in float64;
* backward: grid (own row, chunk of pixels), launched once for X (partner Y) and once for Y
  (partner X). A program owns its chunk of one gradient row: it takes the own sigmoid once, adds
  the term of every positive of that row (a list sorted stably by row, so in ascending k) and
  stores the chunk once, zeros for rows without positives. No atomics and no two programs writing
  one element: the result does not depend on scheduling.
"""

# N=images, S=grid side, K=positives, P=pixels of a mask map, R=N*S rows of one branch

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import sigmoid_with_derivative
from .dice_loss import PIXELS_PER_CHUNK

__all__ = ["BACKWARD_PIXELS_PER_CHUNK", "decoupled_dice_loss_backward",
           "decoupled_dice_loss_forward", "launch_config"]

# Pixels per backward program: each one walks all the positives of its row, so smaller chunks
# than the forward's keep an H100 busy (40 rows x 27 chunks of a 200 x 272 map per launch).
BACKWARD_PIXELS_PER_CHUNK = 2048


@triton.jit
def _decoupled_dice_loss_fwd_kernel(
    x_ptr,  # (N, S, P) contiguous logits of the X branch (channel = grid column)
    y_ptr,  # (N, S, P) contiguous logits of the Y branch (channel = grid row), x's dtype
    pos_image_ptr,  # (K,) int64: image of each positive
    pos_row_ptr,  # (K,) int64: grid row, the Y channel
    pos_col_ptr,  # (K,) int64: grid column, the X channel
    target_ptr,  # (K, P) contiguous, uint8 (0/1) or x's dtype
    partial_ptr,  # (K, num_chunks, 3) contiguous: a, b, c of each chunk; its dtype (fp32, fp64 for
    #               fp64 logits) is the accumulation dtype
    num_grids,  # S: channels per image of x and y
    num_pixels,  # P: the row stride of x, y and target, in elements
    num_chunks,  # programs per positive (grid axis 1): the stride of partial's positive axis
    pixels_per_chunk,  # a multiple of BLOCK
    BLOCK: tl.constexpr,
):
    positive = tl.program_id(0)
    chunk_index = tl.program_id(1)
    acc_dtype = partial_ptr.dtype.element_ty
    # int64 indices make 64-bit row offsets; offsets inside a row stay 32-bit.
    image = tl.load(pos_image_ptr + positive)
    x_row = x_ptr + (image * num_grids + tl.load(pos_col_ptr + positive)) * num_pixels
    y_row = y_ptr + (image * num_grids + tl.load(pos_row_ptr + positive)) * num_pixels
    target_row = target_ptr + positive.to(tl.int64) * num_pixels
    chunk_begin = chunk_index * pixels_per_chunk
    chunk_end = tl.minimum(chunk_begin + pixels_per_chunk, num_pixels)
    lanes = tl.arange(0, BLOCK)

    # Per-lane sums over the tiles, one tree reduction at the end (as the dice loss kernel).
    sum_pt = tl.zeros([BLOCK], dtype=acc_dtype)
    sum_pp = tl.zeros([BLOCK], dtype=acc_dtype)
    sum_tt = tl.zeros([BLOCK], dtype=acc_dtype)
    for tile_begin in range(chunk_begin, chunk_end, BLOCK):
        offsets = tile_begin + lanes
        in_row = offsets < num_pixels
        px, _ = sigmoid_with_derivative(
            tl.load(x_row + offsets, mask=in_row, other=0).to(acc_dtype))
        py, _ = sigmoid_with_derivative(
            tl.load(y_row + offsets, mask=in_row, other=0).to(acc_dtype))
        # Padding lanes read z = 0, whose product 1/4 must not reach b.
        p = tl.where(in_row, py * px, 0.0)
        t = tl.load(target_row + offsets, mask=in_row, other=0).to(acc_dtype)
        sum_pt += p * t
        sum_pp += p * p
        sum_tt += t * t

    out = partial_ptr + (positive.to(tl.int64) * num_chunks + chunk_index) * 3
    tl.store(out, tl.sum(sum_pt, axis=0))
    tl.store(out + 1, tl.sum(sum_pp, axis=0))
    tl.store(out + 2, tl.sum(sum_tt, axis=0))


@triton.jit
def _decoupled_dice_loss_bwd_kernel(
    own_ptr,  # (N, S, P) contiguous logits of the branch differentiated here (X or Y)
    partner_ptr,  # (N, S, P) contiguous logits of the other branch, own's dtype
    partner_channel_ptr,  # (K,) int64: each positive's channel in the partner branch
    group_start_ptr,  # (R + 1,) int64: own row r = image * S + channel holds the positives
    #                   member[group_start[r] : group_start[r + 1]]
    member_ptr,  # (K,) int64: positive indices sorted stably by own row
    target_ptr,  # (K, P) contiguous, uint8 (0/1) or own's dtype
    coef_ptr,  # (K, 2) contiguous: [coef_p, coef_t] = g * [4a/D^2, 2/D] per positive; its dtype
    #            (fp32, fp64 for fp64 logits) is the compute dtype
    grad_ptr,  # (N, S, P) contiguous, own's dtype: dL/d own logits, every element written once
    num_grids,  # S
    num_pixels,  # P: the row stride of own, partner, target and grad, in elements
    pixels_per_chunk,  # a multiple of BLOCK
    BLOCK: tl.constexpr,
):
    own_row = tl.program_id(0)
    chunk_index = tl.program_id(1)
    acc_dtype = coef_ptr.dtype.element_ty
    image = own_row // num_grids
    row_offset = own_row.to(tl.int64) * num_pixels
    first = tl.load(group_start_ptr + own_row)
    last = tl.load(group_start_ptr + own_row + 1)
    has_positives = last > first
    chunk_begin = chunk_index * pixels_per_chunk
    chunk_end = tl.minimum(chunk_begin + pixels_per_chunk, num_pixels)
    lanes = tl.arange(0, BLOCK)

    for tile_begin in range(chunk_begin, chunk_end, BLOCK):
        offsets = tile_begin + lanes
        in_row = offsets < num_pixels
        # A row without positives is not read: its gradient is exactly 0, even where its logits
        # are not finite (as the reference's scatter of nothing).
        own = tl.load(own_ptr + row_offset + offsets, mask=in_row & has_positives, other=0)
        own_p, own_dp = sigmoid_with_derivative(own.to(acc_dtype))
        summed = tl.zeros([BLOCK], dtype=acc_dtype)
        for member in range(first, last):
            positive = tl.load(member_ptr + member)
            channel = tl.load(partner_channel_ptr + positive)
            partner_row = partner_ptr + (image * num_grids + channel) * num_pixels
            partner = tl.load(partner_row + offsets, mask=in_row, other=0).to(acc_dtype)
            partner_p, _ = sigmoid_with_derivative(partner)
            t = tl.load(target_ptr + positive * num_pixels + offsets, mask=in_row,
                        other=0).to(acc_dtype)
            coef_p = tl.load(coef_ptr + positive * 2)
            coef_t = tl.load(coef_ptr + positive * 2 + 1)
            # own * partner is py * px whichever branch is own (a product of two floats).
            p = own_p * partner_p
            summed += (coef_p * p - coef_t * t) * partner_p
        grad = tl.where(has_positives, summed * own_dp, 0.0)
        tl.store(grad_ptr + row_offset + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# Host launchers


def launch_config(dtype: torch.dtype, *, backward: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) of the forward or backward kernel for logits of ``dtype``.

    As the dice loss kernels: 1024 pixels per tile, the forward at 8 pixels per thread (4 warps),
    the backward at 4 (8 warps), whose own sigmoid, derivative and sum stay live across the loop
    over positives; float64 halves the tile.
    """
    block = 512 if dtype == torch.float64 else 1024
    return block, (8 if backward else 4)


def _group_by_row(pos_image: Tensor, channel: Tensor, num_grids: int,
                  num_rows: int) -> tuple[Tensor, Tensor]:
    """(group_start (R + 1,), member (K,)): the positives of each row image * S + channel."""
    keys = pos_image * num_grids + channel  # (K,)
    # Stable: the positives of a row stay in ascending k, the order the C++ kernels add them in.
    sorted_keys, member = torch.sort(keys, stable=True)
    boundaries = torch.arange(num_rows + 1, dtype=keys.dtype, device=keys.device)  # (R + 1,)
    return torch.searchsorted(sorted_keys, boundaries).contiguous(), member.contiguous()


def decoupled_dice_loss_forward(x: Tensor, y: Tensor, pos_image: Tensor, pos_row: Tensor,
                                pos_col: Tensor, target: Tensor, eps: float, *,
                                block: int | None = None,
                                pixels_per_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Dice loss of every positive's soft mask sigmoid(Y[n, i]) * sigmoid(X[n, j]), and its sums.

    Args:
        x: (N, S, P) logits of the X branch (channel = grid column); float16, bfloat16, float32
            or float64; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        y: (N, S, P) logits of the Y branch (channel = grid row), x's dtype and device.
        pos_image: (K,) int64 in [0, N).
        pos_row: (K,) int64 in [0, S).
        pos_col: (K,) int64 in [0, S).
        target: (K, P) uint8 (0/1) or x's dtype.
        eps: added to each of the two squared sums.
        block: pixels per tile (a power of two); None: ``launch_config``'s. For tests.
        pixels_per_chunk: pixels per program, rounded up to whole tiles; None:
            ``PIXELS_PER_CHUNK``. For tests.

    Returns:
        loss: (K,) in x's dtype, ``1 - 2a / ((b + eps) + (c + eps))`` computed in float64.
        sums: (K, 3) float64, ``[a, b, c]`` without eps.

    Raises:
        ValueError: a mask of 2^31 pixels or more (Triton's int32 offsets). The other rules,
            index ranges included, are checked before: ``solo_fast.ops.decoupled_dice_loss``'s
            contract.
    """
    x, y, target = x.contiguous(), y.contiguous(), target.contiguous()
    pos_image, pos_row, pos_col = pos_image.contiguous(), pos_row.contiguous(), pos_col.contiguous()
    num_grids, num_pixels = x.shape[1], x.shape[2]
    num_positives = pos_image.shape[0]
    if num_positives == 0 or num_pixels == 0:
        return _common.loss_and_sums(_common.dice_partials(num_positives, 0, x), eps, x.dtype)

    default_block, num_warps = launch_config(x.dtype, backward=False)
    block = default_block if block is None else block
    pixels_per_chunk, num_chunks = _common.grid_layout(
        num_pixels, block, PIXELS_PER_CHUNK if pixels_per_chunk is None else pixels_per_chunk,
        "decoupled_dice_loss")
    partials = _common.dice_partials(num_positives, num_chunks, x)  # (K, chunks, 3)
    with _common.device_guard(x):
        _decoupled_dice_loss_fwd_kernel[(num_positives, num_chunks)](
            x, y, pos_image, pos_row, pos_col, target, partials, num_grids, num_pixels,
            num_chunks, pixels_per_chunk, BLOCK=block, num_warps=num_warps)
    return _common.loss_and_sums(partials, eps, x.dtype)


def decoupled_dice_loss_backward(grad_loss: Tensor, x: Tensor, y: Tensor, pos_image: Tensor,
                                 pos_row: Tensor, pos_col: Tensor, target: Tensor, sums: Tensor,
                                 eps: float, *, block: int | None = None,
                                 pixels_per_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of the loss with respect to x and y; recomputes the sigmoids, stores no product.

    Args:
        grad_loss: (K,) upstream gradient of the loss, any floating dtype.
        x, y, pos_image, pos_row, pos_col, target: as in ``decoupled_dice_loss_forward``.
        sums: (K, 3) ``[a, b, c]`` returned by ``decoupled_dice_loss_forward``.
        eps: the forward's eps.
        block: as in ``decoupled_dice_loss_forward``.
        pixels_per_chunk: pixels per program; None: ``BACKWARD_PIXELS_PER_CHUNK``. For tests.

    Returns:
        (grad_x, grad_y), each (N, S, P) in x's dtype; rows no positive uses are 0.

    Raises:
        ValueError: a mask of 2^31 pixels or more (Triton's int32 offsets). The other rules,
            index ranges included, are checked before: ``solo_fast.ops.decoupled_dice_loss``'s
            contract.
    """
    num_images, num_grids, num_pixels = x.shape
    num_positives = pos_image.shape[0]
    x, y, target = x.contiguous(), y.contiguous(), target.contiguous()
    if num_positives == 0:
        return torch.zeros_like(x), torch.zeros_like(y)
    grad_x = torch.empty_like(x)
    grad_y = torch.empty_like(y)
    if num_pixels == 0:
        return grad_x, grad_y

    coefs = _common.dice_coefficients(grad_loss, sums, eps,
                                      _common.accumulation_dtype(x.dtype))  # (K, 2)

    num_rows = num_images * num_grids
    default_block, num_warps = launch_config(x.dtype, backward=True)
    block = default_block if block is None else block
    pixels_per_chunk, num_chunks = _common.grid_layout(
        num_pixels, block,
        BACKWARD_PIXELS_PER_CHUNK if pixels_per_chunk is None else pixels_per_chunk,
        "decoupled_dice_loss")
    # X rows are grouped by column and take their partner from Y's rows; Y the other way round.
    sides = ((x, y, pos_col, pos_row, grad_x), (y, x, pos_row, pos_col, grad_y))
    with _common.device_guard(x):
        for own, partner, own_channel, partner_channel, grad in sides:
            group_start, member = _group_by_row(pos_image, own_channel, num_grids, num_rows)
            _decoupled_dice_loss_bwd_kernel[(num_rows, num_chunks)](
                own, partner, partner_channel.contiguous(), group_start, member, target, coefs,
                grad, num_grids, num_pixels, pixels_per_chunk, BLOCK=block, num_warps=num_warps)
    return grad_x, grad_y
