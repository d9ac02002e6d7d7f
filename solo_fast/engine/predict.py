"""Prediction on image files: load, resize and normalise as at test time, batch, predict.

    model = solo_fast.build_model("solov2_r50_fpn_1x_coco", num_classes=80)
    for path, prediction in predict_images(model, ["photos/"], test_scale=(1333, 800),
                                           device="cuda", batch_size=2, category_names=names):
        save_overlay(f"out/{path.stem}.png", load_image(path), prediction, names)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from solo_fast.data.images import load_image
from solo_fast.data.loaders import Sample, collate
from solo_fast.data.transforms import build_eval_transform
from solo_fast.engine.evaluate import xyxy_to_xywh
from solo_fast.postprocess import encode_rle

__all__ = ["IMAGE_EXTENSIONS", "expand_image_paths", "predict_images", "predictions_to_coco_json"]

# N=images in a batch, K=instances of an image, H0/W0=image height/width as loaded

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def expand_image_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and each folder's images (by extension, sorted, not recursive).

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without images.
    """
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"folder {path} has no images "
                                        f"({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image {path} not found")
    return files


def predict_images(model: torch.nn.Module, paths: Iterable[str | os.PathLike], *,
                   test_scale: tuple[int, int], device: str | torch.device = "cpu",
                   batch_size: int = 1, category_names: Sequence[str],
                   label_to_category_id: Sequence[Any] | None = None,
                   ) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Predicts instances on image files, a batch at a time.

    Paths are expanded and checked for existence when this is called, before any image is
    loaded; decoding errors surface when their batch is reached.

    Args:
        model: A :class:`~solo_fast.models.detector.SOLODetector` on ``device``; it is put in
            eval mode.
        paths: Image files and folders (a folder gives its ``.jpg/.jpeg/.png/.bmp`` files).
        test_scale: ``(long edge, short edge)`` of the keep-ratio resize (``train.test_scale``).
        device: Where the model runs.
        batch_size: Images per forward pass.
        category_names: ``category_names[label]``, for the ``"names"`` entry.
        label_to_category_id: When given, a ``"category_ids"`` entry is added.

    Yields:
        ``(path, prediction)`` in input order; ``prediction`` holds CPU tensors ``{"masks": bool
        (K, H0, W0), "labels": int64 (K,), "scores": float32 (K,), "boxes": float32 (K, 4) xyxy}``
        at the image's original size, plus ``"names"`` (K strings) and, optionally,
        ``"category_ids"`` (K ids).

    Raises:
        FileNotFoundError: a missing file or a folder without images (on the call).
        ValueError: ``batch_size < 1``; an undecodable image (when its batch is reached).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = expand_image_paths(paths)
    transform = build_eval_transform(scale=tuple(test_scale))
    return _predict(model, files, transform, device, batch_size, list(category_names),
                    None if label_to_category_id is None else list(label_to_category_id))


def _predict(model, files, transform, device, batch_size, names, category_ids):
    model.eval()
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        samples = []
        for path in chunk:
            image = load_image(path)
            original_size = (int(image.shape[1]), int(image.shape[2]))
            image, target = transform(image, {})
            samples.append(Sample(image=image, target=target, image_id=str(path),
                                  original_size=original_size))
        batch = collate(samples)
        with torch.no_grad():
            outputs = model(batch.images.to(device))
            predictions = model.predict(outputs, batch.image_sizes, batch.original_sizes)
        for path, prediction in zip(chunk, predictions):
            prediction = {k: v.detach().cpu() for k, v in prediction.items()}
            labels = prediction["labels"].tolist()
            prediction["names"] = [names[i] if 0 <= i < len(names) else str(i) for i in labels]
            if category_ids is not None:
                prediction["category_ids"] = [category_ids[i] for i in labels]
            yield path, prediction


def predictions_to_coco_json(results: Iterable[tuple[str | os.PathLike, Mapping[str, Any]]], *,
                             label_to_category_id: Sequence[Any] | None = None,
                             image_ids: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """COCO-style result dicts of :func:`predict_images` output, JSON-ready.

    Args:
        results: ``(path, prediction)`` pairs.
        label_to_category_id: Maps labels to COCO category ids; None writes the contiguous label.
        image_ids: Optional ``str(path) -> COCO image id``; matched images get ``"image_id"``,
            so the list can go to ``COCO.loadRes``.

    Returns:
        One dict per instance: ``{"file_name": str(path), "category_id", "segmentation":
        compressed RLE with str counts, "bbox": [x, y, w, h], "score"}``, plus ``"image_id"``
        where known.
    """
    records = []
    for path, prediction in results:
        labels = _as_list(prediction["labels"])
        if not labels:
            continue
        rles = encode_rle(prediction["masks"])
        boxes = xyxy_to_xywh(prediction["boxes"]).tolist()
        scores = [float(s) for s in _as_list(prediction["scores"])]
        for k, label in enumerate(labels):
            record = {"file_name": str(path),
                      "category_id": (label if label_to_category_id is None
                                      else label_to_category_id[label]),
                      "segmentation": rles[k], "bbox": boxes[k], "score": scores[k]}
            if image_ids is not None and str(path) in image_ids:
                record["image_id"] = image_ids[str(path)]
            records.append(record)
    return records


def _as_list(values: Any) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    return np.asarray(values).tolist()
