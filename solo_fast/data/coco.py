"""COCO-format instance segmentation data set, read through pycocotools.

What is kept, following mmdetection 3.3's ``CocoDataset.parse_data_info`` and ``LoadAnnotations``
(docs/algorithms.md §2.2):

* Images in annotation-file order (``COCO.getImgIds()``); each image's annotations in file order,
  which matters because SOLO's target assignment lets later instances overwrite earlier ones.
* Categories in annotation-file order (``COCO.getCatIds()``) become labels ``0..C-1``.
* An annotation is dropped when it has ``ignore: true``, when its box does not overlap the image,
  when ``area <= 0`` or the box is narrower or shorter than 1 px, and when it is a crowd
  (``iscrowd: 1``): mmdetection keeps crowds only as "ignored" instances, which SOLO never reads.
* Polygons with fewer than 3 points or an odd number of coordinates are dropped, as mmdetection
  drops them; so are polygons of zero area (they rasterise to nothing). Each case warns with the
  annotation id; an annotation left without polygons is skipped.
* Boxes are ``[x, y, x + w, y + h]`` of the annotation's ``bbox``, computed in float64 and stored as
  float32, as mmdetection does. Masks come from pycocotools at the image's size.
* Training only: images without usable instances are dropped (``filter_empty_gt``), and so are
  images with a side under ``min_size`` (32). mmdetection decides "empty" from the raw
  annotation list, so it would keep an image whose only annotations are crowds or degenerate;
  here such an image is dropped too (detectron2's rule). COCO train2017 has no such image: both
  rules keep 117,266 of its 118,287 images.

Images are decoded by :func:`solo_fast.data.images.load_image` (RGB, turned upright by their EXIF
orientation as mmdetection's OpenCV decoder does) and checked against the annotated ``height`` and
``width``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from solo_fast.data.images import load_image
from solo_fast.data.loaders import Sample

__all__ = [
    "CocoAnnotationWarning",
    "CocoFormatError",
    "CocoInstances",
    "ImageRecord",
    "InstanceRecord",
]

# M=instances of an image, H/W=image height/width as loaded

PathLike = str | os.PathLike


class CocoFormatError(ValueError):
    """An annotation file that cannot be used: malformed JSON, missing keys, unknown ids."""


class CocoAnnotationWarning(UserWarning):
    """An annotation that was skipped, or a part of one (a degenerate polygon)."""


@dataclass(frozen=True)
class InstanceRecord:
    """One usable (non-crowd) annotation, before its mask is decoded."""

    annotation_id: Any
    label: int  # contiguous 0..C-1
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    segmentation: Any  # polygons (list of lists) or an RLE dict, validated


@dataclass(frozen=True)
class ImageRecord:
    """One image of the annotation file and its usable instances."""

    image_id: Any
    path: Path
    height: int
    width: int
    instances: tuple[InstanceRecord, ...]


class CocoInstances(Dataset):
    """COCO instance segmentation images with masks, boxes and contiguous labels.

    ``dataset[i]`` is a :class:`Sample`. Random transforms draw from a generator seeded by
    ``(seed, epoch, i)``, so a sample does not depend on the worker that loads it; call
    :meth:`set_epoch` before each training epoch (``DataLoader`` workers copy the data set when an
    epoch's iterator is created, so do not use ``persistent_workers``).

    Attributes:
        label_to_category_id: ``label_to_category_id[label]`` is the COCO category id.
        category_id_to_label: The inverse mapping.
        category_names: ``category_names[label]``.
        records: One :class:`ImageRecord` per kept image, in dataset order.
    """

    def __init__(self, *, annotation_file: PathLike, image_dir: PathLike,
                 transform: Callable[..., Any] | None = None, train: bool, seed: int = 0,
                 filter_empty_gt: bool = True, min_size: int = 32) -> None:
        """Reads and validates the annotation file; images and masks are decoded on access.

        Args:
            annotation_file: COCO ``instances_*.json``.
            image_dir: Folder that the images' ``file_name`` entries are relative to.
            transform: ``transform(image, target, generator=g) -> (image, target)``, e.g.
                :func:`solo_fast.data.build_train_transform`; None returns the uint8 image and
                the target at the original size.
            train: Training drops images without usable instances and images with a side under
                ``min_size``; evaluation keeps every image. An evaluation file may lack the
                ``annotations`` key (test-dev image lists).
            seed: Seed of the per-sample transform generators.
            filter_empty_gt: Drop training images without usable instances.
            min_size: Drop training images whose shorter side is below this (pixels).

        Raises:
            FileNotFoundError: ``annotation_file`` or ``image_dir`` does not exist.
            CocoFormatError: unreadable or malformed JSON, missing keys, an annotation with an
                unknown category or image id, a malformed segmentation, or an empty data set.
        """
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.filter_empty_gt = filter_empty_gt
        self.min_size = min_size

        data = _read_json(self.annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} (for {self.annotation_file}) "
                                    f"not found")
        self._coco: COCO | None = None  # built on first use of .coco
        categories = _check_list(data, "categories", self.annotation_file)
        for index, category in enumerate(categories):
            _check_keys(category, ("id", "name"), f"categories[{index}]", self.annotation_file)
        self.label_to_category_id: list[Any] = [c["id"] for c in categories]
        self.category_names: list[str] = [str(c["name"]) for c in categories]
        self.category_id_to_label: dict[Any, int] = {
            cat_id: label for label, cat_id in enumerate(self.label_to_category_id)}
        if len(self.category_id_to_label) != len(categories):
            raise CocoFormatError(f"{self.annotation_file}: duplicate category ids in "
                                  f"{self.label_to_category_id}")

        images = _check_list(data, "images", self.annotation_file)
        if "annotations" in data or train:
            annotations = _check_list(data, "annotations", self.annotation_file)
        else:
            annotations = []
        all_records = self._parse(images, annotations)
        if not all_records:
            raise CocoFormatError(f"{self.annotation_file}: the data set has no images")
        if train:
            kept = [r for r in all_records
                    if (r.instances or not filter_empty_gt) and min(r.height, r.width) >= min_size]
            if not kept:
                raise CocoFormatError(
                    f"{self.annotation_file}: no usable training images: all {len(all_records)} "
                    f"images lack usable (non-crowd, non-degenerate) annotations or have a side "
                    f"under {min_size} px")
            all_records = kept
        self.records: list[ImageRecord] = all_records

    # ------------------------------------------------------------------------------- parsing

    def _parse(self, images: list, annotations: list) -> list[ImageRecord]:
        file = self.annotation_file
        image_info: dict[Any, dict] = {}
        for index, image in enumerate(images):
            _check_keys(image, ("id", "file_name", "height", "width"), f"images[{index}]", file)
            image_info[image["id"]] = image
        per_image: dict[Any, list[InstanceRecord]] = {image_id: [] for image_id in image_info}
        for index, ann in enumerate(annotations):
            _check_keys(ann, ("id", "image_id", "category_id", "bbox"), f"annotations[{index}]",
                        file)
            if ann["category_id"] not in self.category_id_to_label:
                raise CocoFormatError(
                    f"{file}: annotation {ann['id']!r} has category_id {ann['category_id']!r}, "
                    f"which is not among the categories {self.label_to_category_id}")
            if ann["image_id"] not in image_info:
                raise CocoFormatError(f"{file}: annotation {ann['id']!r} refers to image_id "
                                      f"{ann['image_id']!r}, which is not among the images")
            record = self._parse_annotation(ann, image_info[ann["image_id"]])
            if record is not None:
                per_image[ann["image_id"]].append(record)
        return [ImageRecord(image_id=image_id, path=self.image_dir / info["file_name"],
                            height=int(info["height"]), width=int(info["width"]),
                            instances=tuple(per_image[image_id]))
                for image_id, info in image_info.items()]

    def _parse_annotation(self, ann: Mapping, image: Mapping) -> InstanceRecord | None:
        file, ann_id = self.annotation_file, ann["id"]
        bbox = ann["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise CocoFormatError(f"{file}: annotation {ann_id!r} has bbox {bbox!r}; expected "
                                  f"[x, y, width, height]")
        if ann.get("ignore", False) or ann.get("iscrowd", 0):
            return None
        # mmdetection's CocoDataset.parse_data_info filters, in its order
        x1, y1, w, h = (float(v) for v in bbox)
        inter_w = max(0.0, min(x1 + w, float(image["width"])) - max(x1, 0.0))
        inter_h = max(0.0, min(y1 + h, float(image["height"])) - max(y1, 0.0))
        if inter_w * inter_h == 0:
            return None
        if "area" not in ann:
            raise CocoFormatError(f"{file}: annotation {ann_id!r} has no 'area'")
        if ann["area"] <= 0 or w < 1 or h < 1:
            return None
        if "segmentation" not in ann:
            raise CocoFormatError(f"{file}: annotation {ann_id!r} has no 'segmentation'")
        segmentation = self._check_segmentation(ann["segmentation"], ann_id, image)
        if segmentation is None:
            return None
        box = tuple(float(np.float32(v)) for v in (x1, y1, x1 + w, y1 + h))
        return InstanceRecord(annotation_id=ann_id, label=self.category_id_to_label[
            ann["category_id"]], box=box, segmentation=segmentation)

    def _check_segmentation(self, seg: Any, ann_id: Any, image: Mapping) -> Any:
        file = self.annotation_file
        if isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                raise CocoFormatError(f"{file}: annotation {ann_id!r}: an RLE segmentation needs "
                                      f"'counts' and 'size', got keys {sorted(seg)}")
            if list(seg["size"]) != [int(image["height"]), int(image["width"])]:
                raise CocoFormatError(
                    f"{file}: annotation {ann_id!r}: RLE size {list(seg['size'])} differs from "
                    f"image {image['id']!r}'s [height, width] "
                    f"[{image['height']}, {image['width']}]")
            if not isinstance(seg["counts"], (list, str, bytes)):
                raise CocoFormatError(f"{file}: annotation {ann_id!r}: RLE 'counts' must be a "
                                      f"list or a string, got {type(seg['counts']).__name__}")
            return seg
        if not isinstance(seg, list):
            raise CocoFormatError(f"{file}: annotation {ann_id!r}: segmentation must be a list "
                                  f"of polygons or an RLE dict, got {type(seg).__name__}")
        polygons = []
        for k, poly in enumerate(seg):
            if not isinstance(poly, (list, tuple)):
                raise CocoFormatError(f"{file}: annotation {ann_id!r}: polygon {k} is not a list")
            if len(poly) % 2 or len(poly) < 6:
                warnings.warn(f"{file}: annotation {ann_id!r}: polygon {k} has {len(poly)} "
                              f"coordinates (needs an even number, at least 6 = 3 points); "
                              f"polygon skipped", CocoAnnotationWarning, stacklevel=5)
                continue
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)  # (points, 2)
            area = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], -1))
                             - np.dot(xy[:, 1], np.roll(xy[:, 0], -1)))
            if area == 0:
                warnings.warn(f"{file}: annotation {ann_id!r}: polygon {k} has zero area; "
                              f"polygon skipped", CocoAnnotationWarning, stacklevel=5)
                continue
            polygons.append([float(v) for v in poly])
        if not polygons:
            warnings.warn(f"{file}: annotation {ann_id!r} has no valid polygon; annotation "
                          f"skipped", CocoAnnotationWarning, stacklevel=5)
            return None
        return polygons

    # ------------------------------------------------------------------------------ access

    @property
    def num_classes(self) -> int:
        """The number of categories C."""
        return len(self.label_to_category_id)

    @property
    def image_ids(self) -> list[Any]:
        """COCO image ids in dataset order."""
        return [r.image_id for r in self.records]

    @property
    def original_sizes(self) -> list[tuple[int, int]]:
        """Annotated ``(height, width)`` of every image in dataset order."""
        return [(r.height, r.width) for r in self.records]

    @property
    def coco(self) -> COCO:
        """A pycocotools ``COCO`` of the whole annotation file (for COCOeval)."""
        if self._coco is None:
            coco = COCO()
            coco.dataset = _read_json(self.annotation_file)
            with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
                coco.createIndex()
            self._coco = coco
        return self._coco

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's stream of random transform draws."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict:
        # DataLoader workers do not need the COCO index
        state = self.__dict__.copy()
        state["_coco"] = None
        return state

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        """Loads image ``index``, decodes its masks and applies the transform.

        Args:
            index: Position in the data set (not the COCO image id).

        Returns:
            A :class:`Sample`; the target has ``masks`` bool ``(M, h, w)``, ``boxes`` float32
            ``(M, 4)`` xyxy in the transformed image's pixels and ``labels`` int64 ``(M,)``.

        Raises:
            FileNotFoundError: the image file is missing.
            CocoFormatError: the image cannot be decoded or its size differs from the annotation.
        """
        record = self.records[index]
        image = self._load_image(record)
        target = self._load_target(record)
        if self.transform is not None:
            generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index))
            image, target = self.transform(image, target, generator=generator)
        return Sample(image=image, target=target, image_id=record.image_id,
                      original_size=(record.height, record.width))

    def _load_image(self, record: ImageRecord) -> torch.Tensor:
        where = f"image {record.image_id!r} of {self.annotation_file}"
        try:
            image = load_image(record.path)  # (3, H, W) uint8
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{where}: {error}") from error
        except ValueError as error:
            raise CocoFormatError(f"{where}: {error}") from error
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise CocoFormatError(
                f"{where}: {record.path} is {image.shape[1]}x{image.shape[2]} (h x w) but "
                f"annotated as {record.height}x{record.width}")
        return image

    def _load_target(self, record: ImageRecord) -> dict[str, torch.Tensor]:
        h, w = record.height, record.width
        masks = np.zeros((len(record.instances), h, w), dtype=bool)  # (M, H, W)
        for m, inst in enumerate(record.instances):
            masks[m] = _decode(inst.segmentation, h, w)
        boxes = torch.tensor([inst.box for inst in record.instances],
                             dtype=torch.float32).reshape(-1, 4)  # (M, 4)
        labels = torch.tensor([inst.label for inst in record.instances],
                              dtype=torch.int64)  # (M,)
        return {"masks": torch.from_numpy(masks), "boxes": boxes, "labels": labels}


def _decode(seg: Any, h: int, w: int) -> np.ndarray:
    # mmdetection's LoadAnnotations._poly2mask
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)  # uncompressed RLE
    else:
        rle = seg
    with warnings.catch_warnings():
        # pycocotools 2.0.x's decode trips numpy 2's __array__(copy=...) deprecation every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)  # (H, W)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"annotation file {path} is not valid JSON: {error}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"annotation file {path} cannot be read: {error}") from error
    if not isinstance(data, dict):
        raise CocoFormatError(f"annotation file {path} must hold a JSON object with 'images', "
                              f"'annotations' and 'categories', got a {type(data).__name__}")
    return data


def _check_list(data: dict, key: str, file: Path) -> list:
    if key not in data:
        raise CocoFormatError(f"annotation file {file} has no {key!r} key "
                              f"(found: {sorted(data)})")
    if not isinstance(data[key], list):
        raise CocoFormatError(f"annotation file {file}: {key!r} must be a list, "
                              f"got {type(data[key]).__name__}")
    return data[key]


def _check_keys(entry: Any, keys: tuple[str, ...], where: str, file: Path) -> None:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"annotation file {file}: {where} must be an object, "
                              f"got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        ident = f" (id {entry['id']!r})" if "id" in entry else ""
        raise CocoFormatError(f"annotation file {file}: {where}{ident} lacks {missing}")
