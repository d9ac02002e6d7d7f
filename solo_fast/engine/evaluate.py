"""COCO instance segmentation and box AP of a model's predictions (pycocotools ``COCOeval``).

    evaluator = CocoEvaluator(coco_gt=dataset.coco,
                              label_to_category_id=dataset.label_to_category_id,
                              output_file="work_dirs/results.json")
    metrics = evaluate_model(model, build_eval_loader(dataset), evaluator, device="cuda")
    metrics["segm/AP"], metrics["bbox/AP50"]  # fractions in 0..1

The evaluator follows detectron2's three methods (``reset / process / evaluate``). ``process``
turns each mask into a compressed RLE at once, so what it keeps grows with the number of
instances, not with their pixels. As mmdetection's ``CocoMetric`` does, the segm evaluation gets
results without boxes: with a box, pycocotools takes the box area as the instance area and the
small/medium/large split would differ.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from solo_fast.engine.checkpoint import write_json_atomically
from solo_fast.postprocess import encode_rle

__all__ = ["METRIC_NAMES", "CocoEvaluator", "evaluate_model", "xyxy_to_xywh"]

# K=instances of an image, H0/W0=original image height/width

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
IOU_TYPES = ("segm", "bbox")


def xyxy_to_xywh(boxes: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(K, 4)`` xyxy boxes as COCO's ``[x, y, width, height]``, float64 numpy."""
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


class CocoEvaluator:
    """COCO segm and bbox AP of predictions against a pycocotools ground truth.

    Call :meth:`reset`, then :meth:`process` for each batch, then :meth:`evaluate`. Under
    ``torch.distributed`` every rank processes its own images and calls :meth:`evaluate`; the
    results are gathered to rank 0, which alone runs COCOeval, prints and writes the JSON.
    """

    def __init__(self, *, coco_gt: COCO, label_to_category_id: Sequence[Any],
                 iou_types: Sequence[str] = IOU_TYPES,
                 output_file: str | os.PathLike | None = None) -> None:
        """Sets up an empty evaluator.

        Args:
            coco_gt: The ground truth (e.g. ``CocoInstances.coco``).
            label_to_category_id: ``label_to_category_id[label]`` is the COCO category id of a
                contiguous model label (``CocoInstances.label_to_category_id``).
            iou_types: A subset of ``("segm", "bbox")``.
            output_file: Where :meth:`evaluate` writes the COCO-style results JSON (a list of
                ``{"image_id", "category_id", "segmentation", "bbox", "score"}``); None writes
                nothing.

        Raises:
            ValueError: an unknown or empty ``iou_types``.
        """
        iou_types = tuple(iou_types)
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, "
                             f"got {iou_types}")
        self.coco_gt = coco_gt
        self.label_to_category_id = list(label_to_category_id)
        self.iou_types = iou_types
        self.output_file = Path(output_file) if output_file is not None else None
        self._results: list[dict[str, Any]] = []
        self._image_ids: list[Any] = []

    def __repr__(self) -> str:
        return (f"CocoEvaluator(images={len(self.coco_gt.imgs)}, "
                f"classes={len(self.label_to_category_id)}, iou_types={self.iou_types}, "
                f"output_file={self.output_file})")

    def reset(self) -> None:
        """Forgets everything processed so far."""
        self._results = []
        self._image_ids = []

    def process(self, image_ids: Sequence[Any],
                predictions: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Encodes one batch's predictions and keeps only their compact form.

        Args:
            image_ids: COCO image id per image (``Batch.image_ids``).
            predictions: Per image ``{"masks": bool (K, H0, W0) or K COCO RLE dicts,
                "labels": int64 (K,), "scores": float (K,), "boxes": float (K, 4) xyxy}``
                (``model.predict``); an image with K = 0 counts as processed with no detections.

        Raises:
            ValueError: lengths that differ, or a label without a category id.
            KeyError: an image id that the ground truth lacks.
        """
        if len(image_ids) != len(predictions):
            raise ValueError(f"got {len(image_ids)} image ids but {len(predictions)} predictions")
        for image_id, prediction in zip(image_ids, predictions):
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"image id {image_id!r} is not in the ground truth")
            self._image_ids.append(image_id)
            self._results.extend(self._encode(image_id, prediction))

    def _encode(self, image_id: Any, prediction: Mapping[str, torch.Tensor]) -> list[dict]:
        labels = prediction["labels"].detach().cpu().tolist()
        if not labels:
            return []
        scores = prediction["scores"].detach().float().cpu().tolist()
        boxes = xyxy_to_xywh(prediction["boxes"]).tolist()
        masks = prediction["masks"]
        if "segm" not in self.iou_types:
            rles = None
        elif isinstance(masks, (list, tuple)):  # already COCO RLE (model.predict mask_format)
            if len(masks) != len(labels):
                raise ValueError(f"image {image_id}: {len(masks)} RLE masks for "
                                 f"{len(labels)} labels")
            rles = list(masks)
        else:
            rles = encode_rle(masks)
        results = []
        for k, label in enumerate(labels):
            if not 0 <= label < len(self.label_to_category_id):
                raise ValueError(f"label {label} has no category id (there are "
                                 f"{len(self.label_to_category_id)} classes)")
            result = {"image_id": image_id, "category_id": self.label_to_category_id[label],
                      "bbox": boxes[k], "score": scores[k]}
            if rles is not None:
                result["segmentation"] = rles[k]
            results.append(result)
        return results

    def evaluate(self) -> dict[str, float]:
        """Runs COCOeval on the processed images (on rank 0 under ``torch.distributed``).

        Prints an AP table, writes ``output_file`` if set (temp file + ``os.replace``, so a
        reader never sees half a file), and returns the metrics.

        Returns:
            ``{"segm/AP": ..., "segm/AP50": ..., ..., "bbox/APl": ...}`` as fractions in 0..1
            (each of :data:`METRIC_NAMES` per iou type). All zeros when nothing was detected;
            NaN for an area range that has no ground truth (COCOeval's -1). Ranks other than 0
            return ``{}``.
        """
        results, image_ids = self._gather()
        if results is None:
            return {}
        if self.output_file is not None:
            write_json_atomically(results, self.output_file)
        image_ids = sorted(set(image_ids), key=lambda i: (str(type(i)), i))
        metrics: dict[str, float] = {}
        for iou_type in self.iou_types:
            stats = self._coco_eval(iou_type, results, image_ids)
            metrics.update({f"{iou_type}/{name}": value
                            for name, value in zip(METRIC_NAMES, stats)})
        print(format_table(metrics, self.iou_types, num_images=len(image_ids),
                           num_detections=len(results)))
        return metrics

    def _gather(self) -> tuple[list[dict] | None, list[Any]]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self._results, self._image_ids
        rank = dist.get_rank()
        gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object((self._results, self._image_ids), gathered, dst=0)
        if rank != 0:
            return None, []
        return ([r for part, _ in gathered for r in part],
                [i for _, ids in gathered for i in ids])

    def _coco_eval(self, iou_type: str, results: list[dict],
                   image_ids: list[Any]) -> list[float]:
        if not results or not image_ids:
            return [0.0] * len(METRIC_NAMES)  # loadRes fails on an empty list
        # loadRes adds keys (area, id, ...) to each dict, so it gets fresh ones; segm without
        # boxes and bbox without masks (module docstring)
        drop = "bbox" if iou_type == "segm" else "segmentation"
        dets = [{k: v for k, v in r.items() if k != drop} for r in results]
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2
            coco_dt = self.coco_gt.loadRes(dets)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return [float(s) if s >= 0 else float("nan") for s in coco_eval.stats[:len(METRIC_NAMES)]]


def format_table(metrics: Mapping[str, float], iou_types: Iterable[str], *, num_images: int,
                 num_detections: int) -> str:
    """The AP table that :meth:`CocoEvaluator.evaluate` prints (fractions, 3 decimals)."""
    lines = [f"COCO evaluation: {num_images} images, {num_detections} detections",
             "type  " + "".join(f"{name:>8}" for name in METRIC_NAMES)]
    for iou_type in iou_types:
        values = "".join(f"{metrics[f'{iou_type}/{name}']:>8.3f}" for name in METRIC_NAMES)
        lines.append(f"{iou_type:<6}{values}")
    return "\n".join(lines)


def evaluate_model(model: torch.nn.Module, loader: Iterable[Any], evaluator: CocoEvaluator, *,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Predicts every batch of ``loader`` and evaluates the predictions.

    The model is put in eval mode under ``torch.no_grad`` and given back in the mode it came in.

    Args:
        model: A :class:`~solo_fast.models.detector.SOLODetector` (already on ``device``).
        loader: Yields :class:`~solo_fast.data.Batch` (``build_eval_loader``).
        evaluator: Reset here, then fed every batch.
        device: Where the images go.

    Returns:
        ``evaluator.evaluate()``.
    """
    was_training = model.training
    model.eval()
    evaluator.reset()
    try:
        with torch.no_grad():
            for batch in loader:
                outputs = model(batch.images.to(device, non_blocking=True))
                # RLE straight from the post-processing: full-size masks never pile up
                predictions = model.predict(outputs, batch.image_sizes, batch.original_sizes,
                                            mask_format="rle")
                evaluator.process(batch.image_ids, predictions)
    finally:
        model.train(was_training)
    return evaluator.evaluate()
