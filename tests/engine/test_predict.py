"""Prediction on image files with a randomly initialised model, and its COCO-style JSON."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import solo_fast
from solo_fast.data import CocoInstances, build_eval_transform, collate, load_image, make_shapes
from solo_fast.engine.predict import expand_image_paths, predict_images, predictions_to_coco_json

PRESET = "solov2-light_r18_fpn_ms-3x_coco"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    paths = make_shapes(tmp_path_factory.mktemp("shapes"), num_train=2, num_val=3)
    dataset = CocoInstances(annotation_file=paths.val_annotations, image_dir=paths.val_images,
                            train=False)
    return paths, dataset


def test_predict_images_yields_well_formed_predictions(shapes):
    paths, dataset = shapes
    torch.manual_seed(0)
    model = solo_fast.build_model(PRESET, num_classes=len(dataset.category_names),
                                  score_thr=0.0, filter_thr=0.0)
    files = sorted(paths.val_images.iterdir())
    assert len(files) == 3
    # a folder and a file: the folder expands to its three images
    results = list(predict_images(model, [paths.val_images, files[0]], test_scale=(320, 192),
                                  device="cpu", batch_size=2,
                                  category_names=dataset.category_names,
                                  label_to_category_id=dataset.label_to_category_id))
    assert [path for path, _ in results] == files + files[:1]
    assert not model.training
    for path, prediction in results:
        height, width = load_image(path).shape[1:]
        k = len(prediction["labels"])
        assert prediction["masks"].dtype == torch.bool
        assert prediction["masks"].shape == (k, height, width)
        assert prediction["labels"].dtype == torch.int64 and prediction["scores"].shape == (k,)
        assert prediction["boxes"].shape == (k, 4)
        assert ((prediction["labels"] >= 0) & (prediction["labels"] < 5)).all()
        assert prediction["names"] == [dataset.category_names[i]
                                       for i in prediction["labels"].tolist()]
        assert prediction["category_ids"] == [dataset.label_to_category_id[i]
                                              for i in prediction["labels"].tolist()]
    # the first image, alone in a batch or beside another, gives the same instances
    torch.testing.assert_close(results[0][1]["scores"], results[3][1]["scores"])
    assert any(len(p["labels"]) for _, p in results), "score_thr=0 should keep candidates"

    image_ids = {str(path): image_id for path, image_id in zip(files, dataset.image_ids)}
    records = predictions_to_coco_json(
        results[:3], label_to_category_id=dataset.label_to_category_id, image_ids=image_ids)
    assert len(records) == sum(len(p["labels"]) for _, p in results[:3])
    json.dumps(records)  # JSON-ready
    for record in records:
        assert set(record) == {"file_name", "image_id", "category_id", "segmentation", "bbox",
                               "score"}
        assert isinstance(record["segmentation"]["counts"], str) and len(record["bbox"]) == 4
    if records:
        loaded = dataset.coco.loadRes([{k: v for k, v in r.items() if k != "file_name"}
                                       for r in records])
        assert len(loaded.anns) == len(records)


def test_missing_and_unreadable_images_are_named(shapes, tmp_path):
    model = torch.nn.Identity()  # never reached
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        predict_images(model, [missing], test_scale=(320, 192), category_names=["a"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_image_paths([tmp_path / "empty"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(broken)
    with pytest.raises(ValueError, match="broken.png"):
        list(predict_images(model, [broken], test_scale=(320, 192), category_names=["a"]))


class _InputRecorder(torch.nn.Module):
    """Stands in for a detector: keeps what predict_images feeds it, predicts nothing."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images):
        self.calls.append(images)

    def predict(self, outputs, image_sizes, original_sizes):
        self.calls.append((image_sizes, original_sizes))
        return [{"masks": torch.zeros(0, h, w, dtype=torch.bool),
                 "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                 "boxes": torch.zeros(0, 4)} for h, w in original_sizes]


def test_predict_and_the_data_set_see_the_same_pixels(tmp_path):
    # one JPEG stored sideways with EXIF orientation 6 (upright: 30 high x 52 wide), one plain PNG
    rng = np.random.default_rng(2)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (52, 30, 3), dtype=np.uint8)).save(
        tmp_path / "a.jpg", exif=exif, quality=90)
    Image.fromarray(rng.integers(0, 256, (41, 37, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    images = [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 52},
              {"id": 2, "file_name": "b.png", "height": 41, "width": 37}]
    annotations = tmp_path / "val.json"
    annotations.write_text(json.dumps({"images": images,
                                       "categories": [{"id": 1, "name": "thing"}]}))
    scale = (96, 64)
    dataset = CocoInstances(annotation_file=annotations, image_dir=tmp_path, train=False,
                            transform=build_eval_transform(scale=scale))
    expected = collate([dataset[0], dataset[1]])

    model = _InputRecorder()
    results = list(predict_images(model, [tmp_path / "a.jpg", tmp_path / "b.png"],
                                  test_scale=scale, batch_size=2, category_names=["thing"]))
    assert len(results) == 2 and len(model.calls) == 2
    pixels, (image_sizes, original_sizes) = model.calls
    assert original_sizes == expected.original_sizes == [(30, 52), (41, 37)]
    assert image_sizes == expected.image_sizes
    assert torch.equal(pixels, expected.images)
