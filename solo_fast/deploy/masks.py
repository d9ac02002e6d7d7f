"""Paste-back in numpy: stride-4 soft masks -> binary masks and boxes at the original image size,
as ``model.predict`` computes them (``solo_fast.postprocess.resize_to_original``, ``> mask_thr``,
``solo_fast.postprocess.masks_to_boxes``; mmdetection's ``SOLOHead._predict_by_feat_single``).

Bilinear resizing follows PyTorch's CPU kernel for ``F.interpolate(mode="bilinear",
align_corners=False)`` (the generic, per-channel kernel, used whenever the output's height + width
exceeds 128), in float32 (docs/algorithms.md §3.4):

* scale ``in / out``; source index ``scale * (dst + 0.5) - 0.5`` as one fused multiply-add,
  clamped at 0; first tap ``min(floor(src), in - 1)``, second tap the next one (or the same one at
  the last pixel), weights ``l1 = clamp(src - first, 0, 1)`` and ``l0 = 1 - l1``; an axis whose
  size does not change is copied;
* along the width, then the height, each output ``fma(a, l0, b * l1)``.

The fused multiply-adds are what x86-64 builds of PyTorch compute (their AVX2 / AVX-512 kernels are
compiled with contraction of ``a * b + c``); numpy has no FMA, so :func:`fma` forms the correctly
rounded result from float64. With them :func:`resize_bilinear` equals PyTorch bit for bit. Two
cases are only within a few ulp: outputs with height + width <= 128 (and, single-threaded, 3
channels), where PyTorch switches to a channels-last kernel whose rounding depends on a channel's
position in its SIMD vector, and builds or devices without FMA contraction.

:func:`paste_masks` needs only the thresholded masks, so it resizes in plain float32, which is
several times faster and within a few ulp, and recomputes exactly the pixels close enough to
``mask_thr`` for those ulp to matter; and it resizes only the window of each mask that can reach
the threshold.
"""

# K=masks, H4/W4=the mask map (stride 4), Hc/Wc=the padded canvas (stride x the map), h/w=the
# resized image in the canvas, H0/W0=original size

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Taps", "fma", "linear_taps", "masks_to_boxes", "paste_masks", "resize_bilinear"]

F32 = np.float32
# |plain float32 - exact| after the four resize passes is below 16 ulp of the largest input
# (each pass adds at most 2 ulp; the weights of a pass sum to 1, so it does not amplify the
# error it inherits); pixels nearer than this to the threshold are recomputed exactly
ERROR_ULPS = 16.0


class Taps(NamedTuple):
    """Source pixels and weights of a 1-d bilinear resize: ``out[i] = fma(x[first[i]],
    w0[i], x[second[i]] * w1[i])``.

    Attributes:
        first: int64 (out,) first tap.
        second: int64 (out,) second tap.
        w0: float32 (out,) weight of the first tap.
        w1: float32 (out,) weight of the second tap.
        identity: the input and output sizes are equal (the taps copy).
    """

    first: np.ndarray
    second: np.ndarray
    w0: np.ndarray
    w1: np.ndarray
    identity: bool

    def window(self, start: int, stop: int, shift: int = 0) -> Taps:
        """The taps of outputs ``start:stop``, reading an input that begins at ``shift``."""
        return Taps(self.first[start:stop] - shift, self.second[start:stop] - shift,
                    self.w0[start:stop], self.w1[start:stop], self.identity)


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Float32 fused multiply-add ``a * b + c``, rounded once (broadcasting).

    The float64 product of two float32 values is exact, so ``a * b + c`` in float64 is rounded
    once; rounding that to float32 again can only go wrong where the float64 sum falls exactly
    halfway between two float32 values, or among float32's subnormals. Those elements get the
    sum's rounding error (Knuth's two-sum) and are nudged towards it before the cast.

    Args:
        a, b, c: float32 arrays.

    Returns:
        float32 array of the broadcast shape.
    """
    product = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    addend = np.asarray(c, np.float64)
    total = product + addend
    bits = total.view(np.uint64)
    # low 29 of float64's 52 mantissa bits = 1000...0: halfway between two float32 values
    halfway = (bits & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
    exponent = (bits >> np.uint64(52)) & np.uint64(0x7FF)
    tiny = (exponent < np.uint64(1023 - 125)) & (total != 0)
    suspect = halfway | tiny
    if suspect.any():
        p, q, s = (np.broadcast_to(v, total.shape)[suspect] for v in (product, addend, total))
        back = s - p
        error = (p - (s - back)) + (q - back)  # exact: p + q = s + error
        towards = np.where(error > 0, np.inf, -np.inf)
        total[suspect] = np.where(error != 0, np.nextafter(s, towards), s)
    return total.astype(F32)


def linear_taps(in_size: int, out_size: int) -> Taps:
    """PyTorch's taps and weights for one axis (``align_corners=False``, no scale factor).

    Args:
        in_size: Input length.
        out_size: Output length.

    Returns:
        The :class:`Taps`.
    """
    if in_size == out_size:
        index = np.arange(out_size)
        return Taps(index, index, np.ones(out_size, F32), np.zeros(out_size, F32), True)
    scale = F32(in_size) / F32(out_size)
    centre = np.arange(out_size).astype(F32) + F32(0.5)
    src = np.maximum(fma(scale, centre, F32(-0.5)), F32(0))  # clamped at 0
    first = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    second = np.where(first < in_size - 1, first + 1, first)
    w1 = np.clip(src - first.astype(F32), F32(0), F32(1))
    return Taps(first, second, F32(1) - w1, w1, False)


def _along_width(x: np.ndarray, taps: Taps, exact: bool) -> np.ndarray:
    if taps.identity:  # a * 1 + b * 0 is a for finite a
        return x[..., taps.first[0]:taps.first[0] + len(taps.first)]
    first, second = x[..., taps.first], x[..., taps.second]  # (..., w) each
    second *= taps.w1
    if exact:
        return fma(first, taps.w0, second)
    first *= taps.w0
    first += second
    return first


def _along_height(x: np.ndarray, taps: Taps, exact: bool) -> np.ndarray:
    if taps.identity:
        return x[..., taps.first[0]:taps.first[0] + len(taps.first), :]
    first, second = x[..., taps.first, :], x[..., taps.second, :]  # (..., h, W) each
    second *= taps.w1[:, None]
    if exact:
        return fma(first, taps.w0[:, None], second)
    first *= taps.w0[:, None]
    first += second
    return first


def _resize(x: np.ndarray, rows: Taps, cols: Taps, exact: bool) -> np.ndarray:
    return _along_height(_along_width(x, cols, exact), rows, exact)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` on the last two axes, as
    PyTorch's CPU kernel computes it (see the module docstring for when the bits agree).

    Args:
        x: float32 ``(..., H, W)``.
        size: ``(h, w)``, each >= 1.

    Returns:
        float32 ``(..., h, w)``.

    Raises:
        ValueError: ``x`` is not float32 with at least 2 axes, or a size is < 1.
    """
    if not isinstance(x, np.ndarray) or x.dtype != F32 or x.ndim < 2:
        raise ValueError(f"x must be a float32 array of at least 2 axes, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (h, w) with h, w >= 1, got {size}")
    rows = linear_taps(x.shape[-2], int(size[0]))
    cols = linear_taps(x.shape[-1], int(size[1]))
    return np.ascontiguousarray(_resize(x, rows, cols, exact=True))


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes of binary masks, x2 and y2 exclusive (last index + 1), as
    ``solo_fast.postprocess.masks_to_boxes`` computes them.

    Args:
        masks: bool ``(K, H, W)``.

    Returns:
        float32 ``(K, 4)``; an empty mask gets ``(0, 0, 0, 0)``.
    """
    boxes = np.zeros((masks.shape[0], 4), dtype=F32)
    if masks.size == 0:
        return boxes
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (K, H), (K, W)
    found = rows.any(axis=1)
    boxes[:, 0] = cols.argmax(axis=1)
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 2] = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    boxes[:, 3] = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    boxes[~found] = 0
    return boxes


def paste_masks(soft: np.ndarray, *, canvas: tuple[int, int], image_size: tuple[int, int],
                original_size: tuple[int, int], mask_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft stride-4 masks -> binary masks at the original size and their boxes.

    ``resize_to_original(soft, canvas, image_size, original_size) > mask_thr``, then
    :func:`masks_to_boxes`: bilinear to the padded canvas, crop to the resized image, bilinear to
    the original size, threshold. One mask at a time, and of it only the window that can pass
    the threshold: bilinear weights are non-negative and sum to 1, so an output pixel whose
    source pixels all lie below ``mask_thr`` (by more than the rounding) stays below it.

    Args:
        soft: float32 ``(K, H4, W4)`` soft masks.
        canvas: ``(Hc, Wc)`` of the padded canvas (mask stride x ``(H4, W4)``).
        image_size: ``(h, w)`` of the resized image inside the canvas.
        original_size: ``(H0, W0)``.
        mask_thr: Pixels with a soft value > this are in the mask.

    Returns:
        ``(masks, boxes)``: bool ``(K, H0, W0)`` and float32 ``(K, 4)`` xyxy.

    Raises:
        ValueError: ``soft`` not float32 ``(K, H4, W4)``, or sizes that do not fit the canvas.
    """
    if not isinstance(soft, np.ndarray) or soft.dtype != F32 or soft.ndim != 3:
        raise ValueError(f"soft must be a float32 (K, H4, W4) array, got "
                         f"{getattr(soft, 'dtype', type(soft).__name__)} "
                         f"{getattr(soft, 'shape', '')}")
    height, width = (int(v) for v in image_size)
    canvas = (int(canvas[0]), int(canvas[1]))
    original = (int(original_size[0]), int(original_size[1]))
    if not (0 < height <= canvas[0] and 0 < width <= canvas[1]) or min(original) < 1:
        raise ValueError(f"image_size {tuple(image_size)} must be positive and fit the canvas "
                         f"{canvas}, and original_size {tuple(original_size)} positive")
    # the crop of the canvas is computed only, never the padding
    taps = (linear_taps(soft.shape[1], canvas[0]).window(0, height),
            linear_taps(soft.shape[2], canvas[1]).window(0, width),
            linear_taps(height, original[0]), linear_taps(width, original[1]))
    threshold = F32(mask_thr)
    masks = np.zeros((soft.shape[0], *original), dtype=bool)
    for k in range(soft.shape[0]):
        largest = np.max(np.abs(soft[k]), initial=F32(0), where=np.isfinite(soft[k]))
        margin = ERROR_ULPS * np.spacing(max(F32(largest), abs(threshold), F32(1e-30)))
        hot = soft[k] > threshold - margin  # (H4, W4)
        rows = _hot_range(hot, 1, taps[0], taps[2])
        cols = _hot_range(hot, 0, taps[1], taps[3])
        if rows is None or cols is None:
            continue  # nothing near the threshold: an empty mask
        (top, bottom), (first_row, last_row) = rows
        (left, right), (first_col, last_col) = cols
        middle = _resize(soft[k], taps[0].window(first_row, last_row + 1),
                         taps[1].window(first_col, last_col + 1), exact=False)
        final = _resize(middle, taps[2].window(top, bottom, first_row),
                        taps[3].window(left, right, first_col), exact=False)  # (y, x)
        window = masks[k, top:bottom, left:right]
        np.greater(final, threshold, out=window)
        near = np.nonzero(np.abs(final - threshold) <= margin)
        if len(near[0]):  # decided by the exact arithmetic
            where = (np.full(len(near[0]), k), near[0] + top, near[1] + left)
            window[near] = _exact_pixels(soft, where, taps) > threshold
    return masks, masks_to_boxes(masks)


def _hot_range(hot: np.ndarray, axis: int, canvas_taps: Taps,
               final_taps: Taps) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Along one axis: the outputs ``start:stop`` whose taps reach a hot source line (one with a
    pixel near or above the threshold), and the canvas lines ``first..last`` they read; None
    when no line is hot."""
    lines = np.flatnonzero(hot.any(axis=axis))
    if not len(lines):
        return None
    # taps never decrease: canvas lines reading a hot map line are one run, and so on
    low = np.searchsorted(canvas_taps.second, lines[0], "left")
    high = np.searchsorted(canvas_taps.first, lines[-1], "right")
    if low >= high:
        return None
    start = int(np.searchsorted(final_taps.second, low, "left"))
    stop = int(np.searchsorted(final_taps.first, high - 1, "right"))
    if start >= stop:
        return None
    return (start, stop), (int(final_taps.first[start]), int(final_taps.second[stop - 1]))


def _exact_pixels(soft: np.ndarray, where: tuple[np.ndarray, ...],
                  taps: tuple[Taps, Taps, Taps, Taps]) -> np.ndarray:
    """Exact values of the final resize at ``where = (k, y, x)``, from the 2x2 canvas pixels each
    reads and the 2x2 map pixels each of those reads."""
    canvas_rows, canvas_cols, final_rows, final_cols = taps
    k, y, x = where

    def canvas_pixel(r: np.ndarray, c: np.ndarray) -> np.ndarray:  # columns first, as torch
        return _lerp(lambda row: _lerp(lambda col: soft[k, row, col], canvas_cols, c),
                     canvas_rows, r)

    return _lerp(lambda row: _lerp(lambda col: canvas_pixel(row, col), final_cols, x),
                 final_rows, y)


def _lerp(sample, taps: Taps, index: np.ndarray) -> np.ndarray:
    """One bilinear pass at output positions ``index``: ``sample(source positions)`` weighted as
    torch weighs them (the second tap's product first, then one fused multiply-add)."""
    if taps.identity:
        return sample(index)
    second = sample(taps.second[index]) * taps.w1[index]
    return fma(sample(taps.first[index]), taps.w0[index], second)
