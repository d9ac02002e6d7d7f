"""Test-time pre-processing in numpy: the images ``solo-fast predict`` feeds the model, bit for bit.

The torch path (``solo_fast.engine.predict``) loads an RGB image, applies
``solo_fast.data.build_eval_transform`` (keep-ratio ``Resize`` to ``test_scale``, then
``Normalize``) and pads the batch with ``solo_fast.data.collate``. This module repeats each step
with the same arithmetic (docs/algorithms.md §2; mmdetection's ``Resize`` and
``DetDataPreprocessor``):

* the output size of mmcv's ``rescale_size``, in Python float64;
* bilinear resize in float64, half-pixel centres clamped at 0, columns then rows, rounded half up
  to uint8 (the same element-wise operations in the same order, so the same bits);
* ``(pixel - mean) / std`` in float32;
* zero padding, bottom and right, to the batch's largest image rounded up to the size divisor.
"""

# N=images, H0/W0=image size as given, h/w=after the resize, Hp/Wp=the padded batch canvas

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["normalize", "pad_batch", "preprocess", "rescale_size", "resize_image", "to_rgb"]


def to_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """An image array as uint8 ``(H0, W0, 3)`` RGB.

    Grey ``(H0, W0)`` and ``(H0, W0, 1)`` images are repeated into three channels and RGBA
    ``(H0, W0, 4)`` images lose their alpha channel (not composited on a background), as Pillow's
    ``convert("RGB")`` does when the torch path loads such a file.

    Args:
        image: uint8 ``(H0, W0)``, ``(H0, W0, 1)``, ``(H0, W0, 3)`` (RGB) or ``(H0, W0, 4)``
            (RGBA) array.
        name: The argument's name, for error messages.

    Returns:
        A uint8 ``(H0, W0, 3)`` array (``image`` itself when it already is one).

    Raises:
        TypeError: not a numpy array.
        ValueError: another dtype or shape, or an empty image.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                         f"got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image if image.shape[2] == 3 else image[:, :, :3]


def rescale_size(size: tuple[int, int], scale: Sequence[int]) -> tuple[int, int]:
    """The keep-ratio output size of mmcv's ``rescale_size`` / ``imrescale``: the one home of
    this rule (``solo_fast.data.transforms`` uses it too).

    The scale factor is ``min(long / max(h, w), short / min(h, w))`` with ``long, short =
    max(scale), min(scale)``, so ``(1333, 800)`` and ``(800, 1333)`` are the same target. Each side
    becomes ``int(side * factor + 0.5)``, in Python (float64) arithmetic as mmcv computes it.

    Args:
        size: ``(h, w)`` of the input image.
        scale: ``(long edge, short edge)`` limits, in either order.

    Returns:
        ``(new_h, new_w)``.

    Raises:
        ValueError: a non-positive size or scale.
    """
    h, w = size
    if h <= 0 or w <= 0 or min(scale) <= 0:
        raise ValueError(f"rescale_size needs positive sizes, got size {size} and scale {scale}")
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                        np.ndarray]:
    # the torch path's float64 rule: src = (dst + 0.5) * in / out - 0.5, clamped at 0
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)
    first = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    frac = src - first
    return first, second, 1.0 - frac, frac


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 image, as the torch path's ``Resize`` computes it.

    Args:
        image: uint8 ``(H0, W0, C)``.
        size: ``(h, w)``.

    Returns:
        uint8 ``(h, w, C)``; ``image`` itself when the size is unchanged.
    """
    size = (int(size[0]), int(size[1]))
    if image.shape[:2] == size:
        return image  # the torch path skips the identity too
    rows0, rows1, row_w0, row_w1 = _linear_taps(image.shape[0], size[0])
    cols0, cols1, col_w0, col_w1 = _linear_taps(image.shape[1], size[1])
    pixels = image.astype(np.float64)
    # columns first, then rows, each a product per tap and one sum: the torch path's order
    wide = pixels[:, cols0] * col_w0[None, :, None]
    wide += pixels[:, cols1] * col_w1[None, :, None]  # (H0, w, C)
    resized = wide[rows0] * row_w0[:, None, None]
    resized += wide[rows1] * row_w1[:, None, None]  # (h, w, C)
    # round half up as OpenCV does; the 1e-9 is the torch path's, for ties in float64
    resized += 0.5 + 1e-9
    return np.clip(np.floor(resized), 0, 255).astype(np.uint8)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(pixel - mean) / std`` per channel in float32, channels first.

    Args:
        image: uint8 ``(h, w, 3)`` RGB.
        mean: 3 channel means on the 0..255 scale.
        std: 3 channel standard deviations on the 0..255 scale.

    Returns:
        float32 ``(3, h, w)``.
    """
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    chw = image.transpose(2, 0, 1).astype(np.float32)  # (3, h, w)
    return (chw - mean32) / std32


def pad_batch(images: Sequence[np.ndarray], size_divisor: int,
              canvas: tuple[int, int] | None = None) -> np.ndarray:
    """Stacks ``(3, h, w)`` images into a zero-padded ``(N, 3, Hp, Wp)`` batch, bottom and right.

    Args:
        images: float32 ``(3, h, w)`` arrays.
        size_divisor: Hp and Wp are the largest h and w rounded up to a multiple of this.
        canvas: A fixed ``(Hp, Wp)`` (an export with static shapes) instead.

    Returns:
        float32 ``(N, 3, Hp, Wp)``.

    Raises:
        ValueError: no images, or an image larger than ``canvas``.
    """
    if not images:
        raise ValueError("pad_batch needs at least one image")
    if canvas is None:
        pad_h = math.ceil(max(im.shape[1] for im in images) / size_divisor) * size_divisor
        pad_w = math.ceil(max(im.shape[2] for im in images) / size_divisor) * size_divisor
    else:
        pad_h, pad_w = canvas
    batch = np.zeros((len(images), 3, pad_h, pad_w), dtype=np.float32)  # (N, 3, Hp, Wp)
    for n, image in enumerate(images):
        h, w = image.shape[1:]
        if h > pad_h or w > pad_w:
            raise ValueError(f"image {n} is {h}x{w} after resizing, larger than the model's "
                             f"fixed input canvas {pad_h}x{pad_w}")
        batch[n, :, :h, :w] = image
    return batch


def preprocess(images: Sequence[np.ndarray], *, scale: Sequence[int], mean: Sequence[float],
               std: Sequence[float], size_divisor: int, canvas: tuple[int, int] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB images -> the model's padded batch, as ``solo-fast predict`` builds it.

    Args:
        images: uint8 ``(H0, W0, 3)`` RGB arrays (see :func:`to_rgb` for other layouts).
        scale: ``(long edge, short edge)`` of the keep-ratio resize (``test_scale``).
        mean: Normalisation means (0..255 scale).
        std: Normalisation standard deviations (0..255 scale).
        size_divisor: Padding multiple.
        canvas: A fixed ``(Hp, Wp)`` for exports with static shapes.

    Returns:
        ``(batch, image_sizes, original_sizes)``: float32 ``(N, 3, Hp, Wp)``, int64 ``(N, 2)``
        ``(h, w)`` of each resized image in the canvas, int64 ``(N, 2)`` ``(H0, W0)``.
    """
    normalised, sizes, originals = [], [], []
    for image in images:
        original = (int(image.shape[0]), int(image.shape[1]))
        resized = resize_image(image, rescale_size(original, scale))
        normalised.append(normalize(resized, mean, std))
        sizes.append(resized.shape[:2])
        originals.append(original)
    batch = pad_batch(normalised, size_divisor, canvas)
    return (batch, np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
            np.asarray(originals, dtype=np.int64).reshape(-1, 2))
