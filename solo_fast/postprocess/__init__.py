"""Post-processing of the SOLO family: raw head outputs -> instances per image.

Following one image from ``solo-fast predict`` to its instances, the files in order:

1. ``solo_fast/engine/predict.py`` (``predict_images``) loads, resizes, normalises and pads the
   images into a batch, runs ``model(images)`` (the raw per-level tensors) and
   ``model.predict(outputs, image_sizes, original_sizes)``, which hands them to
   ``model.postprocess``: the family's post-processor, built by :func:`build_postprocessor`
   (below) when the model was built (``solo_fast.build_model``).
2. ``processor.py``: :class:`PostProcessor.__call__ <.processor.PostProcessor>` checks the
   arguments, turns class logits into candidates, asks the family for its candidates' masks and
   runs the fused path (the default) or the reference path.
3. ``common.py``: class scores (sigmoid, :func:`points_nms`), :func:`select_candidates` (every
   (cell, class) pair above ``score_thr``, as :class:`Candidates`), and the interface of a family's
   masks, :class:`CandidateMasks`: score every candidate, give the soft masks of some.
4. ``solo.py`` / ``decoupled_solo.py`` / ``solov2.py``: the one thing a family does differently,
   its :class:`CandidateMasks` (which fused op scores its candidates, how a soft mask is formed).
5. ``fused.py``: :func:`predict_fused`: the scores of every candidate from one op call, the
   small-mask filter and maskness, the per-image ``nms_pre`` cut, matrix NMS for the batch
   (:func:`solo_fast.ops.batched_matrix_nms`), then the kept masks resized to the original size
   with their boxes (and COCO RLE), using ``common.py``'s :func:`resize_to_original`,
   :func:`boxes_of_thresholded` and :func:`encode_rle`.

``reference.py`` (:func:`predict_reference`) does step 5 the way mmdetection 3.3 does it, from
every candidate's soft mask: the oracle the fused path is tested against, selected with
``backend="reference"``. The algorithm, and where solo_fast differs from mmdetection, is in
docs/algorithms.md §10.

Imports run one way: ``common`` <- ``fused``, ``reference`` <- ``processor`` <- the families <-
this file.
"""

from __future__ import annotations

from solo_fast.config import ModelConfig
from solo_fast.postprocess.common import (
    MASK_FORMATS,
    CandidateMasks,
    Candidates,
    boxes_from_hits,
    boxes_of_thresholded,
    encode_rle,
    masks_to_boxes,
    points_nms,
    prepare_cls_scores,
    prepare_mask_probs,
    resize_to_original,
    select_candidates,
)
from solo_fast.postprocess.decoupled_solo import DecoupledMasks, DecoupledSOLOPostProcessor
from solo_fast.postprocess.fused import predict_fused
from solo_fast.postprocess.processor import PostProcessor
from solo_fast.postprocess.reference import predict_reference
from solo_fast.postprocess.solo import SOLOMasks, SOLOPostProcessor
from solo_fast.postprocess.solov2 import DynamicMasks, SOLOv2PostProcessor

__all__ = [
    "MASK_FORMATS",
    "CandidateMasks",
    "Candidates",
    "DecoupledMasks",
    "DecoupledSOLOPostProcessor",
    "DynamicMasks",
    "PostProcessor",
    "SOLOMasks",
    "SOLOPostProcessor",
    "SOLOv2PostProcessor",
    "boxes_from_hits",
    "boxes_of_thresholded",
    "build_postprocessor",
    "encode_rle",
    "masks_to_boxes",
    "points_nms",
    "predict_fused",
    "predict_reference",
    "prepare_cls_scores",
    "prepare_mask_probs",
    "resize_to_original",
    "select_candidates",
]


def build_postprocessor(cfg: ModelConfig, *, backend: str | None = None) -> PostProcessor:
    """The post-processing of a model config's family, with its grids, strides and test_cfg.

    Args:
        cfg: The model config.
        backend: None (default): the fused path; ``"reference"``: the reference path; another
            backend name: the fused path with its ops on that backend (see
            :class:`PostProcessor`).
    """
    head = cfg.head
    common = {"test_cfg": cfg.test, "num_grids": head.num_grids, "strides": head.strides,
              "backend": backend}
    if head.family == "solov2":
        return SOLOv2PostProcessor(**common, mask_stride=head.mask_stride)
    if head.family == "solo":
        return SOLOPostProcessor(**common)
    return DecoupledSOLOPostProcessor(**common)
