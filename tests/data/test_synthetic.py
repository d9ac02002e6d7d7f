"""The synthetic shapes set: determinism, COCO validity, occlusion, sizes over all FPN levels."""

import json
import math
from collections import Counter

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from solo_fast.config import get_preset
from solo_fast.data import SHAPES_CATEGORIES, CocoInstances, make_shapes, rescale_size

NUM_TRAIN, NUM_VAL = 40, 6

# pycocotools 2.0.x's decode trips numpy 2's __array__(copy=...) deprecation on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), num_train=NUM_TRAIN, num_val=NUM_VAL,
                       seed=0)


def _load(file):
    return json.loads(file.read_text())


def _decode(segmentation, h, w):
    if isinstance(segmentation, list):
        segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    return mask_utils.decode(segmentation).astype(bool)


def test_layout_and_counts(shapes):
    assert shapes.train_annotations.name == "instances_train.json"
    assert shapes.val_annotations.name == "instances_val.json"
    train, val = _load(shapes.train_annotations), _load(shapes.val_annotations)
    assert len(train["images"]) == NUM_TRAIN and len(val["images"]) == NUM_VAL
    for image in train["images"]:
        assert (shapes.train_images / image["file_name"]).is_file()
        assert 192 <= image["height"] <= 320 and 192 <= image["width"] <= 320
    orientations = {image["width"] < image["height"] for image in train["images"]}
    assert orientations == {True, False}  # both portrait and landscape
    ids = [c["id"] for c in train["categories"]]
    assert len(ids) >= 3 and ids != list(range(len(ids))) and ids != list(range(1, len(ids) + 1))
    assert Counter(a["category_id"] for a in train["annotations"]).keys() == set(ids)


def test_same_seed_is_byte_identical(shapes, tmp_path):
    again = make_shapes(tmp_path / "again", num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    assert again.train_annotations.read_bytes() == shapes.train_annotations.read_bytes()
    assert again.val_annotations.read_bytes() == shapes.val_annotations.read_bytes()
    for name in ("000001.jpg", f"{NUM_TRAIN:06d}.jpg"):
        assert (again.train_images / name).read_bytes() == (shapes.train_images / name).read_bytes()
    other = make_shapes(tmp_path / "other", num_train=4, num_val=1, seed=1)
    assert other.train_annotations.read_bytes() != shapes.train_annotations.read_bytes()


def test_reuse_and_overwrite(shapes):
    stamp = shapes.train_annotations.stat().st_mtime_ns
    make_shapes(shapes.root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    assert shapes.train_annotations.stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ValueError):
        make_shapes(shapes.root, image_size=(16, 64))


def test_annotations_are_visible_parts(shapes):
    data = _load(shapes.train_annotations)
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    per_image = {}
    formats = Counter()
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        mask = _decode(ann["segmentation"], h, w)
        formats["polygon" if isinstance(ann["segmentation"], list) else "rle"] += 1
        assert ann["iscrowd"] == 0
        assert ann["area"] == int(mask.sum()) >= 20
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                               ys.max() - ys.min() + 1]
        per_image.setdefault(ann["image_id"], []).append(mask)
    assert formats["polygon"] > 0 and formats["rle"] > 0
    # visible parts never overlap: occluded pixels belong to the object in front only
    for masks in per_image.values():
        assert int(np.stack(masks).sum(0).max()) == 1
    # and some objects are occluded (an RLE of a polygon shape whose mask is not the polygon's)
    ids = {c["name"]: c["id"] for c in SHAPES_CATEGORIES}
    occluded = [a for a in data["annotations"]
                if isinstance(a["segmentation"], dict) and a["category_id"] != ids["ring"]]
    assert occluded


def _fpn_level_hits(shapes):
    """Per level of SOLO's scale ranges, how many instances' box scales sqrt(w h) after the
    default (1333, 800) resize fall in it; and each instance's sqrt(area) / shorter side."""
    config = get_preset("solo_r50_fpn_1x_coco")
    data = _load(shapes.train_annotations)
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    hits = Counter({level: 0 for level in range(len(config.head.scale_ranges))})
    roots = []
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        factor = rescale_size((h, w), config.train.test_scale)[0] / h
        scale = math.sqrt(ann["bbox"][2] * ann["bbox"][3]) * factor
        assert scale >= 1
        roots.append(math.sqrt(ann["area"]) / min(h, w))
        for level, (lo, hi) in enumerate(config.head.scale_ranges):
            hits[level] += lo <= scale <= hi
    return hits, roots


def test_object_sizes_span_every_fpn_level(shapes):
    hits, roots = _fpn_level_hits(shapes)
    assert all(hits.values()), hits
    data = _load(shapes.train_annotations)
    assert min(math.sqrt(a["area"]) for a in data["annotations"]) < 16
    assert max(roots) > 0.5


def test_loads_through_coco_instances(shapes):
    train = CocoInstances(annotation_file=shapes.train_annotations, image_dir=shapes.train_images,
                          train=True)
    assert train.label_to_category_id == [c["id"] for c in SHAPES_CATEGORIES]
    assert train.category_names == [c["name"] for c in SHAPES_CATEGORIES]
    sample = train[0]
    record = train.records[0]
    assert sample.image.shape == (3, record.height, record.width)
    assert sample.target["masks"].shape[0] == len(record.instances) > 0


@pytest.fixture(scope="module")
def flat_shapes(tmp_path_factory):
    from solo_fast.demo import DEMO_SHAPES

    return make_shapes(tmp_path_factory.mktemp("flat"), num_train=NUM_TRAIN, num_val=NUM_VAL,
                       image_format="png", seed=0, **DEMO_SHAPES)


def test_flat_objects_have_their_class_colour(flat_shapes):
    from PIL import Image

    from solo_fast.data.synthetic import _CLASS_COLOURS

    data = _load(flat_shapes.train_annotations)
    images = {image["id"]: image for image in data["images"]}
    checked = 0
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        pixels = np.asarray(Image.open(flat_shapes.train_images / image["file_name"]),
                            dtype=np.float64)  # (H, W, 3)
        colours = pixels[_decode(ann["segmentation"], image["height"], image["width"])]  # (P, 3)
        # class colour +-30 jitter, then noise of std 8 (and 3 of sensor noise) around it
        assert np.abs(colours.mean(0) - _CLASS_COLOURS[ann["category_id"]]).max() <= 33
        if len(colours) >= 100:
            assert colours.std(0).max() < 12
        checked += 1
    assert checked > NUM_TRAIN


def test_flat_set_sizes_still_span_every_fpn_level(flat_shapes):
    hits, _ = _fpn_level_hits(flat_shapes)
    assert all(hits.values()), hits


@pytest.mark.parametrize("arguments, message", [
    ({"object_style": "wavy"}, "object_style"),
    ({"class_colours": True}, "class_colours"),
    ({"min_object_size": 0.5}, "min_object_size"),
    ({"min_object_size": 400.0}, "min_object_size"),
    ({"max_object_fraction": 1.5}, "max_object_fraction"),
])
def test_bad_style_arguments_are_named(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        make_shapes(tmp_path, num_train=1, num_val=1, **arguments)
