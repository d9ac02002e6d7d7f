"""The post-processor every family shares: checks, candidates, and the choice of path.

A family (:mod:`.solo`, :mod:`.decoupled_solo`, :mod:`.solov2`) subclasses
:class:`PostProcessor` and supplies only how its candidates' soft masks are computed (a
:class:`~.common.CandidateMasks`); everything else, and the one contract of ``__call__``, is here.
"""

# N=images, L=levels, S=grid side of a level, C=classes, K=candidates, H0, W0=original size

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from solo_fast.config import TestConfig
from solo_fast.ops import BACKENDS
from solo_fast.postprocess.common import (
    MASK_FORMATS,
    CandidateMasks,
    Candidates,
    Size,
    prepare_cls_scores,
    select_candidates,
)
from solo_fast.postprocess.fused import predict_fused
from solo_fast.postprocess.reference import predict_reference

__all__ = ["PostProcessor"]


class PostProcessor:
    """Raw head outputs -> instances per image; the base of the three families' post-processors.

    Args:
        test_cfg: Inference thresholds and matrix-NMS settings.
        num_grids: Grid side S_l per level.
        strides: Per-level stride of the small-mask filter (area > stride, in stride-4 pixels).
        mask_stride: Stride of the level-0 mask map (SOLOv2: of the mask features); the padded
            canvas is mask_stride x its size.
        backend: ``"reference"``: the reference path (:mod:`.reference`, mmdetection's order of
            operations, every candidate's soft mask materialised). None (default): the fused path
            (:mod:`.fused`), its ops on their default backend. ``"cpu"``, ``"cuda"``,
            ``"triton"``: the fused path, its ops on that backend. An attribute: set
            ``processor.backend`` (e.g. ``model.postprocess.backend``) to switch later.
    """

    def __init__(self, *, test_cfg: TestConfig, num_grids: Sequence[int],
                 strides: Sequence[int], mask_stride: int = 4, backend: str | None = None) -> None:
        if len(num_grids) != len(strides):
            raise ValueError(f"num_grids and strides need one entry per level, got "
                             f"{len(num_grids)} and {len(strides)}")
        _check_backend(backend)
        self.backend = backend
        self.test_cfg = test_cfg
        self.num_grids = tuple(int(s) for s in num_grids)
        self.strides = tuple(int(s) for s in strides)
        self.mask_stride = int(mask_stride)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(test_cfg={self.test_cfg!r}, num_grids={self.num_grids}, "
                f"strides={self.strides}, mask_stride={self.mask_stride}, "
                f"backend={self.backend!r})")

    def __call__(self, outputs: Any, image_sizes: Size, original_sizes: Size, *,
                 mask_format: str = "bool", trace: list | None = None) -> list[dict[str, Any]]:
        """Instances per image from the raw outputs of the family's head.

        Args:
            outputs: The head's output NamedTuple, read by attribute: ``cls_preds``, L tensors
                (N, C, S_l, S_l) of class logits, and the family's mask outputs (its
                :meth:`candidate_masks` says which).
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
        self._check_call(outputs.cls_preds, image_sizes, original_sizes, mask_format, trace)
        candidates = select_candidates(prepare_cls_scores(outputs.cls_preds), self.num_grids,
                                       self.test_cfg.score_thr)
        return self._predict(self.candidate_masks(outputs, candidates), candidates,
                             image_sizes, original_sizes, mask_format, trace)

    def process_prepared(self, *, cls_scores: Sequence[Tensor], image_sizes: Size,
                         original_sizes: Size, mask_format: str = "bool",
                         trace: list | None = None, **mask_probs: Sequence[Tensor]
                         ) -> list[dict[str, Any]]:
        """Instances from eval-mode-prepared tensors, e.g. mmdetection's eval-mode outputs of
        SOLO (``mask_probs``) or Decoupled SOLO (``mask_probs_x``, ``mask_probs_y``).

        Args:
            cls_scores: L tensors (N, C, S_l, S_l): :func:`~.common.prepare_cls_scores`.
            image_sizes, original_sizes, mask_format, trace: As for ``__call__``.
            **mask_probs: The family's mask probabilities by name, L tensors each
                (:func:`~.common.prepare_mask_probs` of each level; see
                :meth:`prepared_masks`). Only the candidates' channels are read.

        Returns:
            As ``__call__``.
        """
        self._check_call(cls_scores, image_sizes, original_sizes, mask_format, trace)
        candidates = select_candidates(cls_scores, self.num_grids, self.test_cfg.score_thr)
        return self._predict(self.prepared_masks(candidates, **mask_probs), candidates,
                             image_sizes, original_sizes, mask_format, trace)

    def candidate_masks(self, outputs: Any, candidates: Candidates) -> CandidateMasks:
        """The family's soft masks of ``candidates`` from its head's raw outputs."""
        raise NotImplementedError

    def prepared_masks(self, candidates: Candidates,
                       **mask_probs: Sequence[Tensor]) -> CandidateMasks:
        """The family's soft masks of ``candidates`` from eval-mode-prepared probabilities."""
        raise TypeError(f"{type(self).__name__} has no eval-mode-prepared form: its eval-mode "
                        f"outputs are its raw outputs, so call the post-processor itself")

    def _check_call(self, cls_scores: Sequence[Tensor], image_sizes: Size, original_sizes: Size,
                    mask_format: str, trace: list | None) -> None:
        batch = cls_scores[0].shape[0] if len(cls_scores) else 0
        if len(image_sizes) != batch or len(original_sizes) != batch:
            raise ValueError(f"image_sizes and original_sizes need one (h, w) per image of the "
                             f"batch ({batch}), got {len(image_sizes)} and {len(original_sizes)}")
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        _check_backend(self.backend)
        if trace is not None and self.backend != "reference":
            raise ValueError("trace records the reference path's intermediate values: "
                             "use backend='reference' with trace")

    def _predict(self, masks: CandidateMasks, candidates: Candidates, image_sizes: Size,
                 original_sizes: Size, mask_format: str,
                 trace: list | None) -> list[dict[str, Any]]:
        settings = {"test_cfg": self.test_cfg, "strides": self.strides,
                    "mask_stride": self.mask_stride, "image_sizes": image_sizes,
                    "original_sizes": original_sizes, "mask_format": mask_format}
        if self.backend == "reference":
            return predict_reference(masks, candidates, **settings, trace=trace)
        return predict_fused(masks, candidates, **settings, backend=self.backend)


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, "
                         f"got {backend!r}")
