"""CocoInstances: decoding, id mapping, crowd and empty-image handling, every error and warning."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from solo_fast.data import (
    CocoAnnotationWarning,
    CocoFormatError,
    CocoInstances,
    RandomFlip,
    build_train_transform,
)

# M=instances, H/W=image size

H, W = 40, 48
# categories in file order, ids neither sorted nor contiguous
CATEGORIES = [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}, {"id": 9, "name": "nine"}]


def _rect_mask(y0, y1, x0, x1, h=H, w=W):
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _ann(ann_id, image_id, category_id, segmentation, bbox=(2.0, 3.0, 10.0, 5.0), **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": segmentation, "bbox": list(bbox), "area": 50.0, "iscrowd": 0,
            **extra}


def _write(tmp_path, annotations, images=None, categories=CATEGORIES, name="ann.json"):
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "height": H, "width": W}]
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for info in images:
        pixels = np.full((info["height"], info["width"], 3), info["id"] * 10, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / info["file_name"])
    file = tmp_path / name
    file.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return file, folder


def _dataset(file, folder, train=True, **kwargs):
    return CocoInstances(annotation_file=file, image_dir=folder, train=train, **kwargs)


def test_polygon_and_rle_decode_to_hand_built_masks(tmp_path):
    # pycocotools fills the rectangle polygon [2,3, 12,3, 12,8, 2,8] as rows 3..7, cols 2..11
    polygon = [[2, 3, 12, 3, 12, 8, 2, 8]]
    expected_polygon = _rect_mask(3, 8, 2, 12)
    expected_rle = _rect_mask(10, 30, 20, 25)
    expected_rle[15, 40] = True
    compressed = mask_utils.encode(np.asfortranarray(expected_rle.astype(np.uint8)))
    compressed = {"size": [H, W], "counts": compressed["counts"].decode()}
    # uncompressed RLE: column-major run lengths, starting with zeros; column 1, rows 4..9
    expected_raw = _rect_mask(4, 10, 1, 2)
    raw = {"size": [H, W], "counts": [H + 4, 6, H * W - H - 10]}
    file, folder = _write(tmp_path, [
        _ann(1, 1, 5, polygon),
        _ann(2, 1, 2, compressed, bbox=(20, 10, 21, 20)),
        _ann(3, 1, 9, raw, bbox=(1, 4, 1, 6)),
    ])
    sample = _dataset(file, folder)[0]
    masks = sample.target["masks"]
    assert masks.dtype == torch.bool and masks.shape == (3, H, W)
    assert np.array_equal(masks[0].numpy(), expected_polygon)
    assert np.array_equal(masks[1].numpy(), expected_rle)
    assert np.array_equal(masks[2].numpy(), expected_raw)
    # boxes are [x, y, x + w, y + h] of the annotation's bbox, float32
    assert sample.target["boxes"].dtype == torch.float32
    assert torch.equal(sample.target["boxes"], torch.tensor(
        [[2.0, 3.0, 12.0, 8.0], [20.0, 10.0, 41.0, 30.0], [1.0, 4.0, 2.0, 10.0]]))
    assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, H, W)
    assert sample.image_id == 1 and sample.original_size == (H, W)


def test_category_id_mapping_round_trip(tmp_path):
    polygon = [[2, 3, 12, 3, 12, 8, 2, 8]]
    file, folder = _write(tmp_path, [_ann(1, 1, 9, polygon), _ann(2, 1, 5, polygon),
                                     _ann(3, 1, 2, polygon)])
    ds = _dataset(file, folder)
    assert ds.label_to_category_id == [5, 2, 9]  # file order, as COCO.getCatIds()
    assert ds.category_names == ["five", "two", "nine"]
    assert ds.num_classes == 3
    assert {ds.label_to_category_id[label]: label
            for label in range(3)} == ds.category_id_to_label
    labels = ds[0].target["labels"]
    assert labels.dtype == torch.int64 and labels.tolist() == [2, 0, 1]
    assert [ds.label_to_category_id[label] for label in labels.tolist()] == [9, 5, 2]
    assert ds.coco.getCatIds() == ds.label_to_category_id


def test_crowd_and_ignored_annotations_are_not_instances(tmp_path):
    polygon = [[2, 3, 12, 3, 12, 8, 2, 8]]
    crowd_rle = mask_utils.encode(np.asfortranarray(_rect_mask(20, 30, 20, 30).astype(np.uint8)))
    crowd_rle = {"size": [H, W], "counts": crowd_rle["counts"].decode()}
    file, folder = _write(tmp_path, [
        _ann(1, 1, 5, crowd_rle, iscrowd=1),
        _ann(2, 1, 2, polygon),
        _ann(3, 1, 9, polygon, ignore=True),
    ])
    target = _dataset(file, folder)[0].target
    assert target["labels"].tolist() == [1]
    assert target["masks"].shape == (1, H, W)


def test_mmdet_box_filters(tmp_path):
    polygon = [[2, 3, 12, 3, 12, 8, 2, 8]]
    file, folder = _write(tmp_path, [
        _ann(1, 1, 5, polygon, bbox=(W + 5, 3, 10, 5)),  # outside the image
        _ann(2, 1, 5, polygon, bbox=(2, 3, 0.5, 5)),  # narrower than 1 px
        {**_ann(3, 1, 5, polygon), "area": 0},  # zero area
        _ann(4, 1, 2, polygon),  # kept
    ])
    assert _dataset(file, folder)[0].target["labels"].tolist() == [1]


def test_empty_and_small_images_skipped_in_train_kept_in_eval(tmp_path):
    polygon = [[2, 3, 12, 3, 12, 8, 2, 8]]
    crowd = mask_utils.encode(np.asfortranarray(_rect_mask(2, 8, 2, 8, 40, 48).astype(np.uint8)))
    crowd = {"size": [40, 48], "counts": crowd["counts"].decode()}
    images = [{"id": 10, "file_name": "a.png", "height": 40, "width": 48},
              {"id": 11, "file_name": "b.png", "height": 40, "width": 48},  # no annotation
              {"id": 12, "file_name": "c.png", "height": 20, "width": 48},  # side < 32
              {"id": 13, "file_name": "d.png", "height": 40, "width": 48}]  # crowd only
    file, folder = _write(tmp_path, [_ann(1, 10, 5, polygon), _ann(2, 12, 5, polygon),
                                     _ann(3, 13, 5, crowd, iscrowd=1)], images=images)
    train = _dataset(file, folder, train=True)
    assert train.image_ids == [10]
    assert _dataset(file, folder, train=True, filter_empty_gt=False).image_ids == [10, 11, 13]
    evaluation = _dataset(file, folder, train=False)
    assert evaluation.image_ids == [10, 11, 12, 13]
    empty = evaluation[1]
    assert empty.target["masks"].shape == (0, 40, 48)
    assert empty.target["boxes"].shape == (0, 4) and empty.target["labels"].shape == (0,)
    assert evaluation.original_sizes[2] == (20, 48)


def test_transform_draws_are_seeded_by_epoch_and_index(tmp_path):
    polygon = [[2, 3, 12, 3, 12, 8, 2, 8]]
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in range(1, 9)]
    file, folder = _write(tmp_path, [_ann(i, i, 5, polygon) for i in range(1, 9)], images=images)
    ds = _dataset(file, folder, transform=RandomFlip(prob=0.5))

    def flips():
        return [bool(ds[i].target["boxes"][0, 0] != 2.0) for i in range(len(ds))]

    first = flips()
    assert flips() == first
    ds.set_epoch(1)
    assert any(flips() != first for _ in range(1))  # 8 coins: equal with probability 1/256
    ds.set_epoch(0)
    assert flips() == first
    pipeline = _dataset(file, folder, transform=build_train_transform(scales=((96, 64),)))
    image = pipeline[0].image
    assert image.dtype == torch.float32 and image.shape == (3, 64, 77)


# ------------------------------------------------------------------------- errors and warnings


def test_missing_annotation_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        _dataset(missing, tmp_path)


def test_malformed_json(tmp_path):
    file = tmp_path / "broken.json"
    file.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match="broken.json.*not valid JSON"):
        _dataset(file, tmp_path)
    file.write_text("[1, 2]")
    with pytest.raises(CocoFormatError, match="broken.json.*JSON object"):
        _dataset(file, tmp_path)


def test_missing_keys(tmp_path):
    file = tmp_path / "nokeys.json"
    file.write_text(json.dumps({"images": [], "categories": CATEGORIES}))
    with pytest.raises(CocoFormatError, match="nokeys.json.*'annotations'"):
        _dataset(file, tmp_path)
    file.write_text(json.dumps({"annotations": [], "categories": CATEGORIES}))
    with pytest.raises(CocoFormatError, match="nokeys.json.*'images'"):
        _dataset(file, tmp_path, train=False)
    bad = _ann(77, 1, 5, [[2, 3, 12, 3, 12, 8, 2, 8]])
    del bad["category_id"]
    file, folder = _write(tmp_path, [bad], name="noid.json")
    message = r"noid.json.*annotations\[0\] \(id 77\).*category_id"
    with pytest.raises(CocoFormatError, match=message):
        _dataset(file, folder)
    file = tmp_path / "img.json"
    file.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [],
                                "categories": CATEGORIES}))
    with pytest.raises(CocoFormatError, match=r"img.json.*images\[0\] \(id 1\).*height"):
        _dataset(file, tmp_path, train=False)


def test_eval_file_without_annotations_key_is_accepted(tmp_path):
    file, folder = _write(tmp_path, [])
    data = json.loads(file.read_text())
    del data["annotations"]
    file.write_text(json.dumps(data))
    ds = _dataset(file, folder, train=False)
    assert len(ds) == 1 and ds[0].target["labels"].shape == (0,)


def test_missing_image_file(tmp_path):
    file, folder = _write(tmp_path, [_ann(1, 1, 5, [[2, 3, 12, 3, 12, 8, 2, 8]])])
    (folder / "a.png").unlink()
    ds = _dataset(file, folder)
    with pytest.raises(FileNotFoundError, match=r"image 1 .*a\.png"):
        ds[0]


def test_missing_image_folder(tmp_path):
    file, _ = _write(tmp_path, [])
    with pytest.raises(FileNotFoundError, match="image folder .*elsewhere"):
        _dataset(file, tmp_path / "elsewhere", train=False)


def test_image_size_mismatch(tmp_path):
    images = [{"id": 4, "file_name": "a.png", "height": H, "width": W}]
    file, folder = _write(tmp_path, [], images=images)
    Image.fromarray(np.zeros((H + 1, W, 3), dtype=np.uint8)).save(folder / "a.png")
    with pytest.raises(CocoFormatError, match=r"image 4 .*a\.png is 41x48"):
        _dataset(file, folder, train=False)[0]


def test_unknown_category_id(tmp_path):
    file, folder = _write(tmp_path, [_ann(31, 1, 4, [[2, 3, 12, 3, 12, 8, 2, 8]])])
    with pytest.raises(CocoFormatError, match=r"annotation 31 has category_id 4"):
        _dataset(file, folder, train=False)


def test_unknown_image_id(tmp_path):
    file, folder = _write(tmp_path, [_ann(32, 99, 5, [[2, 3, 12, 3, 12, 8, 2, 8]])])
    with pytest.raises(CocoFormatError, match=r"annotation 32 refers to image_id 99"):
        _dataset(file, folder)


def test_rle_of_the_wrong_size(tmp_path):
    rle = {"size": [H, W + 1], "counts": [H * (W + 1)]}
    file, folder = _write(tmp_path, [_ann(33, 1, 5, rle)])
    with pytest.raises(CocoFormatError, match=r"annotation 33: RLE size \[40, 49\]"):
        _dataset(file, folder)


def test_degenerate_polygons_warn_and_are_skipped(tmp_path):
    good = [2, 3, 12, 3, 12, 8, 2, 8]
    file, folder = _write(tmp_path, [
        _ann(41, 1, 5, [[2, 3, 12, 3]]),  # two points
        _ann(42, 1, 5, [[2, 3, 12, 3, 7, 3]]),  # collinear: zero area
        _ann(43, 1, 2, [good, [1, 1, 5, 5, 9, 9]]),  # one good polygon, one degenerate
        _ann(44, 1, 9, [good]),
    ])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _dataset(file, folder)
    messages = [str(w.message) for w in caught if issubclass(w.category, CocoAnnotationWarning)]
    assert any("annotation 41" in m and "skipped" in m for m in messages)
    assert any("annotation 42" in m and "zero area" in m for m in messages)
    assert any("annotation 43" in m and "zero area" in m for m in messages)
    assert not any("annotation 44" in m for m in messages)
    assert all("ann.json" in m for m in messages)
    target = ds[0].target
    assert target["labels"].tolist() == [1, 2]
    assert np.array_equal(target["masks"][0].numpy(), _rect_mask(3, 8, 2, 12))


def test_empty_data_sets(tmp_path):
    file, folder = _write(tmp_path, [], images=[], name="noimages.json")
    with pytest.raises(CocoFormatError, match="noimages.json.*no images"):
        _dataset(file, folder, train=False)
    file, folder = _write(tmp_path, [_ann(1, 1, 5, [[2, 3, 12, 3]])], name="nousable.json")
    with pytest.warns(CocoAnnotationWarning), pytest.raises(
            CocoFormatError, match="nousable.json.*no usable training images"):
        _dataset(file, folder, train=True)
    with pytest.warns(CocoAnnotationWarning):
        assert len(_dataset(file, folder, train=False)) == 1


def test_undecodable_image(tmp_path):
    file, folder = _write(tmp_path, [], images=[{"id": 3, "file_name": "a.png", "height": H,
                                                 "width": W}])
    (folder / "a.png").write_bytes(b"not an image")
    with pytest.raises(CocoFormatError, match=r"image 3 .*cannot decode"):
        _dataset(file, folder, train=False)[0]


def test_exif_rotated_image_is_loaded_upright(tmp_path):
    # stored 40 wide x 48 high with orientation 6: a viewer (and OpenCV) shows it 48 wide x 40 high
    stored = np.random.default_rng(1).integers(0, 256, (W, H, 3), dtype=np.uint8)  # (48, 40, 3)
    file, folder = _write(tmp_path, [_ann(1, 1, 5, [[2, 3, 12, 3, 12, 8, 2, 8]])])
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation
    Image.fromarray(stored).save(folder / "a.png", exif=exif)
    image = _dataset(file, folder)[0].image
    upright = np.ascontiguousarray(np.rot90(stored, -1))  # (40, 48, 3)
    assert torch.equal(image, torch.from_numpy(upright).permute(2, 0, 1))
    # annotated with the stored (sideways) size: the mismatch names both sizes
    images = [{"id": 6, "file_name": "a.png", "height": W, "width": H}]
    file = tmp_path / "sideways.json"
    file.write_text(json.dumps({"images": images, "annotations": [], "categories": CATEGORIES}))
    with pytest.raises(CocoFormatError, match=r"image 6 .*a\.png is 40x48 \(h x w\) but "
                                              r"annotated as 48x40"):
        _dataset(file, folder, train=False)[0]
