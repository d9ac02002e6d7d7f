"""A real ``solo-fast export`` end2end file through the torch-free predictor against the torch
model's own ``predict`` on the same images: what a user switching from torch to ONNX Runtime gets.

Both paths start from the same prepared batch (the predictor's numpy pre-processing, which
tests/deploy/test_preprocess.py holds to the torch eval transform bit for bit). The networks
then differ in the last bits (ONNX Runtime's convolutions and resizes), which can flip a mask
pixel whose probability lies at mask_thr: instances, labels and order must be equal, scores
within 2e-3 relative (one pixel of an area-A mask moves maskness by ~1/A), masks at the original
size IoU >= 0.99, boxes within a pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from solo_fast.deploy import OnnxPredictor
from solo_fast.export import export_onnx
from tests.export.helpers import detecting_model, tiny_config

# N=images, K=instances, H0, W0=original size




@pytest.fixture(scope="module", params=["solov2", "decoupled_solo"])
def exported(request, tmp_path_factory):
    cfg = tiny_config(request.param, test_scale=(320, 256))
    model = detecting_model(cfg)
    path = tmp_path_factory.mktemp("deploy") / f"{request.param}.onnx"
    export_onnx(model, path, cfg=cfg, check=False)
    return model, OnnxPredictor(path)


def _images(seed: int) -> list[np.ndarray]:
    """Three uint8 RGB images of different sizes and aspect ratios (one grey)."""
    rng = np.random.default_rng(seed)
    smooth = [np.kron(rng.integers(0, 256, (h // 8, w // 8, 3)), np.ones((8, 8, 1)))
              for h, w in ((240, 320), (200, 136), (96, 256))]
    images = [image.astype(np.uint8) for image in smooth]
    images[2] = images[2][:, :, 0]  # grey (H, W): the predictor repeats it to RGB
    return images


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_predictor_matches_the_torch_model(exported):
    model, predictor = exported
    images = _images(seed=0)
    batch, image_sizes, original_sizes = predictor.preprocess(images)
    with torch.no_grad():
        expected = model.predict(model(torch.from_numpy(batch)), image_sizes.tolist(),
                                 original_sizes.tolist())
    got = predictor(images)
    assert [len(r["labels"]) for r in got] == [len(r["labels"]) for r in expected]
    assert sum(len(r["labels"]) for r in got) > 0
    for image, (mine, theirs) in enumerate(zip(got, expected)):
        assert mine["masks"].shape == tuple(theirs["masks"].shape)
        assert mine["masks"].shape[1:] == images[image].shape[:2]
        _assert_same_instances(mine, {key: value.numpy() for key, value in theirs.items()})


def _assert_same_instances(mine: dict, theirs: dict) -> None:
    """Instance k of ``mine`` is instance k of ``theirs`` (label, score within 2e-3, mask IoU >=
    0.99, box within a pixel), except inside a run of scores equal within 2e-3 with one label:
    there the order is a tie's (both paths order exact ties by candidate, but the networks'
    last bits decide which of two equal scores is larger), so a permutation is allowed."""
    close = np.isclose(mine["scores"], theirs["scores"], rtol=2e-3, atol=1e-6)
    assert close.all(), (mine["scores"][~close], theirs["scores"][~close])
    free = set(range(len(theirs["labels"])))
    for k in range(len(mine["labels"])):
        tied = [j for j in sorted(range(len(theirs["labels"])), key=lambda j: abs(j - k))
                if theirs["labels"][j] == mine["labels"][k]
                and np.isclose(theirs["scores"][j], mine["scores"][k], rtol=2e-3, atol=1e-6)]
        match = next((j for j in tied if j in free
                      and _iou(mine["masks"][k], theirs["masks"][j]) >= 0.99), None)
        assert match is not None, f"instance {k} (label {mine['labels'][k]}) has no twin"
        assert match == k or len(tied) > 1, (k, match)  # out of place only among ties
        np.testing.assert_allclose(mine["boxes"][k], theirs["boxes"][match], atol=1.0)
        free.discard(match)


def test_the_batch_around_an_image_changes_nothing_on_the_same_canvas(exported):
    _, predictor = exported
    images = _images(seed=1)
    small = np.full((64, 80, 3), 127, np.uint8)  # resized to 256 x 320: inside the same canvas
    with_small = predictor([images[0], small, images[1]])
    without = predictor([images[0], images[1]])
    for mine, theirs in zip((with_small[0], with_small[2]), without):
        for key in ("labels", "scores", "boxes", "masks"):
            np.testing.assert_array_equal(mine[key], theirs[key])


def test_a_model_without_detections_gives_empty_results(tmp_path):
    cfg = tiny_config("solo", test_scale=(320, 256))
    model = detecting_model(cfg)
    torch.nn.init.constant_(model.head.cls_pred.bias, -30.0)  # no class above score_thr
    export_onnx(model, tmp_path / "empty.onnx", cfg=cfg, check=False)
    images = _images(seed=2)
    results = OnnxPredictor(tmp_path / "empty.onnx")(images)
    for image, result in zip(images, results):
        assert result["masks"].shape == (0, *image.shape[:2]) and result["masks"].dtype == bool
        assert result["labels"].shape == (0,) and result["scores"].shape == (0,)
        assert result["boxes"].shape == (0, 4)
