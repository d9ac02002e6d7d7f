"""Triton kernel of SOLOv2's candidate mask scoring, and its host launcher.

Candidate k of image n has the soft mask s = sigmoid(kernels[k] . mask_feats[n]) over the P pixels
of the mask map (docs/algorithms.md §10.3). Inference needs of it only two numbers per candidate:
area[k] = #{s > threshold} and soft_sum[k] = sum of s over those pixels (maskness = soft_sum /
area). mmdetection materialises every soft mask (K x P floats) to get them; here they come out of
the epilogue of a tiled GEMM and nothing of size K x P is stored.

Layout: the candidates are sorted stably by image (on the host), so that a tile of BLOCK_M
consecutive sorted candidates shares one image and the tile is an ordinary GEMM
(BLOCK_M x E) @ (E x BLOCK_N). One program per (candidate tile, pixel tile), on a 1-D grid that
walks the candidate tiles fastest, so the programs in flight at one time read the same pixel tile
of mask_feats (from L2, not DRAM). (A 2-D grid caps the pixel tiles at CUDA's 65535 and needs a
loop over several tiles per program for larger maps. Compiled with that loop, the kernel took 30 to
90 registers more than with one tile per program, and spilled once it packed masks; with no loop,
the kernel the compile report measures is the one that runs.) Each program writes one partial
(area, soft_sum) per candidate and pixel tile, summed on the host in float64 in a fixed order: the
result does not depend on scheduling.

With ``pack_masks`` the same epilogue also writes every candidate's binary mask, bit-packed in the
layout of ``matrix_nms_pack`` (bit b of int64 word w is pixel 64 w + b), so that matrix NMS needs
no second pass over the soft masks. BLOCK_N is a multiple of 64 and pixel tiles start at multiples
of BLOCK_N, so a tile holds whole words: its thresholded (BLOCK_M, BLOCK_N) block, viewed as
(BLOCK_M, BLOCK_N / 64, 64), is summed against 2^b along the last axis. Each word lies in exactly
one (candidate tile, pixel tile) and so is stored by one program, at the candidate's original row:
no atomics, no zero-fill. The bits are the pixels counted into area, so a row's popcount is its
area.

The per-pixel arithmetic is that of ``csrc/dynamic_mask_scores.h`` (the C++ and CUDA kernels),
operation for operation: torch's ``1 / (1 + exp(-z))`` with the house exp polynomial of
``kernels/dice_loss.py``, an IEEE division, z and s rounded to the input dtype and the threshold
compared in it, so that the thresholded set matches ``sigmoid(z) > threshold`` up to pixels within
a few ulp of the threshold.
"""

# N=images, E=mask-feature channels, K=candidates, P=pixels of a mask map, T=candidate tiles,
# Q=pixel tiles (BLOCK_N pixels each), Wd=ceil(P / 64) words of a packed mask

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import MAX_PROGRAMS, device_guard, soft_from_logit, threshold_tensor

__all__ = ["dynamic_mask_scores_triton", "launch_config"]


# Pixels per packed word (int64), as matrix_nms_pack.
_WORD_BITS = 64


@triton.jit
def _soft_above(z, threshold):
    """(s, s > threshold): csrc/dynamic_mask_scores.h's soft_from_logit and in_mask.

    threshold is in the compute dtype (as soft_from_logit's s).
    """
    s = soft_from_logit(z)
    return s, s > threshold


@triton.jit
def _dynamic_mask_scores_kernel(
    kernels_ptr,  # (K, E) contiguous: the candidates' dynamic kernels, sorted stably by image
    feats_ptr,  # (N, E, P) contiguous mask features, kernels' dtype
    tile_image_ptr,  # (T,) int64: the image of each candidate tile
    row_begin_ptr,  # (T,) int64: first sorted candidate of each tile
    row_end_ptr,  # (T,) int64: end of the tile's image segment (the tile holds
    #               [row_begin, min(row_begin + BLOCK_M, row_end)))
    threshold_ptr,  # (1,) the threshold in kernels' dtype (as torch compares s > threshold)
    area_ptr,  # (K, Q) int32 out: thresholded pixels of each sorted candidate and pixel tile
    soft_ptr,  # (K, Q) float64 out: sum of s over those pixels
    order_ptr,  # (K,) int64: the original row of each sorted candidate (read if PACK_MASKS)
    packed_ptr,  # (K, Wd) int64 out, rows in the original order (written if PACK_MASKS)
    num_channels,  # E: the row stride of kernels
    num_pixels,  # P: the channel stride of feats
    num_tiles,  # T: program p takes candidate tile p % T and pixel tile p // T
    num_pixel_tiles,  # Q: the row stride of area and soft
    num_words,  # Wd: the row stride of packed
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # a multiple of 64 if PACK_MASKS: a tile holds whole words
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # tl.dot's: "ieee" for float32 (no TF32 rounding of z)
    PACK_MASKS: tl.constexpr,
):
    program = tl.program_id(0)
    tile = program % num_tiles
    pixel_tile = program // num_tiles
    image = tl.load(tile_image_ptr + tile)
    row_begin = tl.load(row_begin_ptr + tile)
    row_end = tl.load(row_end_ptr + tile)
    # int64 rows: K * E and K * Q may pass 2^31.
    rows = row_begin + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    channels = tl.arange(0, BLOCK_K)
    acc_dtype: tl.constexpr = tl.float64 if kernels_ptr.dtype.element_ty == tl.float64 \
        else tl.float32
    threshold = tl.load(threshold_ptr).to(acc_dtype)
    feats_image = feats_ptr + image * num_channels * num_pixels

    cols = pixel_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_pixels
    a_ptrs = kernels_ptr + rows[:, None] * num_channels + channels[None, :]
    # Offsets inside one image stay 32-bit (BLOCK_K * P < 2^31); the image base is 64-bit.
    b_ptrs = feats_image + channels[:, None] * num_pixels + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for k0 in range(0, num_channels, BLOCK_K):
        k_ok = channels < num_channels - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * num_pixels
    # z rounds to the input dtype, as the reference's matmul output does.
    s, above = _soft_above(acc.to(kernels_ptr.dtype.element_ty), threshold)
    keep = above & row_ok[:, None] & col_ok[None, :]
    out = rows * num_pixel_tiles + pixel_tile
    tl.store(area_ptr + out, tl.sum(keep.to(tl.int32), axis=1), mask=row_ok)
    tl.store(soft_ptr + out, tl.sum(tl.where(keep, s.to(tl.float64), 0.0), axis=1), mask=row_ok)

    if PACK_MASKS:
        WORDS: tl.constexpr = BLOCK_N // 64
        # 2^b at pixel 64 w + b of the tile (which starts on a word).
        bits = tl.full([BLOCK_N], 1, tl.int64) << (tl.arange(0, BLOCK_N) % 64).to(tl.int64)
        # Distinct powers of two: their sum is their OR, without carries (bit 63 included).
        words = tl.sum(tl.reshape(tl.where(keep, bits[None, :], 0), (BLOCK_M, WORDS, 64)),
                       axis=2)  # (BLOCK_M, WORDS)
        word_index = pixel_tile * WORDS + tl.arange(0, WORDS)  # (WORDS,)
        original = tl.load(order_ptr + rows, mask=row_ok, other=0)  # (BLOCK_M,) rows of packed
        # Words wholly past P (the last tile's second one at BLOCK_N = 128) do not exist.
        tl.store(packed_ptr + original[:, None] * num_words + word_index[None, :], words,
                 mask=row_ok[:, None] & (word_index < num_words)[None, :])


# ----------------------------------------------------------------------------------------------
# Host launcher


def launch_config(dtype: torch.dtype) -> dict[str, object]:
    """Tile sizes and warps of the kernel for features of ``dtype``.

    float32 runs tl.dot in "ieee" precision (FMA, no TF32: z must round as a float32 matmul, or
    pixels near the threshold flip). Its FMA lowering holds a BLOCK_K slice of both operands per
    thread, so the tile is 64 x 64 on 8 warps: larger tiles spilled on sm_90 in the compile report
    (64 x 128: 128 registers, 32 bytes of stack). That was with a loop over pixel tiles in each
    program; without it 64 x 128 compiles to 159-172 registers and no stack (not timed: no GPU).
    float64 takes the same tile; float16/bfloat16 go to the tensor cores with 64 x 128 x 32 tiles.
    """
    if dtype in (torch.float32, torch.float64):
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8}


def _input_precision(dtype: torch.dtype) -> str:
    # fp16/bf16 tiles go to the tensor cores unchanged; "ieee" only means something for float32.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def dynamic_mask_scores_triton(kernels: Tensor, mask_feats: Tensor, image: Tensor,
                               threshold: float, pack_masks: bool = False, *,
                               check_index: bool = True, block_m: int | None = None,
                               block_n: int | None = None,
                               block_k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Area and soft sum of every candidate's thresholded soft mask, without storing soft masks.

    Args:
        kernels: (K, E) dynamic kernels; float16, bfloat16 (accumulated in float32), float32 or
            float64; CUDA, or CPU under ``TRITON_INTERPRET=1`` (no bfloat16 there).
        mask_feats: (N, E, P) or (N, E, H, W) mask features, kernels' dtype and device.
        image: (K,) int64 in [0, N): the image of each candidate, in any order.
        threshold: s counts where ``s > threshold`` (compared in kernels' dtype, as torch does).
        pack_masks: also return the binary masks, bit-packed (the op schema's positional flag).
        check_index: check that image lies in [0, N), in the device-to-host copy that reads the
            grid size anyway; False: the caller built image in range.
        block_m, block_n, block_k: tile sizes (powers of two, at least 16; block_n at least 64
            with ``pack_masks``); None: ``launch_config``'s. For tests.

    Returns:
        area: (K,) int64, ``#{pixels: s > threshold}`` with ``s = sigmoid(kernels[k] .
            mask_feats[image[k]])``.
        soft_sum: (K,) float64, the sum of s over those pixels (per tile in float64, tiles
            summed in a fixed order).
        packed: with ``pack_masks``, (K, Wd) int64 with Wd = ceil(P / 64), row k candidate k's
            mask as ``matrix_nms_pack`` packs it: bit b of word w is set iff pixel 64 w + b is
            counted in area[k] (tail bits 0), so popcount(packed[k]) == area[k]. Without it the
            empty (0, Wd).

    Raises:
        ValueError: image out of range (with ``check_index``), tiles that do not fit the mask
            or CUDA's grid. The other rules are checked before:
            ``solo_fast.ops.dynamic_mask_scores``'s contract.
    """
    num_candidates, num_channels = kernels.shape
    num_images = mask_feats.shape[0]
    num_pixels = mask_feats.shape[2:].numel()
    feats = mask_feats.reshape(num_images, num_channels, num_pixels).contiguous()  # (N, E, P)
    device = kernels.device
    area = torch.zeros(num_candidates, dtype=torch.int64, device=device)
    soft_sum = torch.zeros(num_candidates, dtype=torch.float64, device=device)
    num_words = -(-num_pixels // _WORD_BITS)
    # Not zero-filled: the kernel writes every word of every row (see the module docstring).
    packed = torch.empty((num_candidates if pack_masks else 0, num_words), dtype=torch.int64,
                         device=device)  # (K, Wd) or (0, Wd)
    config = launch_config(kernels.dtype)
    block_m = config["BLOCK_M"] if block_m is None else block_m
    block_n = config["BLOCK_N"] if block_n is None else block_n
    block_k = config["BLOCK_K"] if block_k is None else block_k
    if pack_masks and block_n % _WORD_BITS != 0:
        raise ValueError(f"dynamic_mask_scores (triton): with pack_masks, block_n must be a "
                         f"multiple of {_WORD_BITS} (whole words per tile), got {block_n}")
    if num_candidates == 0:
        return area, soft_sum, packed
    if block_k * num_pixels >= 2**31:
        raise ValueError(f"dynamic_mask_scores (triton): at most {(2**31 - 1) // block_k} pixels "
                         f"per mask, got {num_pixels}")

    # Candidate tiles: the sorted candidates of image n are [segment[n], segment[n + 1]), taken
    # BLOCK_M at a time. Stable, so a tile's rows are in ascending k (as the C++ kernel's).
    sorted_image, order = torch.sort(image, stable=True)  # (K,), (K,)
    boundaries = torch.arange(num_images + 1, dtype=torch.int64, device=device)  # (N + 1,)
    segment = torch.searchsorted(sorted_image, boundaries)  # (N + 1,)
    tiles = (segment.diff() + block_m - 1) // block_m  # (N,)
    # One device-to-host copy: the index bounds (no program may read out of bounds) and the
    # number of candidate tiles (the grid).
    if check_index:
        low, high, num_tiles = torch.stack([image.min(), image.max(), tiles.sum()]).tolist()
        if low < 0 or high >= num_images:
            raise ValueError(f"dynamic_mask_scores: image must lie in [0, N) = [0, {num_images}),"
                             f" got values in [{low}, {high}]")
    else:
        num_tiles = int(tiles.sum())
    if num_pixels == 0:
        return area, soft_sum, packed
    tile_image = torch.repeat_interleave(
        torch.arange(num_images, device=device), tiles, output_size=num_tiles)  # (T,)
    first_tile = tiles.cumsum(0) - tiles  # (N,)
    local = torch.arange(num_tiles, device=device) - first_tile[tile_image]  # (T,)
    row_begin = (segment[tile_image] + local * block_m).contiguous()  # (T,)
    row_end = segment[tile_image + 1].contiguous()  # (T,)
    sorted_kernels = kernels.index_select(0, order).contiguous()  # (K, E)
    threshold_t = threshold_tensor(threshold, kernels.dtype, device)  # (1,)

    num_pixel_tiles = -(-num_pixels // block_n)
    if num_tiles * num_pixel_tiles > MAX_PROGRAMS:
        raise ValueError(f"dynamic_mask_scores (triton): {num_tiles} candidate tiles x "
                         f"{num_pixel_tiles} pixel tiles is more than CUDA's {MAX_PROGRAMS} "
                         f"programs; score the candidates in smaller batches")
    partial_area = torch.empty((num_candidates, num_pixel_tiles), dtype=torch.int32,
                               device=device)  # (K, Q)
    partial_soft = torch.empty((num_candidates, num_pixel_tiles), dtype=torch.float64,
                               device=device)  # (K, Q)
    with device_guard(kernels):
        _dynamic_mask_scores_kernel[(num_tiles * num_pixel_tiles,)](
            sorted_kernels, feats, tile_image.contiguous(), row_begin, row_end, threshold_t,
            partial_area, partial_soft, order, packed, num_channels, num_pixels, num_tiles,
            num_pixel_tiles, num_words, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            INPUT_PRECISION=_input_precision(kernels.dtype), PACK_MASKS=pack_masks,
            num_warps=config["num_warps"])
    # Sorted position -> candidate: order is a permutation, so each output is written once.
    area.index_copy_(0, order, partial_area.sum(dim=1, dtype=torch.int64))
    soft_sum.index_copy_(0, order, partial_soft.sum(dim=1))
    return area, soft_sum, packed
