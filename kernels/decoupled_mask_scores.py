"""Triton kernel of Decoupled SOLO's candidate mask scoring, and its host launcher.

Candidate k of image n in grid row i and column j has the soft mask
s = y_probs[n, i] * x_probs[n, j] (docs/algorithms.md §10.3: the eval-mode probabilities, already
sigmoided and upsampled, all levels concatenated along the channels). Inference needs of it only
area[k] = #{s > threshold} and soft_sum[k] = sum of s over those pixels; mmdetection materialises
every product (K x P floats, ~218 MB per 1,000 candidates) to get them. Here grid (candidate,
chunk of pixels) reads one row of Y and one of X per program and writes one partial per program;
the partials are summed on the host in float64 in a fixed order, and nothing of size K x P is
stored. Candidates share rows and columns, which are then re-read from L2 rather than DRAM.

The product rounds to the input dtype (float16/bfloat16 are multiplied in float32 and rounded, as
torch does), and the comparison is in that dtype too, so that the thresholded set is exactly the
reference's ``y * x > threshold`` (``csrc/decoupled_mask_scores.h``'s decoupled_soft, operation
for operation).
"""

# N=images, C=channels of each branch (all levels), K=candidates, P=pixels of a mask map

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import device_guard, grid_layout, threshold_tensor

__all__ = ["PIXELS_PER_CHUNK", "decoupled_mask_scores_triton", "launch_config"]

# Pixels per program (8 tiles of float32): 1,000 candidates of a 200 x 272 map are 7,000
# programs, 100 candidates still 700 (five per SM of an H100), while each program's partial write
# and final reduction stay small next to its 64 KB of reads.
PIXELS_PER_CHUNK = 8192


@triton.jit
def _decoupled_mask_scores_kernel(
    x_ptr,  # (N, C, P) contiguous X-branch probabilities (channel = grid column of its level)
    y_ptr,  # (N, C, P) contiguous Y-branch probabilities (channel = grid row), x's dtype
    image_ptr,  # (K,) int64: image of each candidate
    row_ptr,  # (K,) int64: Y channel of each candidate
    col_ptr,  # (K,) int64: X channel of each candidate
    threshold_ptr,  # (1,) the threshold in x's dtype (as torch compares s > threshold)
    area_ptr,  # (K, num_chunks) int32 out: thresholded pixels of each candidate and chunk
    soft_ptr,  # (K, num_chunks) float64 out: sum of s over those pixels
    num_channels,  # C
    num_pixels,  # P: the row stride of x and y, in elements
    num_chunks,  # programs per candidate (grid axis 1): the row stride of area and soft
    pixels_per_chunk,  # a multiple of BLOCK
    BLOCK: tl.constexpr,
):
    candidate = tl.program_id(0)
    chunk = tl.program_id(1)
    compute: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    # int64 indices make 64-bit row offsets; offsets inside a row stay 32-bit.
    image = tl.load(image_ptr + candidate)
    x_row = x_ptr + (image * num_channels + tl.load(col_ptr + candidate)) * num_pixels
    y_row = y_ptr + (image * num_channels + tl.load(row_ptr + candidate)) * num_pixels
    threshold = tl.load(threshold_ptr).to(compute)
    chunk_begin = chunk * pixels_per_chunk
    chunk_end = tl.minimum(chunk_begin + pixels_per_chunk, num_pixels)
    lanes = tl.arange(0, BLOCK)

    # Per-lane counts and float64 sums over the tiles, one tree reduction at the end.
    area = tl.zeros([BLOCK], dtype=tl.int32)
    soft = tl.zeros([BLOCK], dtype=tl.float64)
    for tile_begin in range(chunk_begin, chunk_end, BLOCK):
        offsets = tile_begin + lanes
        in_row = offsets < num_pixels
        x = tl.load(x_row + offsets, mask=in_row, other=0).to(compute)
        y = tl.load(y_row + offsets, mask=in_row, other=0).to(compute)
        # y * x as the reference multiplies (in this order), rounded to the input dtype.
        s = (y * x).to(x_ptr.dtype.element_ty).to(compute)
        keep = (s > threshold) & in_row
        area += keep.to(tl.int32)
        soft += tl.where(keep, s.to(tl.float64), 0.0)

    out = candidate.to(tl.int64) * num_chunks + chunk
    tl.store(area_ptr + out, tl.sum(area, axis=0))
    tl.store(soft_ptr + out, tl.sum(soft, axis=0))


# ----------------------------------------------------------------------------------------------
# Host launcher


def launch_config(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) of the kernel for probabilities of ``dtype``.

    1024 pixels per tile on 4 warps (8 per thread: two 16-byte loads of float32 per row in
    flight); float64 halves the tile, as the dice kernels do.
    """
    return (512 if dtype == torch.float64 else 1024), 4


def decoupled_mask_scores_triton(x_probs: Tensor, y_probs: Tensor, image: Tensor, row: Tensor,
                                 col: Tensor, threshold: float, *, block: int | None = None,
                                 pixels_per_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Area and soft sum of every candidate's thresholded product mask, without storing it.

    Args:
        x_probs: (N, C, P) or (N, C, H, W) X-branch probabilities; float16, bfloat16 (multiplied
            in float32), float32 or float64; CUDA, or CPU under ``TRITON_INTERPRET=1`` (no
            bfloat16 there).
        y_probs: Y-branch probabilities, x_probs' shape, dtype and device.
        image: (K,) int64 in [0, N): the image of each candidate, in any order.
        row: (K,) int64 in [0, C): the Y channel of each candidate.
        col: (K,) int64 in [0, C): the X channel of each candidate.
        threshold: s counts where ``s > threshold`` (compared in x_probs' dtype, as torch does).
        block: pixels per tile (a power of two); None: ``launch_config``'s. For tests.
        pixels_per_chunk: pixels per program, rounded up to whole tiles; None:
            ``PIXELS_PER_CHUNK``. For tests.

    Returns:
        area: (K,) int64, ``#{pixels: s > threshold}`` with
            ``s = y_probs[image[k], row[k]] * x_probs[image[k], col[k]]``.
        soft_sum: (K,) float64, the sum of s over those pixels (per chunk in float64, chunks
            summed in a fixed order).

    Raises:
        ValueError: a mask of 2^31 pixels or more (Triton's int32 offsets). The other rules,
            index ranges included, are checked before: ``solo_fast.ops.decoupled_mask_scores``'s
            contract.
    """
    num_images, num_channels = x_probs.shape[:2]
    num_pixels = x_probs.shape[2:].numel()
    x = x_probs.reshape(num_images, num_channels, num_pixels).contiguous()  # (N, C, P)
    y = y_probs.reshape(num_images, num_channels, num_pixels).contiguous()  # (N, C, P)
    num_candidates = image.shape[0]
    device = x.device
    if num_candidates == 0 or num_pixels == 0:
        return (torch.zeros(num_candidates, dtype=torch.int64, device=device),
                torch.zeros(num_candidates, dtype=torch.float64, device=device))

    default_block, num_warps = launch_config(x.dtype)
    block = default_block if block is None else block
    pixels_per_chunk, num_chunks = grid_layout(
        num_pixels, block, PIXELS_PER_CHUNK if pixels_per_chunk is None else pixels_per_chunk,
        "decoupled_mask_scores")
    threshold_t = threshold_tensor(threshold, x.dtype, device)  # (1,)
    partial_area = torch.empty((num_candidates, num_chunks), dtype=torch.int32, device=device)
    partial_soft = torch.empty((num_candidates, num_chunks), dtype=torch.float64, device=device)
    with device_guard(x):
        _decoupled_mask_scores_kernel[(num_candidates, num_chunks)](
            x, y, image.contiguous(), row.contiguous(), col.contiguous(), threshold_t,
            partial_area, partial_soft, num_channels, num_pixels, num_chunks, pixels_per_chunk,
            BLOCK=block, num_warps=num_warps)
    return partial_area.sum(dim=1, dtype=torch.int64), partial_soft.sum(dim=1)
