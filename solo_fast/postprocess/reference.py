"""The reference post-processing: mmdetection 3.3's ``SOLOHead._predict_by_feat_single`` (and its
Decoupled and SOLOv2 siblings) operation for operation, so its results are mmdetection's
(docs/algorithms.md §10). It is the oracle the fused path (:mod:`.fused`) is tested
against, as :mod:`solo_fast.ops.reference` is for the ops, and it records intermediate values for
tests (``trace``).

Two deliberate differences from mmdetection: matrix-NMS ties are ordered by input index
(:func:`~solo_fast.ops.reference.matrix_nms_reference`), and boxes are computed from the masks
(mmdetection returns zeros).
"""

# N=images, K=candidates of the batch, H4, W4=stride-4 mask map, H0, W0=original size

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from solo_fast.config import TestConfig
from solo_fast.ops.reference import matrix_nms_reference
from solo_fast.postprocess.common import (
    CandidateMasks,
    Candidates,
    Size,
    encode_rle,
    masks_to_boxes,
    resize_to_original,
)

__all__ = ["predict_reference"]


def predict_reference(masks: CandidateMasks, candidates: Candidates, *, test_cfg: TestConfig,
                      strides: Sequence[int], mask_stride: int, image_sizes: Size,
                      original_sizes: Size, mask_format: str,
                      trace: list | None) -> list[dict[str, Any]]:
    """Instances per image from every candidate's soft mask, image by image.

    Args:
        masks: The family's soft masks of ``candidates`` (all materialised:
            :meth:`CandidateMasks.reference_soft`).
        candidates: The batch's candidates (:func:`.common.select_candidates`).
        test_cfg, strides, mask_stride, image_sizes, original_sizes, mask_format: As
            :func:`.fused.predict_fused` takes them.
        trace: If a list, one dict of intermediate values per image is appended to it
            (``candidates``, ``maskness``, ``nms_input``, ``nms_output``).

    Returns:
        Per image, as :class:`.processor.PostProcessor` returns.
    """
    soft = masks.reference_soft()  # (K, H4, W4)
    canvas = (soft.shape[-2] * mask_stride, soft.shape[-1] * mask_stride)
    binary = soft > test_cfg.mask_thr  # (K, H4, W4)
    area = binary.sum((1, 2)).float()  # (K,)
    # The area is in mask-map pixels yet compared with the level's stride, as mmdetection does
    level_strides = torch.tensor(tuple(strides), dtype=area.dtype, device=area.device)
    passes = area > level_strides[candidates.level]
    counts = torch.bincount(candidates.image, minlength=len(image_sizes)).tolist()
    per_image = zip(soft.split(counts), binary.split(counts), area.split(counts),
                    passes.split(counts), *(t.split(counts) for t in candidates))

    results = []
    for image, (soft_b, binary_b, area_b, passes_b, _, cell_b, level_b, _, label_b, score_b) \
            in enumerate(per_image):
        kept_soft, kept_masks, kept_area = soft_b[passes_b], binary_b[passes_b], area_b[passes_b]
        maskness = (kept_soft * kept_masks).sum((1, 2)) / kept_area  # mean prob. in the mask
        labels, scores = label_b[passes_b], score_b[passes_b] * maskness
        nms_scores, nms_labels, _, keep = matrix_nms_reference(
            kept_masks, labels, scores, mask_area=kept_area, nms_pre=test_cfg.nms_pre,
            max_num=test_cfg.max_per_img, kernel=test_cfg.kernel, sigma=test_cfg.sigma,
            filter_thr=test_cfg.filter_thr)
        if trace is not None:
            trace.append({
                "candidates": {"cell_index": cell_b, "level": level_b, "label": label_b,
                               "cls_score": score_b, "mask_area": area_b,
                               "passes_area_filter": passes_b},
                "maskness": maskness,
                "nms_input": {"masks": kept_masks, "labels": labels, "scores": scores,
                              "mask_area": kept_area},
                "nms_output": {"scores": nms_scores, "labels": nms_labels, "keep_inds": keep}})
        final = resize_to_original(kept_soft[keep], canvas, image_sizes[image],
                                   original_sizes[image]) > test_cfg.mask_thr  # (k, H0, W0)
        results.append({"masks": encode_rle(final) if mask_format == "rle" else final,
                        "labels": nms_labels.long(), "scores": nms_scores.float(),
                        "boxes": masks_to_boxes(final)})
    return results
