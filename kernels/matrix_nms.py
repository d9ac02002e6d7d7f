"""Triton kernels of Matrix NMS (docs/algorithms.md §11) on bit-packed masks, and their host
launchers (SOLOv2's NMS, every family uses it).

Two host functions with the contract of the ATen ops ``solo_fast::matrix_nms_pack`` and
``solo_fast::matrix_nms_decay`` (``csrc/solo_fast.cpp``); the sorts, the ``nms_pre`` cut, the
filter and ``max_num`` stay in ``solo_fast/ops/matrix_nms.py``.

* ``matrix_nms_pack``: bit b of word w of a row is pixel 64 w + b of the flattened mask.
* ``matrix_nms_decay``: masks sorted by descending score within each segment (image). Only pairs
  of one segment and one label interact, so the candidates are first put in (segment, label)
  order by two stable sorts, which keep the score order inside every group; a group is then a
  contiguous run of positions and the work is the sum of its triangles, not n^2 / 2. Four
  launches, no atomics, every output element written by one program (deterministic):

  1. word ranges: the first and one-past-last nonzero word of every mask, so that a tile of pairs
     ANDs only the words where its masks can overlap;
  2. IoU: program (row tile, column tile) of the upper triangle of the position x position
     matrix popcounts the AND of every pair of its tile over the tile's word range and stores
     iou for the pairs i < j of one group (other entries are never written nor read);
  3. compensation: program (column block) takes comp_j = max(0, max over i of iou_ij), the
     column max, over row tiles of the columns' groups, and stores f(comp_j);
  4. decay: program (column block) takes min(1, min over i of f(iou_ij) / f(comp_i)) likewise,
     and scatters it to the candidates' input rows.

The arithmetic is that of ``csrc/matrix_nms.h`` operation for operation: iou in the areas'
dtype from an exact integer intersection, f evaluated per value and divided (not
exp(-sigma (d^2 - c^2))), the linear kernel's 0/0 -> 0, and NaN propagating through min and max as
in torch. On a GPU, popcount and exp are libdevice's (``__nv_popcll``, and ``__nv_expf`` /
``__nv_exp`` without flush-to-zero: the code nvcc emits for CUDA's ``expf`` / ``exp``, so the
Triton and CUDA kernels agree bit for bit); the interpreter has no libdevice, and takes a SWAR
popcount and numpy's exp (within an ulp of torch's).
"""

# N=candidates of all segments, B=segments (images), H, W=mask size, P=H*W pixels,
# WD=ceil(P / 64) packed words per mask; a "position" indexes the (segment, label)-grouped order

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ._common import device_guard

__all__ = ["GAUSSIAN", "LINEAR", "matrix_nms_decay", "matrix_nms_pack"]

GAUSSIAN = 0
LINEAR = 1

# Pack: words per program of the flattened (N, WD) output (4096 pixels, 32 bytes per thread at
# 4 warps); masks of 200 x 272 pixels (850 words) take 14 programs each.
PACK_WORDS = 64
# Word ranges: masks per program, words per step.
RANGE_ROWS = 16
RANGE_WORDS = 64
# IoU: a program owns TILE x TILE pairs and ANDs TILE_WORDS words of each per step
# (TILE * TILE * TILE_WORDS = 8192 pair-words in flight, 32 per thread at 8 warps); each word
# loaded serves TILE pairs.
TILE = 32
TILE_WORDS = 8
TILE_WARPS = 8
# Compensation and decay: a program owns COLUMNS columns and walks the rows of their groups
# ROWS at a time (n = 500: 16 programs of at most 16 steps).
COLUMNS = 32
ROWS = 32
# Compile options of the kernels that evaluate f: Triton links libdevice with flush-to-zero by
# default, which would make exp(-sigma x^2) 0 where CUDA's expf (nvcc without -ftz, as the CUDA
# kernel is built) and torch return a subnormal (sigma x^2 between 87.3 and 103.9).
EXP_OPTIONS = {"enable_reflect_ftz": False}


@triton.jit
def _popcount(x, USE_LIBDEVICE: tl.constexpr):
    """Set bits of each int64 of x, as int32."""
    if USE_LIBDEVICE:
        return libdevice.popc(x)
    else:
        # SWAR on the unsigned bits: logical shifts; the final multiply sums the eight bytes.
        u = x.to(tl.uint64, bitcast=True)
        u = u - ((u >> 1) & 0x5555555555555555)
        u = (u & 0x3333333333333333) + ((u >> 2) & 0x3333333333333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F0F0F0F0F
        return ((u * 0x0101010101010101) >> 56).to(tl.int32)


@triton.jit
def _divide(x, y):
    """x / y rounded to nearest (tl's float32 ``/`` may lower to an approximate division)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _kernel_value(x, neg_sigma, KERNEL: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """f(x): exp(-sigma * x^2) (gaussian, -sigma in x's dtype, x * x first) or 1 - x (linear)."""
    if KERNEL == 0:
        z = neg_sigma * (x * x)
        if USE_LIBDEVICE:
            # tl.exp on float32 is ex2.approx(z * log2 e); libdevice's is CUDA's expf.
            return libdevice.exp(z)
        else:
            return tl.exp(z)
    else:
        return 1.0 - x


@triton.jit
def _matrix_nms_pack_kernel(
    mask_ptr,  # (N, P) contiguous uint8 (bool storage read as bytes); nonzero = in the mask
    packed_ptr,  # (N, WD) contiguous int64 output, BLOCK_WORDS of its N * WD words per program
    num_pixels,  # P
    num_words,  # WD
    total_words,  # N * WD
    BLOCK_WORDS: tl.constexpr,
):
    # Words of the flattened (N, WD) output: small masks still fill a program.
    index = tl.program_id(0).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    row = index // num_words
    word = (index - row * num_words).to(tl.int32)
    bits = tl.arange(0, 64)
    pixels = word[:, None] * 64 + bits[None, :]  # (BLOCK_WORDS, 64) within the row
    inside = (index[:, None] < total_words) & (pixels < num_pixels)
    values = tl.load(mask_ptr + row[:, None] * num_pixels + pixels, mask=inside, other=0)
    one = tl.full([BLOCK_WORDS, 64], 1, tl.int64)
    # Distinct powers of two: their sum is their OR, without carries (bit 63 included).
    packed = tl.sum(tl.where(values != 0, one << bits[None, :].to(tl.int64), 0), axis=1)
    tl.store(packed_ptr + index, packed, mask=index < total_words)


@triton.jit
def _matrix_nms_word_range_kernel(
    packed_ptr,  # (N, WD) contiguous int64, rows in input order
    order_ptr,  # (N,) int64: input row of each position
    first_ptr,  # (N,) int32 output per position: first nonzero word (WD for an empty mask)
    end_ptr,  # (N,) int32 output per position: last nonzero word + 1 (0 for an empty mask)
    num,  # N
    num_words,  # WD
    BLOCK_ROWS: tl.constexpr,  # positions per program
    BLOCK_WORDS: tl.constexpr,  # words per step
):
    positions = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
    position_in = positions < num
    row_ptr = packed_ptr + tl.load(order_ptr + positions, mask=position_in, other=0) * num_words
    lanes = tl.arange(0, BLOCK_WORDS)
    first = tl.full([BLOCK_ROWS, BLOCK_WORDS], num_words, tl.int32)
    end = tl.zeros([BLOCK_ROWS, BLOCK_WORDS], tl.int32)
    for start in range(0, num_words, BLOCK_WORDS):
        words = start + lanes  # (BLOCK_WORDS,)
        nonzero = tl.load(row_ptr[:, None] + words[None, :],
                          mask=position_in[:, None] & (words < num_words)[None, :], other=0) != 0
        first = tl.minimum(first, tl.where(nonzero, words[None, :], num_words))
        end = tl.maximum(end, tl.where(nonzero, words[None, :] + 1, 0))
    tl.store(first_ptr + positions, tl.min(first, axis=1), mask=position_in)
    tl.store(end_ptr + positions, tl.max(end, axis=1), mask=position_in)


@triton.jit
def _matrix_nms_iou_kernel(
    packed_ptr,  # (N, WD) contiguous int64, rows in input order
    order_ptr,  # (N,) int64: input row of each position
    group_start_ptr,  # (N,) int32: first position of each position's (segment, label) group
    first_ptr,  # (N,) int32: first nonzero word per position
    end_ptr,  # (N,) int32: last nonzero word + 1 per position
    area_ptr,  # (N,) float32 or float64 per position: the compute dtype
    iou_ptr,  # (N, N) contiguous, area's dtype: iou[i, j] written for i < j of one group only
    tile_ptr,  # (2, T) int64: row and column tile of each program, the upper triangle's tiles
    num_tiles,  # T: the stride of tile's first axis
    num,  # N
    num_words,  # WD
    TILE: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
):
    program = tl.program_id(0)
    rows = tl.load(tile_ptr + program) * TILE + tl.arange(0, TILE)  # (TILE,) positions i
    cols = tl.load(tile_ptr + num_tiles + program) * TILE + tl.arange(0, TILE)  # positions j
    row_in = rows < num
    col_in = cols < num
    row_group = tl.load(group_start_ptr + rows, mask=row_in, other=-1)
    col_group = tl.load(group_start_ptr + cols, mask=col_in, other=-2)
    pair = (row_group[:, None] == col_group[None, :]) & (rows[:, None] < cols[None, :])
    row_used = tl.max(pair.to(tl.int32), axis=1) > 0  # (TILE,)
    col_used = tl.max(pair.to(tl.int32), axis=0) > 0  # (TILE,)
    # Words outside [lo, hi) are zero in every row or in every column of a pair: their ANDs are
    # zero. A tile without pairs (below the diagonal, or across groups) gets an empty range.
    row_first = tl.load(first_ptr + rows, mask=row_used, other=num_words)
    col_first = tl.load(first_ptr + cols, mask=col_used, other=num_words)
    row_end = tl.load(end_ptr + rows, mask=row_used, other=0)
    col_end = tl.load(end_ptr + cols, mask=col_used, other=0)
    lo = tl.maximum(tl.min(row_first, axis=0), tl.min(col_first, axis=0))
    hi = tl.minimum(tl.max(row_end, axis=0), tl.max(col_end, axis=0))

    row_ptr = packed_ptr + tl.load(order_ptr + rows, mask=row_used, other=0) * num_words
    col_ptr = packed_ptr + tl.load(order_ptr + cols, mask=col_used, other=0) * num_words
    lanes = tl.arange(0, BLOCK_WORDS)
    inter = tl.zeros([TILE, TILE], tl.int32)
    for start in range(lo, hi, BLOCK_WORDS):
        words = start + lanes
        in_range = words < hi
        a = tl.load(row_ptr[:, None] + words[None, :], mask=row_used[:, None] & in_range[None, :],
                    other=0)  # (TILE, BLOCK_WORDS)
        b = tl.load(col_ptr[:, None] + words[None, :], mask=col_used[:, None] & in_range[None, :],
                    other=0)  # (TILE, BLOCK_WORDS)
        both = a[:, None, :] & b[None, :, :]  # (TILE, TILE, BLOCK_WORDS)
        inter += tl.sum(_popcount(both, USE_LIBDEVICE), axis=2)

    area_i = tl.load(area_ptr + rows, mask=row_in, other=1)
    area_j = tl.load(area_ptr + cols, mask=col_in, other=1)
    overlap = inter.to(area_i.dtype)
    iou = _divide(overlap, (area_i[:, None] + area_j[None, :]) - overlap)
    tl.store(iou_ptr + rows.to(tl.int64)[:, None] * num + cols[None, :], iou, mask=pair)


@triton.jit
def _matrix_nms_compensation_kernel(
    iou_ptr,  # (N, N) contiguous: iou[i, j] for i < j of one group (the IoU kernel's output)
    group_start_ptr,  # (N,) int32 per position
    neg_sigma_ptr,  # (1,) -sigma in iou's dtype
    f_comp_ptr,  # (N,) iou's dtype output per position: f(comp)
    num,  # N
    KERNEL: tl.constexpr,  # 0 gaussian, 1 linear
    BLOCK_I: tl.constexpr,  # rows per step
    BLOCK_J: tl.constexpr,  # columns per program
    USE_LIBDEVICE: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,) positions j
    col_in = cols < num
    starts = tl.load(group_start_ptr + cols, mask=col_in, other=num)
    lanes = tl.arange(0, BLOCK_I)
    row_stride = num.to(tl.int64)  # 64-bit row offsets past N = 46341
    comp = tl.zeros([BLOCK_J], iou_ptr.dtype.element_ty)
    # torch.max lets a NaN win; tl.max's NaN handling differs between GPU and interpreter, so
    # NaNs are counted apart and the maximum taken over the other values.
    nan_seen = tl.zeros([BLOCK_J], tl.int32)
    # Rows from the first column's group start up to the last column, BLOCK_I at a time.
    for row_begin in range(tl.min(starts, axis=0), tl.max(tl.where(col_in, cols, 0), axis=0),
                           BLOCK_I):
        rows = row_begin + lanes  # (BLOCK_I,)
        valid = (col_in[None, :] & (rows[:, None] >= starts[None, :])
                 & (rows[:, None] < cols[None, :]))  # (BLOCK_I, BLOCK_J)
        x = tl.load(iou_ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                    mask=valid, other=0)
        nan_seen = tl.maximum(nan_seen, tl.max(tl.where(valid & (x != x), 1, 0), axis=0))
        comp = tl.maximum(comp, tl.max(tl.where(valid & (x == x), x, 0), axis=0))
    comp = tl.where(nan_seen > 0, float("nan"), comp)
    tl.store(f_comp_ptr + cols, _kernel_value(comp, tl.load(neg_sigma_ptr), KERNEL, USE_LIBDEVICE),
             mask=col_in)


@triton.jit
def _matrix_nms_decay_kernel(
    iou_ptr,  # (N, N) contiguous: iou[i, j] for i < j of one group
    group_start_ptr,  # (N,) int32 per position
    f_comp_ptr,  # (N,) iou's dtype per position: f(comp) (the compensation kernel's output)
    order_ptr,  # (N,) int64: input row of each position
    neg_sigma_ptr,  # (1,) -sigma in iou's dtype
    decay_ptr,  # (N,) iou's dtype output, per input row
    num,  # N
    KERNEL: tl.constexpr,  # 0 gaussian, 1 linear
    BLOCK_I: tl.constexpr,  # rows per step
    BLOCK_J: tl.constexpr,  # columns per program
    USE_LIBDEVICE: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,) positions j
    col_in = cols < num
    starts = tl.load(group_start_ptr + cols, mask=col_in, other=num)
    lanes = tl.arange(0, BLOCK_I)
    row_stride = num.to(tl.int64)
    neg_sigma = tl.load(neg_sigma_ptr)
    decay = tl.full([BLOCK_J], 1.0, iou_ptr.dtype.element_ty)
    nan_seen = tl.zeros([BLOCK_J], tl.int32)  # torch.min lets a NaN win, as in the compensation
    for row_begin in range(tl.min(starts, axis=0), tl.max(tl.where(col_in, cols, 0), axis=0),
                           BLOCK_I):
        rows = row_begin + lanes  # (BLOCK_I,)
        valid = (col_in[None, :] & (rows[:, None] >= starts[None, :])
                 & (rows[:, None] < cols[None, :]))  # (BLOCK_I, BLOCK_J)
        x = tl.load(iou_ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                    mask=valid, other=0)
        f_comp = tl.load(f_comp_ptr + rows, mask=rows < num, other=1)[:, None]  # (BLOCK_I, 1)
        f_iou = _kernel_value(x, neg_sigma, KERNEL, USE_LIBDEVICE)
        ratio = _divide(f_iou, f_comp)
        if KERNEL == 1:
            ratio = tl.where((f_iou == 0) & (f_comp == 0), 0.0, ratio)  # the reference's 0/0 -> 0
        nan_seen = tl.maximum(nan_seen,
                              tl.max(tl.where(valid & (ratio != ratio), 1, 0), axis=0))
        decay = tl.minimum(decay, tl.min(tl.where(valid & (ratio == ratio), ratio, 1.0), axis=0))
    decay = tl.where(nan_seen > 0, float("nan"), decay)
    rows = tl.load(order_ptr + cols, mask=col_in, other=0)
    tl.store(decay_ptr + rows, decay, mask=col_in)


# ----------------------------------------------------------------------------------------------
# Host launchers

# Triton decides at decoration time whether kernels are interpreted (TRITON_INTERPRET=1); the
# interpreter cannot call libdevice.
_INTERPRETED = not isinstance(_matrix_nms_iou_kernel, triton.runtime.jit.JITFunction)


def _use_libdevice(tensor: Tensor) -> bool:
    return tensor.is_cuda and not _INTERPRETED


def matrix_nms_pack(masks: Tensor) -> Tensor:
    """Bit-packs binary masks, 64 pixels per int64 word.

    Args:
        masks: (N, H, W) bool or uint8 (nonzero = in the mask); CUDA, or CPU under
            ``TRITON_INTERPRET=1``.

    Returns:
        (N, ceil(H * W / 64)) int64: bit b of word w holds pixel 64 w + b of the row-major
        flattened mask; the bits past H * W are zero.

    Raises:
        ValueError: masks of 2^31 pixels or more (Triton's int32 offsets). The other rules are
            checked before: ``solo_fast.ops.matrix_nms``'s op contract.
    """
    num, height, width = masks.shape
    num_pixels = height * width
    if num_pixels >= 2**31:
        raise ValueError(f"matrix_nms_pack (triton): masks must have fewer than 2^31 pixels, got "
                         f"{height} x {width}")
    num_words = triton.cdiv(num_pixels, 64)
    packed = torch.empty((num, num_words), dtype=torch.int64, device=masks.device)  # (N, WD)
    if num == 0 or num_words == 0:
        return packed
    flat = masks.reshape(num, num_pixels).contiguous()  # (N, P)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)  # bool storage is one byte, 0 or 1
    with device_guard(masks):
        _matrix_nms_pack_kernel[(triton.cdiv(num * num_words, PACK_WORDS),)](
            flat, packed, num_pixels, num_words, num * num_words, BLOCK_WORDS=PACK_WORDS,
            num_warps=4)
    return packed


def _group_positions(labels: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:
    """(order (N,) int64, group_start (N,) int32): positions grouped by (segment, label), score
    order kept.

    order[p] is the input row at position p; group_start[p] the first position of p's group.
    """
    num = labels.shape[0]
    positions = torch.arange(num, device=labels.device)  # (N,)
    segment = torch.searchsorted(segments[1:].contiguous(), positions, right=True)  # (N,)
    # Two stable sorts: by label, then by segment; rows stay ascending (best score first) within
    # each (segment, label).
    _, by_label = torch.sort(labels, stable=True)
    _, by_segment = torch.sort(segment[by_label], stable=True)
    order = by_label[by_segment]  # (N,)
    segment, label = segment[order], labels[order]
    starts = torch.ones(num, dtype=torch.bool, device=labels.device)  # (N,)
    starts[1:] = (segment[1:] != segment[:-1]) | (label[1:] != label[:-1])
    group_start = torch.where(starts, positions, 0).cummax(0).values  # (N,)
    return order.contiguous(), group_start.to(torch.int32).contiguous()


def matrix_nms_decay(packed: Tensor, labels: Tensor, areas: Tensor, segments: Tensor,
                     kernel: int, sigma: float) -> Tensor:
    """Matrix NMS decay coefficient of every candidate, from bit-packed masks.

    Args:
        packed: (N, WD) int64 from ``matrix_nms_pack``, rows sorted by descending score within
            each segment; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        labels: (N,) int64 class of each row.
        areas: (N,) float32 or float64 area of each row, used as given; the compute dtype.
        segments: (B + 1,) int64 offsets: rows segments[b] .. segments[b + 1] - 1 are image b's;
            only pairs within one segment interact. ``[0, N]`` for a single image.
        kernel: 0 (gaussian) or 1 (linear).
        sigma: gaussian parameter, f(x) = exp(-sigma x^2); unused by the linear kernel.

    Returns:
        decay (N,) in areas' dtype: decay_j = min(1, min over rows i < j of j's segment and label
        of f(iou_ij) / f(comp_i)), comp_i = max(0, max over such k < i of iou_ki), with the
        linear kernel's 0/0 -> 0 and NaN propagating as in ``matrix_nms_reference``.

    The arguments were checked before: ``solo_fast.ops.matrix_nms``'s op contract.
    """
    num, num_words = packed.shape
    decay = torch.empty(num, dtype=areas.dtype, device=packed.device)  # (N,)
    if num == 0:
        return decay
    packed = packed.contiguous()
    order, group_start = _group_positions(labels, segments)
    area = areas[order].contiguous()  # (N,) per position
    # -sigma rounded to the compute dtype, as torch rounds the reference's Python scalar.
    neg_sigma = torch.full((1,), -float(sigma), dtype=areas.dtype, device=packed.device)
    first = torch.empty(num, dtype=torch.int32, device=packed.device)  # (N,)
    end = torch.empty(num, dtype=torch.int32, device=packed.device)  # (N,)
    # Entries outside the groups' triangles are never written nor read.
    iou = torch.empty((num, num), dtype=areas.dtype, device=packed.device)  # (N, N)
    f_comp = torch.empty(num, dtype=areas.dtype, device=packed.device)  # (N,)
    use_libdevice = _use_libdevice(packed)
    num_tiles = triton.cdiv(num, TILE)
    # The tiles on and above the diagonal: tiles below it hold no pair i < j.
    tile = torch.triu_indices(num_tiles, num_tiles, device=packed.device)  # (2, T)
    columns = triton.cdiv(num, COLUMNS)
    with device_guard(packed):
        _matrix_nms_word_range_kernel[(triton.cdiv(num, RANGE_ROWS),)](
            packed, order, first, end, num, num_words, BLOCK_ROWS=RANGE_ROWS,
            BLOCK_WORDS=RANGE_WORDS, num_warps=4)
        _matrix_nms_iou_kernel[(tile.shape[1],)](
            packed, order, group_start, first, end, area, iou, tile, tile.shape[1], num,
            num_words, TILE=TILE, BLOCK_WORDS=TILE_WORDS, USE_LIBDEVICE=use_libdevice,
            num_warps=TILE_WARPS)
        _matrix_nms_compensation_kernel[(columns,)](
            iou, group_start, neg_sigma, f_comp, num, KERNEL=kernel, BLOCK_I=ROWS,
            BLOCK_J=COLUMNS, USE_LIBDEVICE=use_libdevice, num_warps=4, **EXP_OPTIONS)
        _matrix_nms_decay_kernel[(columns,)](
            iou, group_start, f_comp, order, neg_sigma, decay, num, KERNEL=kernel,
            BLOCK_I=ROWS, BLOCK_J=COLUMNS, USE_LIBDEVICE=use_libdevice, num_warps=4,
            **EXP_OPTIONS)
    return decay
