"""What the export graphs of every family share: batched candidates, maskness, matrix NMS, padded
outputs, in plain torch so that ``torch.onnx.export`` needs no translation of solo_fast's ops.

The steps are those of the reference post-processing (``solo_fast.postprocess.reference``,
mmdetection 3.3's ``SOLOHead._predict_by_feat_single``; docs/algorithms.md §10, §11), batched
over images with padding and validity masks instead of per-image lists:

1. class scores (sigmoid, points NMS) flattened to every (cell, class) pair of an image, cell-major
   then class: mmdetection's ``nonzero`` order;
2. the pairs above ``score_thr``: all of them (``cap=None``: as many columns as the image with the
   most candidates has, a count taken from the data) or the best ``cap`` by class score (a fixed
   width: exact while no image has more than ``cap``); then back to (cell, class) order;
3. the family's soft masks of those candidates (:class:`GraphMasks`), the small-mask filter
   (area > the level's stride) and maskness;
4. a stable sort by rescored score cut to ``nms_pre``, matrix NMS on each image's (padded)
   candidates with the upper triangle by index comparison (no ``Trilu``, which ONNX Runtime's CPU
   provider lacked for bool), ``filter_thr``, a second stable sort cut to ``max_per_img``;
5. outputs zero-padded to ``max_per_img`` rows, with the count of real rows.

Ties are ordered as the reference orders them: every sort here is stable (ONNX ``TopK`` orders
equal values by index), so equal scores keep (cell, class) order, then the first sort's order.
"""

# N=images, L=levels, S=grid side of a level, G=cells of all levels, C=classes, P=G*C pairs,
# Q=candidate columns (<= P), M=candidates into matrix NMS (<= nms_pre), K=max_per_img,
# H4, W4=the stride-4 mask map, HW=H4*W4

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from solo_fast.config import ModelConfig, TestConfig
from solo_fast.postprocess.common import boxes_from_hits, prepare_cls_scores

__all__ = [
    "Detections",
    "GraphMasks",
    "PostprocessGraph",
    "flatten_outputs",
    "mask_stride",
    "masked_matrix_nms",
    "output_names",
    "padded_candidates",
    "unflatten_outputs",
]

_INVALID = -1.0  # sort key of a padded or rejected entry: every real score is >= 0


class Detections(NamedTuple):
    """What the ``end2end`` and ``postprocess`` graphs return; rows past ``num_dets`` are zero.

    Attributes:
        num_dets: (N,) int64 detections per image, <= K.
        scores: (N, K) float32 decayed scores, descending.
        labels: (N, K) int64 classes.
        boxes: (N, K, 4) float32 xyxy boxes (x2, y2 exclusive) in pixels of the padded canvas: the
            tight box of the stride-4 binary mask (soft > mask_thr) times the mask stride, clipped
            to the resized image (``image_sizes``). Within a mask stride of the boxes of the
            final masks the eager path returns (which it computes at the original size).
        masks: (N, K, H4, W4) float32 soft masks at stride 4 of the padded canvas.
        num_candidates: (N,) int64 (cell, class) pairs above score_thr; more than the graph's
            candidate cap means candidates were dropped.
    """

    num_dets: Tensor
    scores: Tensor
    labels: Tensor
    boxes: Tensor
    masks: Tensor
    num_candidates: Tensor


class GraphMasks(abc.ABC):
    """How a family turns its head's raw outputs into candidates' soft masks, batched.

    A family sets ``output_type``, its head's output NamedTuple class (fields read by name).

    Args:
        num_grids: S_l per level.
    """

    output_type: type

    def __init__(self, *, num_grids: Sequence[int]) -> None:
        self.num_grids = tuple(int(s) for s in num_grids)

    def mask_size(self, outputs: Any) -> tuple[Any, Any]:
        """(H4, W4) of the stride-4 mask map of ``outputs``: by default that of level 0 of the
        outputs' first field (SOLO's mask_preds, Decoupled SOLO's mask_preds_x)."""
        level0 = outputs[0][0]  # (N, Q, H4, W4)
        return level0.shape[-2], level0.shape[-1]

    @abc.abstractmethod
    def soft(self, outputs: Any, level: Tensor, local: Tensor, cell: Tensor) -> Tensor:
        """(N, Q, H4, W4) soft masks of the candidates (level, cell index within the level, cell
        index over all levels; each (N, Q) int64, any value valid for padded columns)."""


def mask_stride(cfg: ModelConfig) -> int:
    """Stride of a family's level-0 mask map on the canvas (SOLO and Decoupled SOLO: 4)."""
    return cfg.head.mask_stride if cfg.head.family == "solov2" else 4


def flatten_outputs(outputs: Any) -> tuple[Tensor, ...]:
    """A head's output NamedTuple as one flat tuple: each field's tensors, level by level."""
    flat: list[Tensor] = []
    for value in outputs:
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return tuple(flat)


def output_names(output_type: type, num_levels: int) -> list[str]:
    """Names of :func:`flatten_outputs`'s tensors: ``<field>_<level>`` or ``<field>``."""
    names = []
    for field, kind in zip(output_type._fields, _field_kinds(output_type)):
        names += [f"{field}_{level}" for level in range(num_levels)] if kind == "levels" \
            else [field]
    return names


def unflatten_outputs(output_type: type, flat: Sequence[Tensor], num_levels: int) -> Any:
    """The inverse of :func:`flatten_outputs` for ``output_type``."""
    values, start = [], 0
    for kind in _field_kinds(output_type):
        if kind == "levels":
            values.append(list(flat[start:start + num_levels]))
            start += num_levels
        else:
            values.append(flat[start])
            start += 1
    if start != len(flat):
        raise ValueError(f"outputs must hold {start} tensors for {output_type.__name__} with "
                         f"{num_levels} levels, got {len(flat)}")
    return output_type(*values)


def _field_kinds(output_type: type) -> list[str]:
    # a field annotated as a list holds one tensor per level, a Tensor field one tensor
    hints = getattr(output_type, "__annotations__", {})
    return ["levels" if "list" in str(hints.get(f, "")) else "tensor"
            for f in output_type._fields]


def padded_candidates(flat: Tensor, score_thr: float,
                      cap: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The (cell, class) pairs of each image above ``score_thr``, in (cell, class) order.

    Args:
        flat: (N, P) class scores after points NMS, pair p = cell * C + class.
        score_thr: Pairs need score > score_thr (strict).
        cap: None: Q = the largest count of the batch (at least 1), so every candidate is kept;
            an int: Q = min(cap, P), the best ``cap`` of each image by score.

    Returns:
        ``(index, valid, count)``: (N, Q) int64 pair indices, ascending; (N, Q) bool, which
        columns are real candidates; (N,) int64 the number of pairs above the threshold.
    """
    above = flat > score_thr  # (N, P)
    count = above.sum(1)  # (N,)
    width = flat.shape[1]
    if cap is None:
        # a size taken from the data: torch.export makes it an unbacked symbol, bounded here
        columns = torch.clamp(count.max(), min=1).item()
        torch._check(columns >= 1)
        torch._check(columns <= width)
    else:
        columns = min(int(cap), width)
    key = torch.where(above, flat, _INVALID)  # (N, P)
    # Which of equal scores a top-k takes matters only at a cap that cuts real candidates
    # (inexact then anyway): with cap=None every real one is taken; so no stable sort of P here
    best = torch.topk(key, columns, dim=1).indices  # (N, Q)
    index = torch.sort(best, dim=1).values  # (N, Q): back to (cell, class) order
    return index, torch.gather(above, 1, index), count


def masked_matrix_nms(masks: Tensor, area: Tensor, labels: Tensor, scores: Tensor,
                      valid: Tensor, test_cfg: TestConfig) -> tuple[Tensor, Tensor]:
    """Decayed scores of each image's candidates (docs/algorithms.md §11), padding ignored.

    The candidates must already be in the reference's first-sort order (by score, descending,
    ties by candidate order): row i may suppress row j only when i < j.

    Args:
        masks: (N, M, HW) float32 binary masks (0 / 1).
        area: (N, M) float32 their areas.
        labels: (N, M) int64.
        scores: (N, M) float32.
        valid: (N, M) bool real candidates.
        test_cfg: kernel, sigma, filter_thr.

    Returns:
        ``(decayed, keep)``: (N, M) float32 decayed scores and (N, M) bool the real candidates
        at or above ``filter_thr`` (all real ones when filter_thr <= 0).
    """
    inter = masks @ masks.transpose(1, 2)  # (N, M, M) exact integers below 2^24
    union = area[:, :, None] + area[:, None, :] - inter
    order = torch.arange(masks.shape[1], device=masks.device)
    upper = order[:, None] < order[None, :]  # (M, M): i < j, without a Trilu node
    pair = upper & (labels[:, :, None] == labels[:, None, :]) \
        & valid[:, :, None] & valid[:, None, :]  # (N, M, M)
    iou = torch.where(pair, inter / torch.where(pair, union, 1.0), 0.0)  # d_ij
    # comp_i = max_k d_ki, how much candidate i is itself suppressed, broadcast over j
    compensate = iou.amax(1)[:, :, None]  # (N, M, 1)
    if test_cfg.kernel == "gaussian":
        decay = torch.exp(-1 * test_cfg.sigma * (iou**2)) \
            / torch.exp(-1 * test_cfg.sigma * (compensate**2))
    else:  # linear; 0/0 (identical masks) is 0, as in matrix_nms_reference
        numerator, denominator = 1 - iou, 1 - compensate
        decay = torch.where((numerator == 0) & (denominator == 0), 0.0,
                            numerator / denominator)
    decayed = scores * decay.amin(1)  # (N, M): min over i for each j
    keep = valid & (decayed >= test_cfg.filter_thr) if test_cfg.filter_thr > 0 else valid
    return decayed, keep


class PostprocessGraph(nn.Module):
    """Raw head outputs -> :class:`Detections`, batched: the ``postprocess`` graph.

    Args:
        cfg: The model config (grids, strides, num_classes, test_cfg).
        masks: The family's :class:`GraphMasks`.
        cap: Candidate columns per image: None: as many as the image with the most candidates
            has (exact always; a data-dependent size); an int: a fixed width, exact while no
            image has more candidates (``num_candidates`` tells).
    """

    def __init__(self, *, cfg: ModelConfig, masks: GraphMasks, cap: int | None = None) -> None:
        super().__init__()
        test = cfg.test
        if test.max_per_img <= 0:
            raise ValueError(f"test.max_per_img must be > 0 to export (the outputs have "
                             f"max_per_img rows), got {test.max_per_img}")
        if cap is not None and cap < 1:
            raise ValueError(f"cap must be None or >= 1, got {cap}")
        self.cfg = cfg
        self.family = masks
        self.cap = cap
        self.mask_stride = mask_stride(cfg)
        grids = cfg.head.num_grids
        cells = torch.tensor([s * s for s in grids])
        # constants of the graph, as buffers so that they follow .to(device)
        self.register_buffer("level_start", cells.cumsum(0) - cells, persistent=False)
        self.register_buffer("level_stride", torch.tensor(cfg.head.strides, dtype=torch.float32),
                             persistent=False)

    def forward(self, outputs: tuple[Tensor, ...], image_sizes: Tensor) -> Detections:
        """Detections of a batch.

        Args:
            outputs: The head's outputs flattened (:func:`flatten_outputs`).
            image_sizes: (N, 2) int64 (h, w) of each resized image inside the padded canvas.

        Returns:
            :class:`Detections`.
        """
        raw = unflatten_outputs(self.family.output_type, outputs, len(self.cfg.head.num_grids))
        return self.detect(raw, image_sizes)

    def detect(self, raw: Any, image_sizes: Tensor) -> Detections:
        """:meth:`forward` on the head's output NamedTuple."""
        test = self.cfg.test
        num = raw.cls_preds[0].shape[0]
        classes = raw.cls_preds[0].shape[1]
        flat = torch.cat([s.permute(0, 2, 3, 1).reshape(num, -1, classes)  # (N, S*S, C)
                          for s in prepare_cls_scores(raw.cls_preds)], 1).reshape(num, -1)  # (N, P)
        index, valid, num_candidates = padded_candidates(flat, test.score_thr, self.cap)
        score = torch.gather(flat, 1, index)  # (N, Q)
        cell, label = index // classes, index % classes
        level = (cell[:, :, None] >= self.level_start[1:]).sum(2)  # (N, Q)
        local = cell - self.level_start[level]

        soft = self.family.soft(raw, level, local, cell).flatten(2)  # (N, Q, HW)
        binary = soft > test.mask_thr
        area = binary.sum(2).float()  # (N, Q) exact
        # The area is in mask-map pixels yet compared with the level's stride, as mmdetection does
        passes = valid & (area > self.level_stride[level])
        maskness = (soft * binary).sum(2) / torch.where(passes, area, 1.0)
        rescored = torch.where(passes, score * maskness, _INVALID)  # (N, Q)

        # first sort: by rescored score, ties by candidate order, cut to nms_pre
        order = torch.sort(rescored, dim=1, descending=True, stable=True).indices  # (N, Q)
        if test.nms_pre > 0:
            order = order[:, :test.nms_pre]  # (N, M)
        nms_scores = torch.gather(rescored, 1, order)
        nms_valid = nms_scores >= 0
        rows = _rows(order, index.shape[1])  # (N, M) rows of the (N * Q, HW) flattening
        decayed, keep = masked_matrix_nms(
            binary.flatten(0, 1)[rows].float(), torch.gather(area, 1, order),
            torch.gather(label, 1, order), nms_scores, nms_valid, test)

        # second sort over the first sort's order, padded so that K columns always exist
        top = test.max_per_img
        pad = order.new_zeros((num, top))
        key = torch.cat([torch.where(keep, decayed, _INVALID), pad.float() + _INVALID], 1)
        final = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :top]  # (N, K)
        kept = torch.gather(key, 1, final) >= 0  # (N, K)
        chosen = torch.gather(torch.cat([order, pad], 1), 1, final)  # (N, K) into Q
        scores = torch.where(kept, torch.gather(key, 1, final), 0.0)
        labels = torch.where(kept, torch.gather(label, 1, chosen), 0)
        height, width = self.family.mask_size(raw)
        masks = torch.where(kept[:, :, None], soft.flatten(0, 1)[_rows(chosen, index.shape[1])],
                            0.0).reshape(num, top, height, width)  # (N, K, H4, W4)
        boxes = _boxes(masks, test.mask_thr, self.mask_stride, image_sizes)
        return Detections(kept.sum(1), scores, labels, boxes, masks, num_candidates)


def _rows(index: Tensor, width: Any) -> Tensor:
    """Rows of a (N * width, ...) flattening for per-image columns ``index`` (N, k): one Gather
    where a batched gather of whole masks would expand its index to every pixel."""
    return index + torch.arange(index.shape[0], device=index.device)[:, None] * width


def _boxes(masks: Tensor, threshold: float, stride: int, image_sizes: Tensor) -> Tensor:
    """(N, K, 4) float32 canvas boxes of ``masks > threshold`` (see :class:`Detections`)."""
    rows = masks.amax(3) > threshold  # (N, K, H4): row y holds a mask pixel
    cols = masks.amax(2) > threshold  # (N, K, W4)
    boxes = boxes_from_hits(rows, cols) * stride  # (N, K, 4), zeros for an empty mask
    limit = image_sizes.flip(1).repeat(1, 2).float()[:, None, :]  # (N, 1, 4): w, h, w, h
    return torch.minimum(boxes, limit)
