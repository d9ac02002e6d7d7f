"""What every post-processing path shares: candidates, their masks' interface, boxes, resize, RLE.

The steps themselves are described in docs/algorithms.md §10; this module holds the
pieces that the fused path (:mod:`.fused`), the reference path (:mod:`.reference`) and the
families (:mod:`.solo`, :mod:`.decoupled_solo`, :mod:`.solov2`) all use, so each is written once.
"""

# N=images, L=levels, S=grid side of a level, G=cells of all levels (sum of S_l^2), C=classes,
# K=candidates ((cell, class) pairs), h, w=size of one level's mask map, H4, W4=the stride-4 mask
# map (level 0), H0, W0=original size

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from solo_fast.ops import MaskScores

__all__ = [
    "MASK_FORMATS",
    "CandidateMasks",
    "Candidates",
    "boxes_from_hits",
    "boxes_of_thresholded",
    "encode_rle",
    "masks_to_boxes",
    "points_nms",
    "prepare_cls_scores",
    "prepare_mask_probs",
    "resize_to_original",
    "select_candidates",
]

MASK_FORMATS = ("bool", "rle")
Size = Sequence[tuple[int, int]]


class Candidates(NamedTuple):
    """(cell, class) pairs scoring above ``score_thr``, image-major, then cell, then class.

    Attributes:
        image: (K,) int64 image of the batch.
        cell: (K,) int64 cell index over all levels (level offset + i * S + j).
        level: (K,) int64 level of the cell.
        local: (K,) int64 cell index within its level (i * S + j): its mask channel in SOLO.
        label: (K,) int64 class.
        score: (K,) class probability after points NMS.
    """

    image: Tensor
    cell: Tensor
    level: Tensor
    local: Tensor
    label: Tensor
    score: Tensor


class CandidateMasks(abc.ABC):
    """The soft masks of one batch's candidates, as a family computes them: the one thing the
    families do differently. A family builds one per call from its head's outputs.

    Args:
        size: (H4, W4), the stride-4 mask map.
        num: K, the number of candidates.
        device: Where the masks are computed.
    """

    def __init__(self, *, size: Sequence[int], num: int, device: torch.device) -> None:
        self.size = tuple(int(v) for v in size)
        self.num = int(num)
        self.device = device

    @abc.abstractmethod
    def scores(self, threshold: float, backend: str | None) -> MaskScores:
        """Area and soft sum of every candidate's binary mask ``soft > threshold``, from one of
        the fused scoring ops (on ``backend``, None: its default), without storing soft masks.

        Returns:
            :class:`~solo_fast.ops.MaskScores` of the K candidates (``packed``: the binary masks
            bit-packed where the op writes them, else None).
        """

    @abc.abstractmethod
    def soft(self, index: Tensor) -> Tensor:
        """(k, H4, W4) soft masks of the candidates ``index`` (k,) int64, the fastest way."""

    def reference_soft(self) -> Tensor:
        """(K, H4, W4) soft masks of every candidate in mmdetection's order of operations (the
        reference path's masks). Where the fast way computes the same values, it is that."""
        return self.soft(torch.arange(self.num, device=self.device))


def points_nms(scores: Tensor) -> Tensor:
    """Keep a cell's score iff it is >= its up, left and up-left neighbours; zero it otherwise.

    mmdetection's ``points_nms(heat, kernel=2)``: a 2x2 max-pool (stride 1, padding 1) cropped to
    the input size. Each class channel is filtered independently and ties are kept.

    Args:
        scores: (N, C, S, S) class probabilities (after the sigmoid).

    Returns:
        (N, C, S, S), ``scores`` with the suppressed cells set to 0.
    """
    local_max = F.max_pool2d(scores, 2, stride=1, padding=1)[:, :, :-1, :-1]  # (N, C, S, S)
    return scores * (local_max == scores)


def prepare_cls_scores(cls_preds: Sequence[Tensor]) -> list[Tensor]:
    """Class logits -> sigmoid -> points NMS, per level (mmdetection's eval-mode class scores).

    Args:
        cls_preds: L tensors (N, C, S_l, S_l) of logits.

    Returns:
        L tensors (N, C, S_l, S_l) of probabilities, 0 where a cell is not a local maximum.
    """
    return [points_nms(logits.sigmoid()) for logits in cls_preds]


def prepare_mask_probs(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask logits -> sigmoid -> bilinear resize (mmdetection's eval-mode SOLO / Decoupled masks).

    The sigmoid comes first, as in mmdetection. Resizing is per channel, so a subset of a level's
    channels gives the values of the whole level, bit for bit on GPU and on CPU for real image
    sizes. One exception: for outputs with H4 + W4 <= 128 PyTorch's CPU kernel vectorises over
    channels, and its remainder channels (and a subset of fewer than 8) round differently in the
    last bit or two (<= 2e-7 observed on the fixtures).

    Args:
        mask_logits: (N, Q, h, w) logits of one level.
        size: (H4, W4), the level-0 mask-map size.

    Returns:
        (N, Q, H4, W4) probabilities (align_corners=False, no antialiasing).
    """
    return F.interpolate(mask_logits.sigmoid(), size=tuple(size), mode="bilinear",
                         align_corners=False)


def check_levels(tensors: Sequence[Tensor], name: str, num_grids: Sequence[int],
                 channels: str | int) -> None:
    """ValueError unless ``tensors`` holds one 4-d tensor per level of the expected shape.

    Args:
        tensors: L tensors.
        name: The argument's name, for the message.
        num_grids: S_l per level.
        channels: What dimension 1 holds: ``"classes"`` (then the last two are (S_l, S_l)),
            ``"cells"`` (S_l^2 channels), ``"grid"`` (S_l channels), or that many channels.
    """
    if len(tensors) != len(num_grids):
        raise ValueError(f"{name} must have one tensor per level ({len(num_grids)}), "
                         f"got {len(tensors)}")
    for level, (tensor, grid) in enumerate(zip(tensors, num_grids)):
        if channels == "classes":
            ok = tensor.dim() == 4 and tuple(tensor.shape[-2:]) == (grid, grid)
            expected = f"(N, C, {grid}, {grid})"
        else:
            count = {"cells": grid * grid, "grid": grid}.get(channels, channels)
            ok = tensor.dim() == 4 and tensor.shape[1] == count
            expected = f"(N, {count}, h, w)"
        if not ok:
            raise ValueError(f"{name}[{level}] must have shape {expected}, "
                             f"got {tuple(tensor.shape)}")


def select_candidates(cls_scores: Sequence[Tensor], num_grids: Sequence[int],
                      score_thr: float) -> Candidates:
    """Every (cell, class) pair with a prepared class score > ``score_thr`` (strict).

    Args:
        cls_scores: L tensors (N, C, S_l, S_l), from :func:`prepare_cls_scores`.
        num_grids: S_l per level.
        score_thr: The class-score threshold.

    Returns:
        The candidates of the whole batch, in mmdetection's per-image order.
    """
    check_levels(cls_scores, "cls_preds", num_grids, "classes")
    num, classes = cls_scores[0].shape[:2]
    flat = torch.cat([s.permute(0, 2, 3, 1).reshape(num, -1, classes)  # (N, S*S, C)
                      for s in cls_scores], 1)  # (N, G, C)
    image, cell, label = (flat > score_thr).nonzero(as_tuple=True)
    cells = torch.tensor([s * s for s in num_grids], device=cell.device)
    level_end = cells.cumsum(0)  # (L,)
    level = torch.searchsorted(level_end, cell, right=True)
    local = cell - (level_end - cells)[level]
    return Candidates(image, cell, level, local, label, flat[image, cell, label])


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes of binary masks; x2 and y2 are exclusive (last index + 1).

    Args:
        masks: (K, H, W) bool.

    Returns:
        (K, 4) float32 boxes in pixels of the masks; an empty mask gets (0, 0, 0, 0).
    """
    if masks.numel() == 0:
        return torch.zeros(masks.shape[0], 4, dtype=torch.float32, device=masks.device)
    return boxes_from_hits(masks.any(2), masks.any(1))


def boxes_from_hits(rows: Tensor, cols: Tensor) -> Tensor:
    """Tight xyxy boxes (x2 and y2 exclusive) from which rows and columns hold mask pixels.

    Batched over any leading dimensions (the export graphs call it on (N, K, ...)).

    Args:
        rows: (..., H) bool, row y of the mask holds a pixel.
        cols: (..., W) bool, column x of the mask holds a pixel (of the same masks as ``rows``).

    Returns:
        (..., 4) float32 boxes; a mask without pixels gets (0, 0, 0, 0).
    """

    def span(hit: Tensor) -> tuple[Tensor, Tensor]:
        size = hit.shape[-1]
        index = torch.arange(size, device=hit.device)
        first = torch.where(hit, index, size).amin(-1)
        last = torch.where(hit, index, -1).amax(-1) + 1
        return first, last

    x1, x2 = span(cols)
    y1, y2 = span(rows)
    boxes = torch.stack([x1, y1, x2, y2], -1).float()  # (..., 4)
    return boxes * (x2 > 0).unsqueeze(-1)  # x2 > 0 exactly when the mask has a pixel


def boxes_of_thresholded(soft: Tensor, threshold: float) -> Tensor:
    """:func:`masks_to_boxes` of ``soft > threshold``, from the soft masks' row and column maxima.

    A row holds a mask pixel exactly when its maximum passes the threshold, and float
    max-reductions run SIMD where torch's reductions over bool do not. A NaN (a broken model's
    output) makes its row's maximum NaN, which would hide the row's other pixels: then the boxes
    come from the bool masks instead.

    Args:
        soft: (K, H, W) floating.
        threshold: The mask threshold.

    Returns:
        (K, 4) float32 boxes, as :func:`masks_to_boxes` returns them.
    """
    if soft.numel() == 0:
        return torch.zeros(soft.shape[0], 4, dtype=torch.float32, device=soft.device)
    row_max = soft.amax(2)  # (K, H)
    if bool(row_max.isnan().any()):
        return masks_to_boxes(soft > threshold)
    return boxes_from_hits(row_max > threshold, soft.amax(1) > threshold)


def resize_to_original(soft: Tensor, canvas: tuple[int, int], image_size: tuple[int, int],
                       original_size: tuple[int, int]) -> Tensor:
    """Stride-4 soft masks -> soft masks at the original image size, as mmdetection pastes them
    (``SOLOHead._predict_by_feat_single``): bilinear to the padded canvas, crop to the resized
    image, bilinear to the original size.

    Args:
        soft: (K, H4, W4) soft masks.
        canvas: (H, W) of the padded canvas (mask stride x the mask map).
        image_size: (h, w) of the resized image inside the canvas.
        original_size: (H0, W0).

    Returns:
        (K, H0, W0) soft masks (align_corners=False).
    """
    height, width = (int(v) for v in image_size)
    original = tuple(int(v) for v in original_size)
    if soft.shape[0] == 0:
        return soft.new_zeros((0, *original))
    up = F.interpolate(soft[None], size=canvas, mode="bilinear", align_corners=False)
    up = up[:, :, :height, :width]  # (1, K, h, w): crop away the padding
    return F.interpolate(up, size=original, mode="bilinear", align_corners=False)[0]


def encode_rle(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Compressed COCO run-length encodings of binary masks (pycocotools), ready for ``json``.

    The one encoder of the package: prediction (``mask_format="rle"``) and COCO evaluation use it.

    Args:
        masks: (K, H, W) bool (or 0/1) masks, a tensor on any device or an array.

    Returns:
        K dicts ``{"size": [H, W], "counts": str}``.

    Raises:
        ValueError: ``masks`` is not 3-d.
    """
    # imported here: only RLE output needs pycocotools, so building and running a model does not
    from pycocotools import mask as mask_util

    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    if isinstance(masks, Tensor):
        # pycocotools wants (H, W, K) in Fortran order, i.e. (K, W, H) contiguous: torch makes
        # that copy with every thread
        masks = masks.detach().transpose(1, 2).to(torch.uint8).contiguous().cpu().numpy()
        fortran = masks.transpose(2, 1, 0)  # (H, W, K), Fortran-contiguous view
    else:
        fortran = np.asfortranarray(np.asarray(masks).astype(np.uint8, copy=False)
                                    .transpose(1, 2, 0))  # (H, W, K)
    encoded = mask_util.encode(fortran)
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
    return encoded
