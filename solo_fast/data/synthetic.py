"""The embedded default data set: textured shapes in COCO format, generated on demand.

``make_shapes(root)`` writes::

    root/train/000001.jpg ...              root/val/000001.jpg ...
    root/annotations/instances_train.json  root/annotations/instances_val.json
    root/manifest.json                     (the arguments, so a second call can reuse the files)

Five classes with deliberately non-contiguous COCO ids: circle (1), triangle (3), rectangle (7),
ring (8) and star (12). By default objects and background get random textures (stripes, gradients,
noise, checkerboards) so that the class can only be told from the shape; ``object_style="flat"``
(with ``class_colours=True``, the demo's set) draws each object in one colour on the same textured
backgrounds, an easier set that a CPU learns in minutes. Objects are drawn from large to
small, later over earlier: each annotation is the *visible* part of its object, and an object left
with under a quarter of its pixels (or under 20 pixels) visible is removed from the picture
altogether, so no unannotated fragment stays behind. Unoccluded polygonal objects are annotated
with their polygon, everything else (rings, which have a hole, and occluded objects) with a
compressed RLE; both decode through pycocotools to exactly the drawn pixels.

Object sizes, sqrt(mask area), are log-uniform from 10 px to 0.85 x the image's shorter side by
default. After the default (1333, 800) resize (a factor of about 3-4 for 192-320 px images) box
scales run from about 30 px to over 700 px, so every FPN level's scale range in
docs/algorithms.md §13.1 gets instances (the demo's 20 px to 0.7 x still does: about 60 px to 900
px). Everything is drawn from ``numpy.random.default_rng((seed, split, index))``: the same arguments
give byte-identical annotation files and images.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

__all__ = ["OBJECT_STYLES", "SHAPES_CATEGORIES", "ShapesPaths", "make_shapes"]

# H/W=image height/width, P=pixels of one texture region, K=objects of an image

SHAPES_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "rectangle", "supercategory": "shape"},
    {"id": 8, "name": "ring", "supercategory": "shape"},
    {"id": 12, "name": "star", "supercategory": "shape"},
)
_SPLITS = ("train", "val")
OBJECT_STYLES = ("textured", "flat")
# The class colours of class_colours=True, jittered by up to +-30 per channel per object.
_CLASS_COLOURS = {1: (220, 60, 60), 3: (60, 200, 60), 7: (60, 90, 230), 8: (230, 200, 40),
                  12: (200, 60, 220)}
_MIN_VISIBLE_FRACTION = 0.25
_MIN_VISIBLE_PIXELS = 20


class ShapesPaths(NamedTuple):
    """Where :func:`make_shapes` put the data set."""

    root: Path
    train_images: Path
    val_images: Path
    train_annotations: Path
    val_annotations: Path


def make_shapes(root: str | os.PathLike, *, num_train: int = 200, num_val: int = 50,
                image_size: tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = (
                    (192, 320), (192, 320)),
                max_objects: int = 8, empty_prob: float = 0.02, image_format: str = "jpg",
                object_style: str = "textured", class_colours: bool = False,
                min_object_size: float = 10.0, max_object_fraction: float = 0.85,
                seed: int = 0, overwrite: bool = False) -> ShapesPaths:
    """Writes the textured-shapes data set under ``root`` (or reuses it).

    Args:
        root: Output folder (created).
        num_train: Training images.
        num_val: Validation images.
        image_size: ``(h, w)`` for a fixed size, or ``((h_min, h_max), (w_min, w_max))``, both
            inclusive, for sizes drawn per image (the default mixes portrait and landscape).
        max_objects: Objects drawn per image, 1..max_objects before occlusion removes some.
        empty_prob: Probability that an image has no object at all (exercises the filtering of
            empty training images).
        image_format: ``"jpg"`` (quality 95; COCO's format, 3x smaller and faster to write) or
            ``"png"`` (lossless).
        object_style: ``"textured"``: objects get random textures like the background, so that
            only the outline tells an object from what is behind it; ``"flat"``: one colour per
            object with mild noise (an easier set, which the CPU demo learns in minutes).
        class_colours: With ``"flat"``, each class has its own colour (jittered per object), so
            colour tells the class as well as shape; otherwise colours are random.
        min_object_size, max_object_fraction: Object sizes, sqrt(mask area) before occlusion,
            are log-uniform from ``min_object_size`` pixels to ``max_object_fraction`` x the
            image's shorter side.
        seed: Everything random derives from it.
        overwrite: Regenerate even when ``root/manifest.json`` records the same arguments and
            the files are present.

    Returns:
        The paths of the image folders and annotation files.

    Raises:
        ValueError: a bad argument.
    """
    sizes = _size_ranges(image_size)
    if min(sizes[0][0], sizes[1][0]) < 32:
        raise ValueError(f"image sides must be >= 32 px, got image_size {image_size}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if num_train < 0 or num_val < 0 or max_objects < 1:
        raise ValueError("num_train and num_val must be >= 0 and max_objects >= 1")
    if object_style not in OBJECT_STYLES:
        raise ValueError(f"object_style must be one of {OBJECT_STYLES}, got {object_style!r}")
    if class_colours and object_style != "flat":
        raise ValueError("class_colours=True needs object_style='flat' (textured objects have "
                         "random colours)")
    shortest = min(sizes[0][0], sizes[1][0])
    if not 0 < max_object_fraction <= 1 or not 1 <= min_object_size <= max_object_fraction * \
            shortest:
        raise ValueError(f"object sizes must satisfy 1 <= min_object_size <= max_object_fraction"
                         f" x shorter side ({shortest} px) and 0 < max_object_fraction <= 1, got "
                         f"min_object_size={min_object_size}, "
                         f"max_object_fraction={max_object_fraction}")
    style = _Style(object_style=object_style, class_colours=bool(class_colours),
                   min_size=float(min_object_size), max_fraction=float(max_object_fraction))
    root = Path(root)
    paths = ShapesPaths(root=root, train_images=root / "train", val_images=root / "val",
                        train_annotations=root / "annotations" / "instances_train.json",
                        val_annotations=root / "annotations" / "instances_val.json")
    manifest = {"generator": "solo_fast.data.synthetic.make_shapes/1", "num_train": num_train,
                "num_val": num_val, "image_size": [list(s) for s in sizes],
                "max_objects": max_objects, "empty_prob": empty_prob,
                "image_format": image_format, "seed": seed, **style._asdict()}
    if not overwrite and _is_complete(paths, manifest):
        return paths

    paths.root.mkdir(parents=True, exist_ok=True)
    paths.train_annotations.parent.mkdir(parents=True, exist_ok=True)
    counts = {"train": num_train, "val": num_val}
    folders = {"train": paths.train_images, "val": paths.val_images}
    files = {"train": paths.train_annotations, "val": paths.val_annotations}
    for split_index, split in enumerate(_SPLITS):
        folders[split].mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(counts[split]):
            rng = np.random.default_rng((seed, split_index, index))
            h = int(rng.integers(sizes[0][0], sizes[0][1] + 1))
            w = int(rng.integers(sizes[1][0], sizes[1][1] + 1))
            num_objects = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
            pixels, objects = _render(rng, h, w, num_objects, style)
            image_id = index + 1
            file_name = f"{image_id:06d}.{image_format}"
            _save(pixels, folders[split] / file_name, image_format)
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
        data = {"info": {"description": "solo_fast synthetic textured shapes", "version": "1",
                         "seed": seed},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": [dict(c) for c in SHAPES_CATEGORIES]}
        files[split].write_text(json.dumps(data, separators=(",", ":")))
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return paths


class _Style(NamedTuple):
    """How objects are drawn (the make_shapes arguments of the same meaning)."""

    object_style: str
    class_colours: bool
    min_size: float
    max_fraction: float


def _size_ranges(image_size: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    h, w = image_size
    if isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer)):
        return (int(h), int(h)), (int(w), int(w))
    (h_lo, h_hi), (w_lo, w_hi) = h, w
    if h_lo > h_hi or w_lo > w_hi:
        raise ValueError(f"image_size ranges must be (min, max), got {image_size}")
    return (int(h_lo), int(h_hi)), (int(w_lo), int(w_hi))


def _is_complete(paths: ShapesPaths, manifest: dict) -> bool:
    file = paths.root / "manifest.json"
    if not (file.is_file() and paths.train_annotations.is_file()
            and paths.val_annotations.is_file()):
        return False
    try:
        if json.loads(file.read_text()) != manifest:
            return False
        for split_file, folder in ((paths.train_annotations, paths.train_images),
                                   (paths.val_annotations, paths.val_images)):
            images = json.loads(split_file.read_text())["images"]
            if not all((folder / image["file_name"]).is_file() for image in images):
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def _save(pixels: np.ndarray, path: Path, image_format: str) -> None:
    image = Image.fromarray(pixels, mode="RGB")
    if image_format == "png":
        image.save(path, format="PNG", compress_level=1)
    else:
        image.save(path, format="JPEG", quality=95)


# ----------------------------------------------------------------------------------- drawing


def _render(rng: np.random.Generator, h: int, w: int, num_objects: int,
            style: _Style) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One picture and its annotations (without ids)."""
    shapes = [_draw_shape(rng, h, w, style) for _ in range(num_objects)]
    # big objects first, so that small ones land on top and stay visible
    shapes.sort(key=lambda s: -s["area"])
    kept = [s for s in shapes if s["area"] >= _MIN_VISIBLE_PIXELS]
    while True:
        owner = np.full((h, w), -1, dtype=np.int64)  # (H, W) index into kept, -1 = background
        for k, shape in enumerate(kept):
            owner[shape["mask"]] = k
        visible = np.bincount(owner.ravel() + 1, minlength=len(kept) + 1)[1:]  # (K,)
        keep = [visible[k] >= max(_MIN_VISIBLE_FRACTION * s["area"], _MIN_VISIBLE_PIXELS)
                for k, s in enumerate(kept)]
        if all(keep):
            break
        kept = [s for s, flag in zip(kept, keep) if flag]

    ys, xs = np.indices((h, w), dtype=np.float32)  # (H, W) each
    pixels = np.empty((h, w, 3), dtype=np.float32)
    region = owner < 0
    pixels[region] = _texture(rng, ys[region], xs[region], h, w)
    annotations = []
    for k, shape in enumerate(kept):
        region = owner == k
        if style.object_style == "textured":
            pixels[region] = _texture(rng, ys[region], xs[region], h, w)
        else:
            pixels[region] = _flat_colour(rng, int(region.sum()), shape["category_id"],
                                          style.class_colours)
        annotations.append(_annotate(shape, region))
    pixels += 3.0 * rng.standard_normal(size=pixels.shape, dtype=np.float32)  # sensor noise
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8), annotations


def _annotate(shape: dict[str, Any], visible: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    if shape["polygon"] is not None and np.array_equal(visible, shape["mask"]):
        segmentation: Any = [shape["polygon"]]
    else:
        segmentation = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
    return {"category_id": shape["category_id"], "segmentation": segmentation,
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0}


def _draw_shape(rng: np.random.Generator, h: int, w: int, style: _Style) -> dict[str, Any]:
    """A random shape: class, polygon(s) placed inside the image, and its full mask."""
    category = SHAPES_CATEGORIES[int(rng.integers(len(SHAPES_CATEGORIES)))]
    name = category["name"]
    side = math.exp(rng.uniform(math.log(style.min_size),
                                math.log(style.max_fraction * min(h, w))))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    hole = None
    if name == "circle":
        outline = _regular(48, side / math.sqrt(math.pi), angle)
    elif name == "ring":
        ratio = rng.uniform(0.45, 0.7)  # inner / outer radius
        radius = side / math.sqrt(math.pi * (1.0 - ratio**2))
        outline = _regular(48, radius, angle)
        hole = _regular(48, ratio * radius, angle)
    elif name == "triangle":
        # equilateral with jittered corners; area = (3 sqrt(3) / 4) r^2
        radius = side / math.sqrt(3.0 * math.sqrt(3.0) / 4.0)
        corners = angle + np.arange(3) * 2.0 * math.pi / 3.0 + rng.uniform(-0.3, 0.3, 3)
        outline = radius * np.stack([np.cos(corners), np.sin(corners)], axis=1)  # (3, 2)
    elif name == "rectangle":
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        half = 0.5 * np.array([side * math.sqrt(aspect), side / math.sqrt(aspect)])
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half  # (4, 2)
        rotation = np.array([[math.cos(angle), -math.sin(angle)],
                             [math.sin(angle), math.cos(angle)]])
        outline = corners @ rotation.T
    else:  # star: 5 points, inner radius 0.5 of the outer; area = 5 r_out r_in sin(36 deg)
        outer = side / math.sqrt(5.0 * 0.5 * math.sin(math.pi / 5.0))
        radii = np.where(np.arange(10) % 2 == 0, outer, 0.5 * outer)
        turns = angle + np.arange(10) * math.pi / 5.0
        outline = np.stack([radii * np.cos(turns), radii * np.sin(turns)], axis=1)  # (10, 2)

    # shrink what does not fit, then place it fully inside the image
    low, high = outline.min(axis=0), outline.max(axis=0)
    fit = min(1.0, (w - 3.0) / (high[0] - low[0]), (h - 3.0) / (high[1] - low[1]))
    outline, low, high = outline * fit, low * fit, high * fit
    offset = np.array([rng.uniform(1.0 - low[0], w - 1.0 - high[0]),
                       rng.uniform(1.0 - low[1], h - 1.0 - high[1])])
    polygon = _round_polygon(outline + offset)
    mask = _rasterise(polygon, h, w)
    if hole is not None:
        mask &= ~_rasterise(_round_polygon(hole * fit + offset), h, w)
    return {"category_id": category["id"], "polygon": None if hole is not None else polygon,
            "mask": mask, "area": int(mask.sum())}


def _regular(n: int, radius: float, angle: float) -> np.ndarray:
    turns = angle + np.arange(n) * 2.0 * math.pi / n
    return radius * np.stack([np.cos(turns), np.sin(turns)], axis=1)  # (n, 2)


def _round_polygon(points: np.ndarray) -> list[float]:
    # two decimals: the JSON holds exactly the coordinates that were rasterised
    return [round(float(v), 2) for v in points.reshape(-1)]  # (2n,) as x0, y0, x1, y1, ...


def _rasterise(polygon: Sequence[float], h: int, w: int) -> np.ndarray:
    rle = mask_utils.merge(mask_utils.frPyObjects([list(polygon)], h, w))
    with warnings.catch_warnings():
        # pycocotools 2.0.x's decode trips numpy 2's __array__(copy=...) deprecation every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)  # (H, W)


def _flat_colour(rng: np.random.Generator, count: int, category_id: int,
                 class_colours: bool) -> np.ndarray:
    """Colours (count, 3) float32 of a flat-coloured object: one colour and mild noise."""
    if class_colours:
        base = np.asarray(_CLASS_COLOURS[category_id], np.float64) + rng.uniform(-30.0, 30.0, 3)
    else:
        base = rng.uniform(0.0, 255.0, 3)
    noise = rng.standard_normal(size=(count, 3), dtype=np.float32)  # (P, 3)
    return (base + 8.0 * noise).astype(np.float32)


def _texture(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, h: int,
             w: int) -> np.ndarray:
    """Colours (P, 3) float32 for the pixels at ``ys, xs``: one random texture."""
    kind = int(rng.integers(4))
    first, second = rng.uniform(0.0, 255.0, 3), rng.uniform(0.0, 255.0, 3)
    angle = rng.uniform(0.0, math.pi)
    along = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))  # (P,)
    if kind == 0:  # stripes
        period, phase = rng.uniform(4.0, 20.0), rng.uniform(0.0, 2.0 * math.pi)
        t = 0.5 + 0.5 * np.sin(along * (2.0 * math.pi / period) + phase)
    elif kind == 1:  # linear gradient across the whole image
        # angle in [0, pi): sin >= 0, so `along` is smallest at y = 0 and x = 0 or w - 1
        lowest = min(0.0, (w - 1) * math.cos(angle))
        extent = abs((w - 1) * math.cos(angle)) + (h - 1) * math.sin(angle) + 1e-6
        t = (along - lowest) / extent
    elif kind == 2:  # noise around the first colour
        scale = rng.uniform(10.0, 40.0)
        noise = rng.standard_normal(size=(ys.size, 3), dtype=np.float32)  # (P, 3)
        return (first + scale * noise).astype(np.float32)
    else:  # checkerboard
        period = rng.uniform(5.0, 24.0)
        t = (np.floor(xs / period) + np.floor(ys / period)) % 2.0
    t = np.clip(t, 0.0, 1.0)[:, None]  # (P, 1)
    return ((1.0 - t) * first + t * second).astype(np.float32)
