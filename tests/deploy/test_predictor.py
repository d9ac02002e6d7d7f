"""OnnxPredictor end to end on a fake export run by onnxruntime, against the torch path: the
batch from the eval transform and collate, the graph's own mask outputs pasted back with
``resize_to_original`` + threshold + ``masks_to_boxes``."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from solo_fast.deploy import OnnxPredictor
from solo_fast.postprocess import masks_to_boxes, resize_to_original
from tests.deploy.fake_model import LABELS, METADATA, SCORES, FakeSession, K, write_fake_model
from tests.deploy.test_preprocess import torch_batch


def make_images(sizes, seed=0):
    """uint8 RGB images with smooth structure (masks with edges), of the given (H0, W0)."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        images.append(np.ascontiguousarray(np.kron(coarse, np.ones((8, 8, 1), np.uint8))[:h, :w]))
    return images


def torch_path(path, images, scale, canvas=None):
    """What ``solo-fast predict`` would return with this graph in place of the model."""
    batch = torch_batch(images, scale)
    padded = batch.images.numpy()
    if canvas is not None:  # a static export's fixed canvas
        padded = np.zeros((len(images), 3, *canvas), np.float32)
        padded[:, :, :batch.images.shape[2], :batch.images.shape[3]] = batch.images.numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    num_dets, masks = session.run(["num_dets", "masks"], {
        "images": padded, "image_sizes": np.asarray(batch.image_sizes, np.int64)})
    results = []
    for n, (image_size, original) in enumerate(zip(batch.image_sizes, batch.original_sizes)):
        soft = torch.from_numpy(masks[n, :num_dets[n]])
        full = resize_to_original(soft, (masks.shape[2] * 4, masks.shape[3] * 4), image_size,
                                  original)
        binary = full > METADATA["mask_thr"]
        results.append({"masks": binary.numpy(), "boxes": masks_to_boxes(binary).numpy()})
    return results


def assert_same(results, expected):
    assert len(results) == len(expected)
    for n, (result, reference) in enumerate(zip(results, expected)):
        count = K - n % 2
        assert result["masks"].dtype == bool and result["masks"].shape[0] == count
        np.testing.assert_array_equal(result["masks"], reference["masks"])
        np.testing.assert_array_equal(result["boxes"], reference["boxes"])
        assert result["labels"].dtype == np.int64 and result["scores"].dtype == np.float32
        np.testing.assert_array_equal(result["labels"], LABELS[:count])
        np.testing.assert_array_equal(result["scores"], SCORES[:count])


SIZES = [(150, 211), (97, 60), (130, 130)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_fake_model(tmp_path_factory.mktemp("onnx") / "fake.onnx")


def test_predictions_equal_the_torch_path(model_file):
    images = make_images(SIZES)
    predictor = OnnxPredictor(model_file, providers=["CPUExecutionProvider"])
    results = predictor(images)
    expected = torch_path(model_file, images, tuple(METADATA["test_scale"]))
    assert_same(results, expected)
    assert results[0]["masks"].shape[1:] == SIZES[0]
    # growing offsets give nested masks of growing areas, neither empty nor the whole image
    areas = results[0]["masks"].sum((1, 2))
    assert (np.diff(areas) > 0).all() and 0 < areas[0] and areas[-1] < 150 * 211


def test_files_batches_grey_and_rgba_give_the_same_results(model_file, tmp_path):
    images = make_images(SIZES, seed=1)
    predictor = OnnxPredictor(model_file)
    paths = []
    for n, image in enumerate(images):
        paths.append(tmp_path / f"{n}.png")
        Image.fromarray(image).save(paths[-1])
    from_files = predictor(paths, batch_size=2)
    expected = predictor(images[:2]) + predictor(images[2:])
    for a, b in zip(from_files, expected):
        np.testing.assert_array_equal(a["masks"], b["masks"])
    grey = images[0][..., 0]
    rgba = np.concatenate([images[1], np.full((*SIZES[1], 1), 7, np.uint8)], axis=2)
    converted = predictor([grey, rgba])
    reference = predictor([np.repeat(grey[..., None], 3, 2), images[1]])
    for a, b in zip(converted, reference):
        np.testing.assert_array_equal(a["masks"], b["masks"])


def test_a_static_export_pads_to_its_canvas_and_splits_batches(tmp_path):
    path = write_fake_model(tmp_path / "static.onnx", static=(2, 160, 160),
                            metadata={**METADATA, "shapes": "static"})
    predictor = OnnxPredictor(path)
    assert predictor.batch_limit == 2 and predictor.canvas == (160, 160)
    images = make_images(SIZES, seed=2)
    results = predictor(images)  # runs of 2, then 1 padded to 2
    scale = tuple(METADATA["test_scale"])
    expected = (torch_path(path, images[:2], scale, canvas=(160, 160))
                + torch_path(path, images[2:] * 2, scale, canvas=(160, 160))[:1])
    for result, reference in zip(results, expected):
        np.testing.assert_array_equal(result["masks"], reference["masks"])
    assert len(results) == 3
    batch, sizes, originals = predictor.preprocess(images)
    with pytest.raises(ValueError, match="static.onnx takes batches of 2 images, got 3"):
        predictor.predict_tensors(batch, sizes, originals)
    batch, sizes, originals = OnnxPredictor(FakeSession()).preprocess(images[1:2])
    with pytest.raises(ValueError, match=r"takes 160x160 images, got 160x96"):
        predictor.predict_tensors(batch, sizes, originals)


@pytest.mark.parametrize(("metadata", "message"), [
    ({}, "is not a solo_fast export: its metadata_props have no 'solo_fast' entry"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ({**METADATA, "graph": "raw"}, "holds the 'raw' graph; OnnxPredictor runs the 'end2end'"),
    ({k: v for k, v in METADATA.items() if k != "mask_thr"}, r"lacks \['mask_thr'\]"),
    ({**METADATA, "std": [1, 0, 1]}, "std"),
    ({**METADATA, "mean": [1, 2]}, "mean"),
    ({**METADATA, "test_scale": [160, "96"]}, "test_scale"),
    ({**METADATA, "class_names": ["a"]}, "class_names"),
    ({**METADATA, "mask_output": "binary"}, r"mask_output 'binary', expected one of \['soft'\]"),
])
def test_a_file_that_is_not_an_end2end_export_is_refused(tmp_path, metadata, message):
    path = write_fake_model(tmp_path / "bad.onnx", metadata=metadata)
    with pytest.raises(ValueError, match=message) as error:
        OnnxPredictor(path)
    assert "bad.onnx" in str(error.value)


def test_missing_outputs_and_files_are_reported(tmp_path):
    path = write_fake_model(tmp_path / "partial.onnx", drop_output="masks")
    with pytest.raises(ValueError, match="partial.onnx lacks output masks"):
        OnnxPredictor(path)
    with pytest.raises(FileNotFoundError, match="nowhere.onnx"):
        OnnxPredictor(tmp_path / "nowhere.onnx")


def test_bad_inputs_are_refused_by_name(model_file):
    predictor = OnnxPredictor(model_file)
    image = make_images([(40, 50)])[0]
    with pytest.raises(ValueError, match=r"images\[1\] must be uint8"):
        predictor([image, image.astype(np.float32)])
    with pytest.raises(ValueError, match=r"images\[2\] must be uint8"):  # in the second batch
        predictor([image, image, image.astype(np.float32)], batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predictor([image], batch_size=0)
    batch, sizes, originals = predictor.preprocess([image])
    with pytest.raises(ValueError, match="images must be a float32"):
        predictor.predict_tensors(batch.astype(np.float64), sizes, originals)
    with pytest.raises(ValueError, match="original_sizes must be 1 positive"):
        predictor.predict_tensors(batch, sizes, originals[:, :1])
    with pytest.raises(ValueError, match="must fit the canvas"):
        predictor.predict_tensors(batch, sizes * 10, originals)


def test_repr_names_the_file_and_the_export(model_file):
    text = repr(OnnxPredictor(model_file))
    assert "fake.onnx" in text and "preset='fake'" in text and "test_scale=(160, 96)" in text


def test_metadata_is_read_as_written(model_file):
    meta = OnnxPredictor(model_file).metadata
    assert json.loads(json.dumps(METADATA))["class_names"] == list(meta.class_names)
    assert (meta.mean, meta.std, meta.test_scale) == (tuple(METADATA["mean"]),
                                                      tuple(METADATA["std"]), (160, 96))
