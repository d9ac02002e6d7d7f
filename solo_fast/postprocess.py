"""Post-processing of the SOLO family: raw head outputs -> instances per image (SPEC §9).

One object per family, all sharing the same steps:

1. class logits -> sigmoid -> points NMS (:func:`prepare_cls_scores`), flattened over the levels
   into (N, G, C) in mmdetection's cell order (level by level, row-major cells);
2. candidates: every (cell, class) pair with score > ``score_thr`` (one cell may give several);
3. the candidates' soft masks at stride 4, the only family-specific step, computed for the
   candidates alone (never for all S^2 cells);
4. binarise (> ``mask_thr``), area, small-mask filter (area > the stride of the candidate's level),
   maskness rescoring (score x mean probability inside the mask);
5. matrix NMS (:func:`matrix_nms`), per image;
6. the kept soft masks resized bilinearly to the padded canvas, cropped to the image, resized to
   the original size and thresholded; boxes are the tight boxes of those masks.

Two paths compute this. The **reference path** (``backend="reference"``, the code of this module)
reproduces mmdetection 3.3's ``predict_by_feat`` operation for operation, so its results are
mmdetection's, with two deliberate differences: matrix-NMS ties are ordered by input
index (:func:`~solo_fast.ops.reference.matrix_nms_reference`), and the boxes are computed from the
masks (mmdetection returns zeros).

mmdetection's SOLO and Decoupled heads apply part of this in their eval-mode ``forward`` (sigmoid,
resize of the mask probabilities to stride 4, sigmoid + points NMS of the class scores);
solo_fast's heads always return logits, so those steps live here (:func:`prepare_mask_probs`,
:func:`prepare_cls_scores`). ``process_prepared`` takes probabilities prepared that way, e.g.
outputs of mmdetection's eval-mode forward.

The **fused path** (:mod:`solo_fast.postprocess_fused`; the default, ``backend=None``, or the name
of an op backend) scores every candidate of the batch with one fused op and materialises masks only
for the nms_pre and max_per_img survivors; its results equal the reference path's with scores to
~1e-7 (float64 maskness sums). Both return bool masks or, with ``mask_format="rle"``, COCO RLE.
"""

# N=images, L=levels, S=grid side of a level, G=cells of all levels (sum of S_l^2), C=classes,
# K=candidates ((cell, class) pairs), E=mask-feature channels, Q=mask channels of a level,
# h, w=size of one level's mask map, H4, W4=the stride-4 mask map (level 0), H0, W0=original size

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from solo_fast.config import ModelConfig, TestConfig
from solo_fast.models.common import points_nms
from solo_fast.ops import BACKENDS
from solo_fast.ops.reference import matrix_nms_reference
from solo_fast.postprocess_fused import (
    MASK_FORMATS,
    MaskSource,
    decoupled_source,
    dynamic_source,
    encode_rle,
    predict_fused,
    solo_source,
)

__all__ = [
    "Candidates",
    "DecoupledSOLOPostProcessor",
    "SOLOPostProcessor",
    "SOLOv2PostProcessor",
    "build_postprocessor",
    "masks_to_boxes",
    "matrix_nms",
    "prepare_cls_scores",
    "prepare_mask_probs",
]

Size = Sequence[tuple[int, int]]


class Candidates(NamedTuple):
    """(cell, class) pairs scoring above ``score_thr``, image-major, then cell, then class.

    Attributes:
        image: (K,) int64 image of the batch.
        cell: (K,) int64 cell index over all levels (level offset + i * S + j).
        level: (K,) int64 level of the cell.
        label: (K,) int64 class.
        score: (K,) class probability after points NMS.
    """

    image: Tensor
    cell: Tensor
    level: Tensor
    label: Tensor
    score: Tensor


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


def matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor, mask_area: Tensor,
               test_cfg: TestConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Matrix NMS with ``test_cfg``'s settings: the one place the post-processing calls it.

    Args:
        masks: (K, H4, W4) bool.
        labels: (K,) int64.
        scores: (K,) maskness-rescored scores.
        mask_area: (K,) float areas of ``masks``.
        test_cfg: nms_pre, max_per_img, kernel, sigma, filter_thr.

    Returns:
        (scores, labels, keep_inds) of the kept candidates, by decayed score (descending).
    """
    scores, labels, _, keep_inds = matrix_nms_reference(
        masks, labels, scores, mask_area=mask_area, nms_pre=test_cfg.nms_pre,
        max_num=test_cfg.max_per_img, kernel=test_cfg.kernel, sigma=test_cfg.sigma,
        filter_thr=test_cfg.filter_thr)
    return scores, labels, keep_inds


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes of binary masks; x2 and y2 are exclusive (last index + 1).

    Args:
        masks: (K, H, W) bool.

    Returns:
        (K, 4) float32 boxes in pixels of the masks; an empty mask gets (0, 0, 0, 0).
    """
    num = masks.shape[0]
    if masks.numel() == 0:
        return torch.zeros(num, 4, dtype=torch.float32, device=masks.device)
    return boxes_from_hits(masks.any(2), masks.any(1))


def boxes_from_hits(rows: Tensor, cols: Tensor) -> Tensor:
    """Tight xyxy boxes (x2 and y2 exclusive) from which rows and columns hold mask pixels.

    Args:
        rows: (K, H) bool, row y of mask k holds a pixel.
        cols: (K, W) bool, column x of mask k holds a pixel.

    Returns:
        (K, 4) float32 boxes; a mask without pixels gets (0, 0, 0, 0).
    """

    def span(hit: Tensor) -> tuple[Tensor, Tensor]:
        size = hit.shape[1]
        index = torch.arange(size, device=hit.device)
        first = torch.where(hit, index, size).amin(1)
        last = torch.where(hit, index, -1).amax(1) + 1
        return first, last

    x1, x2 = span(cols)
    y1, y2 = span(rows)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()  # (K, 4)
    return boxes * rows.any(1, keepdim=True)


class _PostProcessor:
    """The steps every family shares; a family supplies its candidates' soft masks.

    Args:
        test_cfg: Inference thresholds and matrix-NMS settings.
        num_grids: Grid side S_l per level.
        strides: Per-level stride of the small-mask filter (area > stride, in stride-4 pixels).
        mask_stride: Stride of the level-0 mask map (SOLOv2: of the mask features); the padded
            canvas is mask_stride x its size.
        backend: ``"reference"``: the reference path (mmdetection's order of operations, every
            candidate's soft mask materialised). None (default): the fused path, its ops on their
            default backend. ``"cpu"``, ``"cuda"``, ``"triton"``: the fused path, its ops on that
            backend. An attribute: set ``processor.backend`` (e.g. ``model.postprocess.backend``)
            to switch later.
    """

    def __init__(self, *, test_cfg: TestConfig, num_grids: Sequence[int],
                 strides: Sequence[int], mask_stride: int = 4, backend: str | None = None) -> None:
        if len(num_grids) != len(strides):
            raise ValueError(f"num_grids and strides need one entry per level, got "
                             f"{len(num_grids)} and {len(strides)}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, "
                             f"got {backend!r}")
        self.backend = backend
        self.test_cfg = test_cfg
        self.num_grids = tuple(int(s) for s in num_grids)
        self.strides = tuple(int(s) for s in strides)
        self.mask_stride = int(mask_stride)
        cells = torch.tensor([s * s for s in self.num_grids])
        self._level_end = cells.cumsum(0)  # (L,)
        self._level_start = self._level_end - cells  # (L,)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(test_cfg={self.test_cfg!r}, num_grids={self.num_grids}, "
                f"strides={self.strides}, mask_stride={self.mask_stride}, "
                f"backend={self.backend!r})")

    # ------------------------------------------------------------------------------- stages

    def select_candidates(self, cls_scores: Sequence[Tensor]) -> Candidates:
        """Every (cell, class) pair with a prepared class score > ``score_thr`` (strict).

        Args:
            cls_scores: L tensors (N, C, S_l, S_l), from :func:`prepare_cls_scores`.

        Returns:
            The candidates of the whole batch, in mmdetection's per-image order.
        """
        self._check_levels(cls_scores, "cls_preds")
        num, classes = cls_scores[0].shape[:2]
        flat = torch.cat([s.permute(0, 2, 3, 1).reshape(num, -1, classes)  # (N, S*S, C)
                          for s in cls_scores], 1)  # (N, G, C)
        image, cell, label = (flat > self.test_cfg.score_thr).nonzero(as_tuple=True)
        level = torch.searchsorted(self._level_end.to(cell.device), cell, right=True)
        return Candidates(image, cell, level, label, flat[image, cell, label])

    def _run(self, cls_scores: Sequence[Tensor],
             candidate_masks: Callable[[Candidates], Tensor],
             mask_source: Callable[[Candidates], MaskSource], image_sizes: Size,
             original_sizes: Size, trace: list | None, mask_format: str) -> list[dict[str, Any]]:
        """Candidates from prepared class scores, then the reference path (their soft masks,
        steps 4-6) or the fused path (their mask source)."""
        batch = cls_scores[0].shape[0] if len(cls_scores) else 0
        if len(image_sizes) != batch or len(original_sizes) != batch:
            raise ValueError(f"image_sizes and original_sizes need one (h, w) per image of the "
                             f"batch ({batch}), got {len(image_sizes)} and {len(original_sizes)}")
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, "
                             f"got {self.backend!r}")
        candidates = self.select_candidates(cls_scores)
        if self.backend != "reference":
            if trace is not None:
                raise ValueError("trace records the reference path's intermediate values: "
                                 "use backend='reference' with trace")
            return predict_fused(self, candidates, mask_source(candidates), image_sizes,
                                 original_sizes, backend=self.backend, mask_format=mask_format)
        results = self._predict(candidate_masks(candidates), candidates, image_sizes,
                                original_sizes, trace)
        if mask_format == "rle":
            for result in results:
                result["masks"] = encode_rle(result["masks"])
        return results

    def _local_cells(self, candidates: Candidates) -> Tensor:
        return candidates.cell - self._level_start.to(candidates.cell.device)[candidates.level]

    def _predict(self, soft: Tensor, candidates: Candidates, image_sizes: Size,
                 original_sizes: Size, trace: list | None) -> list[dict[str, Tensor]]:
        """Steps 4-6 from the candidates' soft masks (K, H4, W4)."""
        cfg = self.test_cfg
        num_images = len(image_sizes)
        canvas = (soft.shape[-2] * self.mask_stride, soft.shape[-1] * self.mask_stride)
        masks = soft > cfg.mask_thr  # (K, H4, W4)
        area = masks.sum((1, 2)).float()  # (K,)
        # The area is in mask-map pixels yet compared with the level's stride, as mmdetection does
        strides = torch.tensor(self.strides, dtype=area.dtype, device=area.device)
        passes = area > strides[candidates.level]
        counts = torch.bincount(candidates.image, minlength=num_images).tolist()
        per_image = zip(*(t.split(counts) for t in (soft, masks, area, passes, *candidates)))

        results = []
        for image, (soft_b, masks_b, area_b, passes_b, _, cell_b, level_b, label_b, score_b) \
                in enumerate(per_image):
            kept_soft, kept_masks, kept_area = soft_b[passes_b], masks_b[passes_b], area_b[passes_b]
            maskness = (kept_soft * kept_masks).sum((1, 2)) / kept_area  # mean prob. in the mask
            labels, scores = label_b[passes_b], score_b[passes_b] * maskness
            nms_scores, nms_labels, keep = matrix_nms(kept_masks, labels, scores, kept_area, cfg)
            if trace is not None:
                trace.append({
                    "candidates": {"cell_index": cell_b, "level": level_b, "label": label_b,
                                   "cls_score": score_b, "mask_area": area_b,
                                   "passes_area_filter": passes_b},
                    "maskness": maskness,
                    "nms_input": {"masks": kept_masks, "labels": labels, "scores": scores,
                                  "mask_area": kept_area},
                    "nms_output": {"scores": nms_scores, "labels": nms_labels, "keep_inds": keep}})
            final = self._final_masks(kept_soft[keep], canvas, image_sizes[image],
                                      original_sizes[image])
            results.append({"masks": final, "labels": nms_labels.long(),
                            "scores": nms_scores.float(), "boxes": masks_to_boxes(final)})
        return results

    def _final_masks(self, soft: Tensor, canvas: tuple[int, int], image_size: tuple[int, int],
                     original_size: tuple[int, int]) -> Tensor:
        """(K, H4, W4) soft masks -> (K, H0, W0) bool at the original image size."""
        return self._final_soft(soft, canvas, image_size, original_size) > self.test_cfg.mask_thr

    def _final_soft(self, soft: Tensor, canvas: tuple[int, int], image_size: tuple[int, int],
                    original_size: tuple[int, int]) -> Tensor:
        """(K, H4, W4) soft masks -> (K, H0, W0) soft masks at the original image size."""
        height, width = (int(v) for v in image_size)
        original = tuple(int(v) for v in original_size)
        if soft.shape[0] == 0:
            return soft.new_zeros((0, *original))
        up = F.interpolate(soft[None], size=canvas, mode="bilinear", align_corners=False)
        up = up[:, :, :height, :width]  # (1, K, image h, image w): crop away the padding
        up = F.interpolate(up, size=original, mode="bilinear", align_corners=False)
        return up[0]

    def _check_levels(self, tensors: Sequence[Tensor], name: str,
                      channels: Callable[[int], int] | None = None) -> None:
        if len(tensors) != len(self.num_grids):
            raise ValueError(f"{name} must have one tensor per level ({len(self.num_grids)}), "
                             f"got {len(tensors)}")
        for level, (tensor, grid) in enumerate(zip(tensors, self.num_grids)):
            if channels is None:  # class scores: (N, C, S, S)
                ok = tensor.dim() == 4 and tuple(tensor.shape[-2:]) == (grid, grid)
                expected = f"(N, C, {grid}, {grid})"
            else:
                ok = tensor.dim() == 4 and tensor.shape[1] == channels(grid)
                expected = f"(N, {channels(grid)}, h, w)"
            if not ok:
                raise ValueError(f"{name}[{level}] must have shape {expected}, "
                                 f"got {tuple(tensor.shape)}")



class SOLOPostProcessor(_PostProcessor):
    """Instances from SOLO outputs: one mask channel per grid cell.

    A candidate's soft mask is the sigmoid of its cell's channel, resized bilinearly to the
    level-0 mask size (sigmoid first, as mmdetection's eval forward does); only the candidates'
    channels are gathered, activated and resized.

    Constructor arguments: those of every post-processor (``_PostProcessor``).
    """

    def __call__(self, outputs: Any, image_sizes: Size, original_sizes: Size, *,
                 mask_format: str = "bool", trace: list | None = None) -> list[dict[str, Any]]:
        """Instances per image from raw SOLO outputs.

        Args:
            outputs: The head's outputs, read by attribute: ``mask_preds``, L tensors
                (N, S_l^2, h_l, w_l) of mask logits (level 0 at stride 4), and ``cls_preds``, L
                tensors (N, C, S_l, S_l) of class logits.
            image_sizes: N pairs (h, w): the resized image inside the padded canvas.
            original_sizes: N pairs (H0, W0): the size to return the masks at.
            mask_format: ``"bool"``: masks as one bool tensor per image; ``"rle"``: as a list of
                COCO RLE dicts ``{"size": [H0, W0], "counts": str}`` (pycocotools, ``json``-ready),
                encoded chunk by chunk on the fused path.
            trace: If a list, one dict of intermediate values per image is appended to it
                (``candidates``, ``maskness``, ``nms_input``, ``nms_output``), for tests and
                debugging. Reference path only (``backend="reference"``).

        Returns:
            Per image ``{"masks": bool (K, H0, W0) or K RLE dicts, "labels": int64 (K,),
            "scores": float32 (K,), "boxes": float32 (K, 4)}`` by decayed score (descending).
            Boxes are the tight xyxy boxes of the masks in original-image pixels (x2, y2
            exclusive), zero for an empty mask. K may be 0.

        Raises:
            ValueError: outputs of the wrong shapes or number of levels, sizes not one per
                image, an unknown mask_format or backend, or trace on the fused path.
        """
        self._check_levels(outputs.mask_preds, "mask_preds", lambda s: s * s)
        return self._run(prepare_cls_scores(outputs.cls_preds),
                         lambda c: self._gather(outputs.mask_preds, c, activate=True),
                         lambda c: self._source(outputs.mask_preds, c, activate=True),
                         image_sizes, original_sizes, trace, mask_format)

    def process_prepared(self, *, mask_probs: Sequence[Tensor], cls_scores: Sequence[Tensor],
                         image_sizes: Size, original_sizes: Size, mask_format: str = "bool",
                         trace: list | None = None) -> list[dict[str, Any]]:
        """Instances from eval-mode-prepared tensors, e.g. mmdetection's eval-mode SOLO outputs.

        Args:
            mask_probs: L tensors (N, S_l^2, H4, W4): :func:`prepare_mask_probs` of each level.
                Only the candidates' channels are read.
            cls_scores: L tensors (N, C, S_l, S_l): :func:`prepare_cls_scores`.
            image_sizes, original_sizes, mask_format, trace: As for ``__call__``.

        Returns:
            As ``__call__``.
        """
        self._check_levels(mask_probs, "mask_probs", lambda s: s * s)
        return self._run(cls_scores, lambda c: self._gather(mask_probs, c, activate=False),
                         lambda c: self._source(mask_probs, c, activate=False),
                         image_sizes, original_sizes, trace, mask_format)

    def _gather(self, levels: Sequence[Tensor], candidates: Candidates, *, activate: bool,
                subset: Tensor | None = None) -> Tensor:
        """(K, H4, W4) candidate masks from per-level logits (activate) or probabilities; only
        those of the candidates ``subset`` (k,) if given, (k, H4, W4)."""
        size = tuple(levels[0].shape[-2:])
        if subset is not None:
            candidates = Candidates(*(t[subset] for t in candidates))
        soft = levels[0].new_empty((len(candidates.cell), *size))  # (K, H4, W4)
        local = self._local_cells(candidates)
        for level, maps in enumerate(levels):
            index = (candidates.level == level).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            chosen = maps[candidates.image[index], local[index]]  # (K_l, h, w)
            soft[index] = prepare_mask_probs(chosen[None], size)[0] if activate else chosen
        return soft

    def _source(self, levels: Sequence[Tensor], candidates: Candidates, *,
                activate: bool) -> MaskSource:
        return solo_source(
            levels, candidates.image, candidates.level, self._local_cells(candidates),
            activate=activate,
            soft=lambda index: self._gather(levels, candidates, activate=activate, subset=index))


class DecoupledSOLOPostProcessor(_PostProcessor):
    """Instances from Decoupled SOLO / Decoupled SOLO Light outputs.

    The soft mask of cell (i, j) is sigmoid(X[j]) * sigmoid(Y[i]), each branch's probabilities
    resized bilinearly to the level-0 mask size first, as in mmdetection. Only the X columns and
    Y rows that candidates use are activated and resized, once each.

    Constructor arguments: those of every post-processor (``_PostProcessor``).
    """

    def __call__(self, outputs: Any, image_sizes: Size, original_sizes: Size, *,
                 mask_format: str = "bool", trace: list | None = None) -> list[dict[str, Any]]:
        """Instances per image from raw Decoupled SOLO outputs.

        Args:
            outputs: The head's outputs, read by attribute: ``mask_preds_x`` and
                ``mask_preds_y``, L tensors (N, S_l, h_l, w_l) of logits (channel j of X belongs
                to grid column j, channel i of Y to grid row i; level 0 at stride 4), and
                ``cls_preds``, L tensors (N, C, S_l, S_l) of class logits.
            image_sizes: N pairs (h, w): the resized image inside the padded canvas.
            original_sizes: N pairs (H0, W0): the size to return the masks at.
            mask_format: ``"bool"``: masks as one bool tensor per image; ``"rle"``: as a list of
                COCO RLE dicts ``{"size": [H0, W0], "counts": str}`` (pycocotools, ``json``-ready),
                encoded chunk by chunk on the fused path.
            trace: If a list, one dict of intermediate values per image is appended to it
                (``candidates``, ``maskness``, ``nms_input``, ``nms_output``), for tests and
                debugging. Reference path only (``backend="reference"``).

        Returns:
            Per image ``{"masks": bool (K, H0, W0) or K RLE dicts, "labels": int64 (K,),
            "scores": float32 (K,), "boxes": float32 (K, 4)}`` by decayed score (descending).
            Boxes are the tight xyxy boxes of the masks in original-image pixels (x2, y2
            exclusive), zero for an empty mask. K may be 0.

        Raises:
            ValueError: outputs of the wrong shapes or number of levels, sizes not one per
                image, an unknown mask_format or backend, or trace on the fused path.
        """
        return self._run(
            prepare_cls_scores(outputs.cls_preds),
            lambda c: self._products(outputs.mask_preds_x, outputs.mask_preds_y, c,
                                     activate=True),
            lambda c: self._source(outputs.mask_preds_x, outputs.mask_preds_y, c, activate=True),
            image_sizes, original_sizes, trace, mask_format)

    def process_prepared(self, *, mask_probs_x: Sequence[Tensor], mask_probs_y: Sequence[Tensor],
                         cls_scores: Sequence[Tensor], image_sizes: Size, original_sizes: Size,
                         mask_format: str = "bool",
                         trace: list | None = None) -> list[dict[str, Any]]:
        """Instances from eval-mode-prepared tensors, e.g. mmdetection's eval-mode Decoupled
        outputs.

        Args:
            mask_probs_x, mask_probs_y: L tensors (N, S_l, H4, W4): :func:`prepare_mask_probs` of
                each level of each branch. Only the candidates' columns and rows are read.
            cls_scores: L tensors (N, C, S_l, S_l): :func:`prepare_cls_scores`.
            image_sizes, original_sizes, mask_format, trace: As for ``__call__``.

        Returns:
            As ``__call__``.
        """
        return self._run(
            cls_scores,
            lambda c: self._products(mask_probs_x, mask_probs_y, c, activate=False),
            lambda c: self._source(mask_probs_x, mask_probs_y, c, activate=False),
            image_sizes, original_sizes, trace, mask_format)

    def _products(self, levels_x: Sequence[Tensor], levels_y: Sequence[Tensor],
                  candidates: Candidates, *, activate: bool) -> Tensor:
        """(K, H4, W4) candidate masks sigma(X[j]) * sigma(Y[i]), level by level."""
        self._check_levels(levels_x, "mask_preds_x", lambda s: s)
        self._check_levels(levels_y, "mask_preds_y", lambda s: s)
        size = tuple(levels_x[0].shape[-2:])
        soft = levels_x[0].new_empty((len(candidates.cell), *size))  # (K, H4, W4)
        local = self._local_cells(candidates)
        for level, grid in enumerate(self.num_grids):
            index = (candidates.level == level).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            image = candidates.image[index]
            row, col = local[index] // grid, local[index] % grid
            x = self._branch(levels_x[level], image, col, size, activate)  # (K_l, H4, W4)
            y = self._branch(levels_y[level], image, row, size, activate)  # (K_l, H4, W4)
            soft[index] = x * y
        return soft

    def _source(self, levels_x: Sequence[Tensor], levels_y: Sequence[Tensor],
                candidates: Candidates, *, activate: bool) -> MaskSource:
        """The distinct X and Y maps the candidates use (prepared as ``_products`` prepares
        them, so the same values), in one (U, H4, W4) tensor, and each candidate's two maps."""
        self._check_levels(levels_x, "mask_preds_x", lambda s: s)
        self._check_levels(levels_y, "mask_preds_y", lambda s: s)
        size = tuple(levels_x[0].shape[-2:])
        local = self._local_cells(candidates)
        row, col = torch.zeros_like(local), torch.zeros_like(local)  # (K,) into the maps
        pairs = []  # per level and branch: (maps, image, channel, the candidates' map index)
        for level, grid in enumerate(self.num_grids):
            index = (candidates.level == level).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            image = candidates.image[index]
            pairs += [(levels_x[level], image, local[index] % grid, col, index),
                      (levels_y[level], image, local[index] // grid, row, index)]
        # each level's maps written into one preallocated tensor (a cat would copy them all)
        distinct = [torch.unique(image * maps.shape[1] + channel, return_inverse=True)
                    for maps, image, channel, _, _ in pairs]
        probs = levels_x[0].new_empty((sum(len(d[0]) for d in distinct), *size))  # (U, H4, W4)
        offset = 0
        for (maps, image, channel, which, index), (unique, inverse) in zip(pairs, distinct):
            chosen = maps[unique // maps.shape[1], unique % maps.shape[1]]  # (U_l, h, w)
            probs[offset:offset + len(unique)] = (
                prepare_mask_probs(chosen[None], size)[0] if activate else chosen)
            which[index] = inverse + offset
            offset += len(unique)
        return decoupled_source(probs, row, col)

    @staticmethod
    def _branch(maps: Tensor, image: Tensor, channel: Tensor, size: tuple[int, int],
                activate: bool) -> Tensor:
        """The (image, channel) maps of one branch, each distinct one prepared once."""
        channels = maps.shape[1]
        distinct, inverse = torch.unique(image * channels + channel, return_inverse=True)
        chosen = maps[distinct // channels, distinct % channels]  # (U, h, w)
        if activate:
            chosen = prepare_mask_probs(chosen[None], size)[0]  # (U, H4, W4)
        return chosen[inverse]


class SOLOv2PostProcessor(_PostProcessor):
    """Instances from SOLOv2 outputs: dynamic 1x1 kernels applied to the mask features.

    A candidate's soft mask is sigmoid(kernel . mask_feats), computed for the candidates' kernels
    only, as one 1x1 convolution per image (mmdetection's operation).

    Constructor arguments: those of every post-processor (``_PostProcessor``).
    """

    def __call__(self, outputs: Any, image_sizes: Size, original_sizes: Size, *,
                 mask_format: str = "bool", trace: list | None = None) -> list[dict[str, Any]]:
        """Instances per image from raw SOLOv2 outputs.

        Args:
            outputs: The head's outputs, read by attribute: ``kernel_preds``, L tensors
                (N, E, S_l, S_l); ``cls_preds``, L tensors (N, C, S_l, S_l) of class logits;
                ``mask_feats``, (N, E, H4, W4).
            image_sizes: N pairs (h, w): the resized image inside the padded canvas.
            original_sizes: N pairs (H0, W0): the size to return the masks at.
            mask_format: ``"bool"``: masks as one bool tensor per image; ``"rle"``: as a list of
                COCO RLE dicts ``{"size": [H0, W0], "counts": str}`` (pycocotools, ``json``-ready),
                encoded chunk by chunk on the fused path.
            trace: If a list, one dict of intermediate values per image is appended to it
                (``candidates``, ``maskness``, ``nms_input``, ``nms_output``), for tests and
                debugging. Reference path only (``backend="reference"``).

        Returns:
            Per image ``{"masks": bool (K, H0, W0) or K RLE dicts, "labels": int64 (K,),
            "scores": float32 (K,), "boxes": float32 (K, 4)}`` by decayed score (descending).
            Boxes are the tight xyxy boxes of the masks in original-image pixels (x2, y2
            exclusive), zero for an empty mask. K may be 0.

        Raises:
            ValueError: outputs of the wrong shapes or number of levels, sizes not one per
                image, an unknown mask_format or backend, or trace on the fused path.
        """
        mask_feats = outputs.mask_feats
        # Only 1x1 dynamic kernels (dynamic_conv_size = 1, every config): E values per cell.
        self._check_levels(outputs.kernel_preds, "kernel_preds", lambda s: mask_feats.shape[1])
        return self._run(
            prepare_cls_scores(outputs.cls_preds),
            lambda c: self._dynamic_masks(outputs.kernel_preds, mask_feats, c),
            lambda c: dynamic_source(self._kernels(outputs.kernel_preds, mask_feats, c),
                                     mask_feats, c.image),
            image_sizes, original_sizes, trace, mask_format)

    def _kernels(self, kernel_preds: Sequence[Tensor], mask_feats: Tensor,
                 candidates: Candidates) -> Tensor:
        """(K, E) the dynamic kernels of the candidates' cells."""
        kernels = mask_feats.new_empty((len(candidates.cell), mask_feats.shape[1]))  # (K, E)
        local = self._local_cells(candidates)
        for level, level_kernels in enumerate(kernel_preds):
            index = (candidates.level == level).nonzero().squeeze(1)
            flat = level_kernels.flatten(2)  # (N, E, S*S)
            kernels[index] = flat[candidates.image[index], :, local[index]]  # (K_l, E)
        return kernels

    def _dynamic_masks(self, kernel_preds: Sequence[Tensor], mask_feats: Tensor,
                       candidates: Candidates) -> Tensor:
        """(K, H4, W4) sigmoid(kernel . mask_feats) of the candidates' cells."""
        num = len(candidates.cell)
        kernels = self._kernels(kernel_preds, mask_feats, candidates)  # (K, E)
        soft = mask_feats.new_empty((num, *mask_feats.shape[-2:]))  # (K, H4, W4)
        counts = torch.bincount(candidates.image, minlength=mask_feats.shape[0]).tolist()
        start = 0
        for image, count in enumerate(counts):
            if count:
                weight = kernels[start:start + count, :, None, None]  # (K_b, E, 1, 1)
                logits = F.conv2d(mask_feats[image:image + 1], weight)  # (1, K_b, H4, W4)
                soft[start:start + count] = logits[0].sigmoid()
            start += count
        return soft


def build_postprocessor(cfg: ModelConfig, *, backend: str | None = None
                        ) -> SOLOPostProcessor | DecoupledSOLOPostProcessor | SOLOv2PostProcessor:
    """The post-processing of a model config's family, with its grids, strides and test_cfg.

    Args:
        cfg: The model config.
        backend: None (default): the fused path; ``"reference"``: the reference path; another
            backend name: the fused path with its ops on that backend (see ``_PostProcessor``).
    """
    head = cfg.head
    common = {"test_cfg": cfg.test, "num_grids": head.num_grids, "strides": head.strides,
              "backend": backend}
    if head.family == "solov2":
        return SOLOv2PostProcessor(**common, mask_stride=head.mask_stride)
    if head.family == "solo":
        return SOLOPostProcessor(**common)
    return DecoupledSOLOPostProcessor(**common)
