"""Triton kernel of vanilla SOLO's candidate mask scoring, and its host launcher.

Candidate k (grid cell ``channel[k]`` of image ``image[k]`` at one level) has the soft mask
s = bilinear_resize(sigmoid(mask_preds[n, q]), (H, W)) (docs/algorithms.md §10.3;
align_corners=False, no antialias), of which inference needs only area[k] = #{s > threshold} and
soft_sum[k] = sum of s over those pixels. mmdetection resizes every candidate's map to (H, W) to get
them; here nothing of size K x H x W is stored and each source sample's sigmoid is computed once per
tile.

Program (candidate, tile of TILE_H x TILE_W output pixels):
  1. the output rows' and columns' source indices and weights (taps);
  2. the band of source samples the tile reads (BAND_H x BAND_W, at the first taps' indices) as
     probabilities: one sigmoid per sample, where a x4 level reads each sample for 16 pixels;
  3. the resize, separable as torch computes it: every band row interpolated at the tile's
     columns (a gather along the band's columns), then per pixel its two rows combined (a gather
     along the band rows), rounded to the input dtype;
  4. the thresholded count and float64 sum, one partial per program, summed on the host in a
     fixed order.
The host measures the band a tile can read from the taps' arithmetic (with slack) and picks
power-of-two band sizes that hold it.

Arithmetic: ``csrc/solo_mask_scores.h`` operation for operation (torch's CPU formula: an FMA'd
source index, weights rounded to the input dtype, width first with the first product fused), with
``tl.fma`` where it fuses and nothing left for the compiler to contract. Triton's interpreter
evaluates ``tl.fma`` as a product and a sum rounded twice, so on CPU tensors (interpreted) the
FMA is emulated: float32 in float64, float64 with Dekker's exact product and Knuth's exact sum.
Both round once but in double-rounding near-ties (0 differing pixels in the checks). The sigmoid
is ``kernels/dynamic_mask_scores.py``'s.
"""

# N=images, Q=channels of the level, K=candidates, h, w=source map, H, W=output map,
# T=tiles per candidate

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import MAX_PROGRAMS, device_guard, soft_from_logit, threshold_tensor

__all__ = ["launch_config", "solo_mask_scores_triton"]

# Output pixels per program (16 per thread of 4 warps; half that for float64).
_TILE_PIXELS = {torch.float64: 1024}
_DEFAULT_TILE_PIXELS = 2048
# Band samples (and band rows x tile columns) per program: the band and its width-interpolated
# rows are register tensors, gathered through shared memory.
_BAND_LIMIT = {torch.float64: 2048}
_DEFAULT_BAND_LIMIT = 4096
# The widest tile: a 272-wide map in 64-wide tiles wastes 15%, in 128-wide ones 29%.
_MAX_TILE_W = 64


@triton.jit
def _fma(a, b, c, EMULATE_FMA: tl.constexpr):
    """a * b + c rounded once (csrc's fma_rn); a, b, c of one shape and dtype."""
    if EMULATE_FMA and a.dtype == tl.float32:
        # The interpreter's tl.fma rounds the product: the float32 product is exact in float64.
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    elif EMULATE_FMA:
        # float64: a * b = ph + pl exactly (Dekker's product, halves split at 2^27 + 1, built as
        # a float64 tensor: a Python float constant would be a float32), ph + c = s + e exactly
        # (Knuth's sum); s + (e + pl) is a * b + c rounded once but in near-tie cases.
        split = tl.full(a.shape, 134217729.0, tl.float64)
        t = a * split
        a_hi = t - (t - a)
        t = b * split
        b_hi = t - (t - b)
        a_lo = a - a_hi
        b_lo = b - b_hi
        ph = a * b
        pl = ((a_hi * b_hi - ph) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
        s = ph + c
        t = s - ph
        e = (ph - (s - t)) + (c - t)
        return s + (e + pl)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _bilinear_taps(dst, size_in, size_out, prob_dtype: tl.constexpr, acc_dtype: tl.constexpr,
                   EMULATE_FMA: tl.constexpr):
    """(i0, i1, l0, l1) of output coordinates dst (int32): csrc's bilinear_tap, elementwise."""
    # The sizes as tensors of dst's shape: Triton passes an int argument equal to 1 as a constexpr.
    size_in = tl.zeros_like(dst) + size_in
    size_out = tl.zeros_like(dst) + size_out
    if acc_dtype == tl.float64:
        scale = size_in.to(acc_dtype) / size_out.to(acc_dtype)
    else:
        # The IEEE division: Triton's float32 `/` is a 2-ulp one.
        scale = tl.math.div_rn(size_in.to(acc_dtype), size_out.to(acc_dtype))
    src = _fma(scale, dst.to(acc_dtype) + 0.5, tl.full(dst.shape, -0.5, acc_dtype), EMULATE_FMA)
    src = tl.where(src < 0, 0.0, src)
    # torch floors the float32 value, even for float64 maps.
    i0 = tl.floor(src.to(tl.float32)).to(tl.int32)
    i0 = tl.minimum(i0, size_in - 1)
    l1 = src - i0.to(acc_dtype)
    l1 = tl.where(l1 < 0, 0.0, tl.where(l1 > 1, 1.0, l1))
    # torch stores the weights in the input dtype: l1 rounded, then l0 = 1 - l1 rounded.
    l1 = l1.to(prob_dtype).to(acc_dtype)
    l0 = (1.0 - l1).to(prob_dtype).to(acc_dtype)
    i1 = i0 + (i0 < size_in - 1).to(tl.int32)
    same = size_in == size_out  # torch copies: i0 = i1 = dst, l0 = 1, l1 = 0
    return (tl.where(same, dst, i0), tl.where(same, dst, i1), tl.where(same, 1.0, l0),
            tl.where(same, 0.0, l1))


@triton.jit
def _solo_mask_scores_kernel(
    preds_ptr,  # (N, Q, h, w) contiguous mask logits (LOGITS) or probabilities
    image_ptr,  # (K,) int64: image of each candidate
    channel_ptr,  # (K,) int64: channel (grid cell) of each candidate
    threshold_ptr,  # (1,) the threshold in preds' dtype (as torch compares s > threshold)
    area_ptr,  # (K, T) int32 out: thresholded pixels of each candidate and tile
    soft_ptr,  # (K, T) float64 out: sum of s over those pixels
    num_channels,  # Q
    in_h,  # h
    in_w,  # w: the row stride of a map, in elements
    out_h,  # H
    out_w,  # W
    tiles_x,  # tiles across the output's width: tile t is row tile t // tiles_x
    num_tiles,  # T: program p takes candidate p // T and tile p % T; the row stride of area/soft
    LOGITS: tl.constexpr,  # sigmoid the samples first
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BAND_H: tl.constexpr,  # at least the source rows any tile reads
    BAND_W: tl.constexpr,  # at least the source columns any tile reads
    EMULATE_FMA: tl.constexpr,  # interpreted (see _fma)
):
    program = tl.program_id(0)
    candidate = program // num_tiles
    tile = program % num_tiles
    prob_dtype: tl.constexpr = preds_ptr.dtype.element_ty
    acc_dtype: tl.constexpr = tl.float64 if prob_dtype == tl.float64 else tl.float32
    threshold = tl.load(threshold_ptr).to(acc_dtype)
    # int64 indices make a 64-bit map offset; offsets inside a map stay 32-bit.
    image = tl.load(image_ptr + candidate)
    map_ptr = preds_ptr + (image * num_channels + tl.load(channel_ptr + candidate)) * in_h * in_w

    ys = (tile // tiles_x) * TILE_H + tl.arange(0, TILE_H)
    xs = (tile % tiles_x) * TILE_W + tl.arange(0, TILE_W)
    y_i0, y_i1, y_l0, y_l1 = _bilinear_taps(ys, in_h, out_h, prob_dtype, acc_dtype, EMULATE_FMA)
    x_i0, x_i1, x_l0, x_l1 = _bilinear_taps(xs, in_w, out_w, prob_dtype, acc_dtype, EMULATE_FMA)
    # Source indices grow with the output coordinate: the band starts at the first taps.
    row0 = tl.min(y_i0, axis=0)
    col0 = tl.min(x_i0, axis=0)

    band_rows = row0 + tl.arange(0, BAND_H)
    band_cols = col0 + tl.arange(0, BAND_W)
    inside_map = (band_rows < in_h)[:, None] & (band_cols < in_w)[None, :]
    v = tl.load(map_ptr + band_rows[:, None] * in_w + band_cols[None, :], mask=inside_map,
                other=0)  # (BAND_H, BAND_W)
    if LOGITS:
        band = soft_from_logit(v)
    else:
        band = v.to(acc_dtype)

    # Width first: every band row at the tile's columns. Taps of columns past W (masked below)
    # may point past the band: clamped, so that every gather stays inside.
    shape_r: tl.constexpr = (BAND_H, TILE_W)
    c0 = tl.broadcast_to(tl.minimum(x_i0 - col0, BAND_W - 1)[None, :], shape_r)
    c1 = tl.broadcast_to(tl.minimum(x_i1 - col0, BAND_W - 1)[None, :], shape_r)
    rows = _fma(tl.gather(band, c0, axis=1), tl.broadcast_to(x_l0[None, :], shape_r),
                tl.gather(band, c1, axis=1) * tl.broadcast_to(x_l1[None, :], shape_r),
                EMULATE_FMA)  # (BAND_H, TILE_W)
    # Then each pixel's two rows, rounded once to the input dtype.
    shape_s: tl.constexpr = (TILE_H, TILE_W)
    r0 = tl.broadcast_to(tl.minimum(y_i0 - row0, BAND_H - 1)[:, None], shape_s)
    r1 = tl.broadcast_to(tl.minimum(y_i1 - row0, BAND_H - 1)[:, None], shape_s)
    s = _fma(tl.gather(rows, r0, axis=0), tl.broadcast_to(y_l0[:, None], shape_s),
             tl.gather(rows, r1, axis=0) * tl.broadcast_to(y_l1[:, None], shape_s),
             EMULATE_FMA)  # (TILE_H, TILE_W)
    s = s.to(prob_dtype).to(acc_dtype)

    keep = (s > threshold) & (ys < out_h)[:, None] & (xs < out_w)[None, :]
    out = candidate.to(tl.int64) * num_tiles + tile
    tl.store(area_ptr + out, tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0))
    tl.store(soft_ptr + out, tl.sum(tl.sum(tl.where(keep, s.to(tl.float64), 0.0), axis=1),
                                    axis=0))


# ----------------------------------------------------------------------------------------------
# Host launcher


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _band_extent(size_in: int, size_out: int, tile: int) -> int:
    """At least the source samples along one axis that a tile of ``tile`` outputs reads.

    The kernel's float32 source index differs from this float64 one by under 4e-7 * size_in
    (the scale's and the FMA's roundings); the slack covers that, and the clamps only shrink
    the span.
    """
    if size_in == size_out:
        return min(tile, size_in)
    scale = size_in / size_out
    slack = 1e-6 * (size_in + 1)
    widest = 0
    for first in range(0, size_out, tile):
        last = min(first + tile, size_out) - 1
        low = math.floor(max(scale * (first + 0.5) - 0.5 - slack, 0.0))
        high = math.floor(max(scale * (last + 0.5) - 0.5 + slack, 0.0))
        widest = max(widest, high - low + 2)  # i1 may be i0 + 1
    return min(widest, size_in)


def launch_config(dtype: torch.dtype, in_size: tuple[int, int],
                  out_size: tuple[int, int]) -> dict[str, int]:
    """Tile and band sizes and warps of the kernel for ``dtype`` maps resized in_size -> out_size.

    Tiles of 2048 output pixels (1024 for float64), at most 64 wide; the band sizes are the
    powers of two that hold the source samples any tile reads. Tiles shrink (the longer side
    first) until the band and its width-interpolated rows stay within 4096 values (2048 for
    float64): only a downscale comes near.
    """
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    pixels = _TILE_PIXELS.get(dtype, _DEFAULT_TILE_PIXELS)
    limit = _BAND_LIMIT.get(dtype, _DEFAULT_BAND_LIMIT)
    tile_w = min(_MAX_TILE_W, _next_power_of_two(out_w))
    tile_h = min(pixels // tile_w, _next_power_of_two(out_h))
    while True:
        band_h = _next_power_of_two(_band_extent(in_h, out_h, tile_h))
        band_w = _next_power_of_two(_band_extent(in_w, out_w, tile_w))
        if (band_h * band_w <= limit and band_h * tile_w <= limit) or tile_h * tile_w == 1:
            break
        if tile_h >= tile_w and tile_h > 1 or tile_w == 1:
            tile_h //= 2
        else:
            tile_w //= 2
    return {"TILE_H": tile_h, "TILE_W": tile_w, "BAND_H": band_h, "BAND_W": band_w,
            "num_warps": 4}


def solo_mask_scores_triton(mask_preds: Tensor, image: Tensor, channel: Tensor,
                            out_height: int, out_width: int, threshold: float, logits: bool, *,
                            tile: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Area and soft sum of every candidate's thresholded, resized soft mask, without storing it.

    Args:
        mask_preds: (N, Q, h, w) one level's mask logits (``logits``) or probabilities; float16,
            bfloat16 (resized in float32), float32 or float64; CUDA, or CPU under
            ``TRITON_INTERPRET=1`` (no bfloat16 there).
        image: (K,) int64 in [0, N): the image of each candidate, in any order.
        channel: (K,) int64 in [0, Q): the channel (grid cell) of each candidate.
        out_height, out_width: the resized mask's size (H, W), at least 1; smaller than (h, w)
            downscales.
        threshold: s counts where ``s > threshold`` (compared in mask_preds' dtype, as torch
            does).
        logits: mask_preds holds logits (s resizes their sigmoid) rather than probabilities.
        tile: (TILE_H, TILE_W) output pixels per program, powers of two; None:
            ``launch_config``'s. For tests.

    Returns:
        area: (K,) int64, ``#{pixels: s > threshold}`` with s = ``F.interpolate(p[None, None],
            (H, W), mode="bilinear", align_corners=False)`` of p = the sigmoid (or the
            probabilities) of ``mask_preds[image[k], channel[k]]``, as torch's CPU kernel
            rounds it.
        soft_sum: (K,) float64, the sum of s over those pixels (per tile in float64, tiles
            summed in a fixed order).

    Raises:
        ValueError: an empty map or output size, 2^31 samples or more per map, more programs
            than CUDA launches. The other rules, index ranges included, are checked before:
            ``solo_fast.ops.solo_mask_scores``'s contract.
    """
    # What the kernel itself needs: every size of the resize at least 1, int32 offsets in a map.
    if mask_preds.shape[2] < 1 or mask_preds.shape[3] < 1:
        raise ValueError(f"solo_mask_scores (triton): mask_preds' maps must be at least 1 x 1, "
                         f"got shape {tuple(mask_preds.shape)}")
    if out_height < 1 or out_width < 1:
        raise ValueError(f"solo_mask_scores (triton): out_height and out_width must be positive, "
                         f"got ({out_height}, {out_width})")
    if mask_preds.shape[2] * mask_preds.shape[3] >= 2**31:
        raise ValueError(f"solo_mask_scores (triton): at most 2^31 - 1 samples per map, got "
                         f"shape {tuple(mask_preds.shape)}")
    _, num_channels, in_h, in_w = mask_preds.shape
    num_candidates = image.shape[0]
    device = mask_preds.device
    if num_candidates == 0:
        return (torch.zeros(0, dtype=torch.int64, device=device),
                torch.zeros(0, dtype=torch.float64, device=device))

    preds = mask_preds.contiguous()  # (N, Q, h, w)
    config = launch_config(preds.dtype, (in_h, in_w), (out_height, out_width))
    if tile is not None:
        tile_h, tile_w = tile
        if tile_h < 1 or tile_h & (tile_h - 1) or tile_w < 1 or tile_w & (tile_w - 1):
            raise ValueError(f"solo_mask_scores (triton): tile must be two powers of two, got "
                             f"{tile}")
        config.update(TILE_H=tile_h, TILE_W=tile_w,
                      BAND_H=_next_power_of_two(_band_extent(in_h, out_height, tile_h)),
                      BAND_W=_next_power_of_two(_band_extent(in_w, out_width, tile_w)))
    num_warps = config.pop("num_warps")
    tiles_x = -(-out_width // config["TILE_W"])
    num_tiles = -(-out_height // config["TILE_H"]) * tiles_x
    if num_candidates * num_tiles > MAX_PROGRAMS:
        raise ValueError(f"solo_mask_scores (triton): at most {MAX_PROGRAMS} programs, got "
                         f"{num_candidates} candidates x {num_tiles} tiles")
    threshold_t = threshold_tensor(threshold, preds.dtype, device)  # (1,)
    partial_area = torch.empty((num_candidates, num_tiles), dtype=torch.int32, device=device)
    partial_soft = torch.empty((num_candidates, num_tiles), dtype=torch.float64, device=device)
    with device_guard(preds):
        _solo_mask_scores_kernel[(num_candidates * num_tiles,)](
            preds, image.contiguous(), channel.contiguous(), threshold_t, partial_area,
            partial_soft, num_channels, in_h, in_w, out_height, out_width, tiles_x, num_tiles,
            LOGITS=bool(logits), EMULATE_FMA=not preds.is_cuda, num_warps=num_warps, **config)
    return partial_area.sum(dim=1, dtype=torch.int64), partial_soft.sum(dim=1)
