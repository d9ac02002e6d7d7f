"""Training and evaluation transforms: keep-ratio resize, multi-scale choice, flip, normalise.

These reproduce mmdetection 3.3's SOLO pipeline (docs/algorithms.md §2.1, §2.2)::

    Resize(scale=(1333, 800), keep_ratio=True)        -> Resize(scale=(1333, 800))
    RandomChoiceResize(scales=[...], keep_ratio=True) -> RandomChoiceResize(scales=(...))
    RandomFlip(prob=0.5)                               -> RandomFlip(prob=0.5)
    DetDataPreprocessor(mean, std, bgr_to_rgb=True)    -> Normalize() (padding: loaders.collate)

Every transform is a frozen dataclass called as ``image, target = t(image, target,
generator=g)``. ``image`` is a ``(3, H, W)`` tensor in RGB order, uint8 until
:class:`Normalize` turns it into float32. ``target`` is a dict with the instances of the image:

* ``"masks"``: bool ``(M, H, W)``
* ``"boxes"``: float32 ``(M, 4)`` xyxy, in pixels of the current image
* ``"labels"``: int64 ``(M,)``; transforms pass it (and any other key) through unchanged.

A transform returns a new dict and never modifies its inputs in place; an output tensor may be
the input tensor itself when the transform leaves it unchanged. Random transforms
draw from ``generator`` (a ``torch.Generator``), or from torch's global generator when it is
None, so a seeded generator gives the same result on every run.

Differences from mmcv (which calls OpenCV):

* Images: mmcv resizes with ``cv2.INTER_LINEAR`` on uint8, which works in fixed point (weights
  rounded to multiples of 1/2048, integer partial sums). Here the
  image is resized bilinearly in float64 with the same source-pixel rule (half-pixel centres,
  ``src = (dst + 0.5) * in / out - 0.5``, clamped at the border, no antialiasing when shrinking:
  the rule of ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``), columns
  then rows, and rounded half up to uint8. So pixels can differ from OpenCV's by 1 grey level;
  sizes are identical. An exact 2x shrink gives ``(a + b + c + d + 2) >> 2``, which is what
  OpenCV's ``INTER_AREA`` shortcut for that case computes. The result does not depend on the
  number of threads, unlike ``F.interpolate``'s kernels.
* Masks: resized by ``cv2.INTER_NEAREST``'s rule (``BitmapMasks.rescale``): source index
  ``floor(dst * (1 / (out / in)))`` in float64, as OpenCV's ``resizeNN`` computes it, clamped to
  the last row/column. Pure index arithmetic, so it should agree with OpenCV exactly (not checked
  against cv2 itself, which this environment lacks).
* Boxes: scaled by the float32 factors ``(new_w / w, new_h / h)`` and clipped to the resized image
  (``clip_object_border=True``), flipped as ``x1' = W - x2``, ``x2' = W - x1``, all in float32 as
  mmdetection's ``HorizontalBoxes`` does.
* Images are loaded RGB (Pillow) rather than BGR then swapped in the data preprocessor; the
  normalised values are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from solo_fast.deploy.preprocess import rescale_size  # mmcv's keep-ratio size, torch-free

__all__ = [
    "Compose",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "RandomChoiceResize",
    "RandomFlip",
    "Resize",
    "Target",
    "Transform",
    "build_eval_transform",
    "build_train_transform",
    "rescale_size",
]

# M=instances, H/W=image height/width before a transform, h/w after it

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 scale (mmdetection's data_preprocessor)
IMAGENET_STD = (58.395, 57.12, 57.375)

Target = dict[str, torch.Tensor]


class Transform(Protocol):
    """What every transform (and :class:`Compose`) is: ``(image, target) -> (image, target)``."""

    def __call__(self, image: torch.Tensor, target: Target, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, Target]: ...


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image  # bilinear would be the identity: src = dst exactly
    rows, row_weights = _linear_taps(image.shape[-2], size[0], image.device)
    cols, col_weights = _linear_taps(image.shape[-1], size[1], image.device)
    # Separable, columns first as OpenCV does, in float64 with plain elementwise ops: the result
    # does not depend on the thread count (F.interpolate's kernels do, by an ulp, so DataLoader
    # workers and the main process could round a pixel differently). Each pass gathers along
    # dim 1 of a contiguous tensor, which is several times faster than gathering columns.
    pixels = image.to(torch.float64).transpose(1, 2).contiguous()  # (3, W, H)
    wide = (pixels.index_select(1, cols[0]).mul_(col_weights[0][:, None])
            .add_(pixels.index_select(1, cols[1]).mul_(col_weights[1][:, None])))  # (3, w, H)
    wide = wide.transpose(1, 2).contiguous()  # (3, H, w)
    resized = (wide.index_select(1, rows[0]).mul_(row_weights[0][:, None])
               .add_(wide.index_select(1, rows[1]).mul_(row_weights[1][:, None])))  # (3, h, w)
    if image.dtype == torch.uint8:
        # round half up, as OpenCV's fixed-point cast does (not torch's half-to-even); the 1e-9
        # makes exact ties (2x2 means, weights like 0.3) round up whatever float64's last bit
        return resized.add_(0.5 + 1e-9).floor_().clamp_(0, 255).to(torch.uint8)
    return resized.to(image.dtype)


def _linear_taps(in_size: int, out_size: int,
                 device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                tuple[torch.Tensor, torch.Tensor]]:
    # half-pixel centres, src = (dst + 0.5) * in / out - 0.5 clamped at 0 (cv2, align_corners=False)
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5)
    src = src.clamp_(min=0.0)
    first = src.floor().long().clamp_(max=in_size - 1)
    second = (first + 1).clamp_(max=in_size - 1)
    frac = src - first  # beyond the last pixel both taps are that pixel, so frac does not matter
    return (first.to(device), second.to(device)), ((1.0 - frac).to(device), frac.to(device))


def _nearest_indices(in_size: int, out_size: int) -> torch.Tensor:
    # OpenCV resizeNN: ifx = 1 / (out / in) in double, sx = min(floor(x * ifx), in - 1)
    inverse = 1.0 / (out_size / in_size)
    idx = [min(math.floor(x * inverse), in_size - 1) for x in range(out_size)]
    return torch.tensor(idx, dtype=torch.long)


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = masks.shape[-2:]
    if (h, w) == tuple(size):
        return masks
    rows = _nearest_indices(h, size[0]).to(masks.device)
    cols = _nearest_indices(w, size[1]).to(masks.device)
    return masks.index_select(-2, rows).index_select(-1, cols)  # (M, h, w)


@dataclass(frozen=True, kw_only=True)
class Resize:
    """Keep-ratio resize to a ``(long edge, short edge)`` scale (mmdetection ``Resize``).

    The output size is :func:`rescale_size`; the image is resized bilinearly, the masks with
    nearest neighbour, the boxes scaled by ``(new_w / w, new_h / h)`` and clipped to the image.
    See the module docstring for how this compares with OpenCV.
    """

    scale: tuple[int, int]  # (long edge, short edge); the order does not matter

    def __post_init__(self) -> None:
        if len(self.scale) != 2 or min(self.scale) <= 0:
            raise ValueError(f"Resize.scale must be two positive edges, got {self.scale}")
        object.__setattr__(self, "scale", (int(self.scale[0]), int(self.scale[1])))

    def __call__(self, image: torch.Tensor, target: Target, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, Target]:
        """Resizes one image and its instances.

        Args:
            image: ``(3, H, W)`` uint8 (or float) image.
            target: ``masks`` bool ``(M, H, W)``, ``boxes`` float32 ``(M, 4)`` xyxy; optional.
            generator: Unused (the resize is deterministic).

        Returns:
            The ``(3, h, w)`` image (same dtype) and the target with ``(M, h, w)`` masks and
            scaled, clipped boxes.
        """
        return _resize(image, target, self.scale)


def _resize(image: torch.Tensor, target: Target,
            scale: tuple[int, int]) -> tuple[torch.Tensor, Target]:
    h, w = image.shape[-2:]
    new_h, new_w = rescale_size((h, w), scale)
    out = dict(target)
    if "masks" in target:
        out["masks"] = _resize_masks(target["masks"], (new_h, new_w))
    if "boxes" in target:
        # mmcv stores (new_w / w, new_h / h); HorizontalBoxes.rescale_ casts them to float32
        factors = torch.tensor([new_w / w, new_h / h], dtype=torch.float32,
                               device=target["boxes"].device).repeat(2)
        boxes = target["boxes"] * factors
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_h)
        out["boxes"] = boxes
    return _resize_image(image, (new_h, new_w)), out


@dataclass(frozen=True, kw_only=True)
class RandomChoiceResize:
    """Multi-scale training: one of ``scales`` drawn uniformly per image, then :class:`Resize`.

    mmdetection's ``RandomChoiceResize(scales, keep_ratio=True)``.
    """

    scales: tuple[tuple[int, int], ...]  # (long edge, short edge) candidates

    def __post_init__(self) -> None:
        scales = tuple((int(a), int(b)) for a, b in self.scales)
        if not scales or any(min(s) <= 0 for s in scales):
            raise ValueError(f"RandomChoiceResize.scales needs positive (long, short) pairs, "
                             f"got {self.scales}")
        object.__setattr__(self, "scales", scales)

    def __call__(self, image: torch.Tensor, target: Target, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, Target]:
        """Resizes one image and its instances to a randomly chosen scale.

        Args:
            image: ``(3, H, W)`` image.
            target: As for :class:`Resize`.
            generator: Source of the choice (one ``randint`` draw, even with one scale, so the
                stream does not depend on the number of scales).

        Returns:
            As :class:`Resize`.
        """
        choice = int(torch.randint(len(self.scales), (1,), generator=generator))
        return _resize(image, target, self.scales[choice])


@dataclass(frozen=True, kw_only=True)
class RandomFlip:
    """Horizontal flip with probability ``prob`` (mmdetection ``RandomFlip(prob)``)."""

    prob: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"RandomFlip.prob must be in [0, 1], got {self.prob}")

    def __call__(self, image: torch.Tensor, target: Target, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, Target]:
        """Flips the image, masks and boxes left-right together, or returns copies unchanged.

        Args:
            image: ``(3, H, W)`` image.
            target: ``masks`` bool ``(M, H, W)``, ``boxes`` float32 ``(M, 4)`` xyxy; optional.
            generator: Source of the coin (one ``rand`` draw per call, whatever ``prob`` is).

        Returns:
            The image and target, flipped when ``u < prob`` for ``u ~ U[0, 1)``, else unchanged.
        """
        coin = float(torch.rand((), generator=generator))
        if coin >= self.prob:
            return image, dict(target)
        return _hflip(image, target)


def _hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    width = image.shape[-1]
    out = dict(target)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    if "boxes" in target:
        boxes = target["boxes"]
        flipped = boxes.clone()
        flipped[:, 0] = width - boxes[:, 2]
        flipped[:, 2] = width - boxes[:, 0]
        out["boxes"] = flipped
    return image.flip(-1), out


@dataclass(frozen=True, kw_only=True)
class Normalize:
    """``(image - mean) / std`` per RGB channel, in float32 (mmdetection's data preprocessor).

    Padding happens after this (in :func:`solo_fast.data.collate`), with 0, so padded pixels are 0
    in normalised space, as in mmdetection.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: torch.Tensor, target: Target, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, Target]:
        """Normalises one image.

        Args:
            image: ``(3, H, W)`` uint8 (or float on the 0..255 scale) RGB image.
            target: Passed through (a shallow copy).
            generator: Unused.

        Returns:
            The float32 ``(3, H, W)`` normalised image and the target.
        """
        mean = torch.tensor(self.mean, dtype=torch.float32, device=image.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=image.device).view(3, 1, 1)
        return (image.float() - mean) / std, dict(target)


@dataclass(frozen=True, kw_only=True)
class Compose:
    """Applies ``transforms`` in order, all drawing from the same generator."""

    transforms: tuple[Any, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "transforms", tuple(self.transforms))

    def __call__(self, image: torch.Tensor, target: Target, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, Target]:
        """Runs every transform; see the module docstring for the image and target layout."""
        for transform in self.transforms:
            image, target = transform(image, target, generator=generator)
        return image, target


def build_train_transform(*, scales: Sequence[tuple[int, int]],
                          flip_prob: float = 0.5) -> Compose:
    """mmdetection's SOLO training pipeline after loading: resize, flip, normalise.

    Args:
        scales: ``TrainConfig.train_scales``; one scale gives a fixed :class:`Resize`, several a
            :class:`RandomChoiceResize`.
        flip_prob: ``TrainConfig.flip_prob``.

    Returns:
        The composed transform.
    """
    scales = tuple((int(a), int(b)) for a, b in scales)
    resize = Resize(scale=scales[0]) if len(scales) == 1 else RandomChoiceResize(scales=scales)
    return Compose(transforms=(resize, RandomFlip(prob=flip_prob), Normalize()))


def build_eval_transform(*, scale: tuple[int, int]) -> Compose:
    """mmdetection's SOLO test pipeline after loading: keep-ratio resize to ``scale``, normalise.

    Args:
        scale: ``TrainConfig.test_scale`` (long edge, short edge).

    Returns:
        The composed transform.
    """
    return Compose(transforms=(Resize(scale=tuple(scale)), Normalize()))
