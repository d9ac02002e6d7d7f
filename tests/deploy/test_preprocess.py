"""The numpy pre-processing against the torch path's eval transform and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from solo_fast.data import build_eval_transform, collate
from solo_fast.deploy.preprocess import pad_batch, preprocess, to_rgb

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def torch_batch(images: list[np.ndarray], scale: tuple[int, int]):
    """``solo-fast predict``'s batch of uint8 (H0, W0, 3) arrays."""
    transform = build_eval_transform(scale=scale)
    samples = []
    for n, image in enumerate(images):
        tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()  # (3, H0, W0)
        resized, target = transform(tensor, {})
        samples.append((resized, target, n, image.shape[:2]))
    return collate(samples)


# (H0, W0) of the images of one batch, and the test scale
BATCHES = [
    ([(37, 53), (61, 29), (100, 100)], (160, 96)),  # up-scaled, portrait and landscape
    ([(480, 640), (333, 517)], (200, 120)),         # down-scaled
    ([(96, 64)], (96, 64)),                         # already at the scale: no resize
    ([(1, 7), (9, 1)], (64, 40)),                   # one-pixel edges
    ([(427, 640)], (1333, 800)),                    # COCO-like, the real test scale
]


@pytest.mark.parametrize(("sizes", "scale"), BATCHES)
def test_batch_equals_the_torch_path(sizes, scale):
    rng = np.random.default_rng(sum(map(sum, sizes)))
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in sizes]
    expected = torch_batch(images, scale)
    batch, image_sizes, original_sizes = preprocess(images, scale=scale, mean=MEAN, std=STD,
                                                    size_divisor=32)
    assert batch.dtype == np.float32 and image_sizes.dtype == original_sizes.dtype == np.int64
    np.testing.assert_array_equal(batch, expected.images.numpy())  # same operations, same bits
    assert image_sizes.tolist() == [list(s) for s in expected.image_sizes]
    assert original_sizes.tolist() == [list(s) for s in sizes]


def test_a_fixed_canvas_pads_to_it_and_refuses_larger_images():
    image = np.ones((3, 40, 50), np.float32)
    batch = pad_batch([image], 32, canvas=(64, 96))
    assert batch.shape == (1, 3, 64, 96)
    assert batch[0, :, :40, :50].min() == 1
    assert batch[0, :, 40:].max() == batch[0, :, :, 50:].max() == 0
    with pytest.raises(ValueError, match="larger than the model's fixed input canvas 32x96"):
        pad_batch([image], 32, canvas=(32, 96))


def test_grey_and_rgba_become_rgb():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = to_rgb(grey)
    assert rgb.shape == (5, 7, 3) and all((rgb[..., c] == grey).all() for c in range(3))
    np.testing.assert_array_equal(to_rgb(grey[:, :, None]), rgb)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb(rgba), rgba[..., :3])
    colour = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert to_rgb(colour) is colour


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((5, 7, 3), np.float32), r"photo must be uint8 \(0..255\), got dtype float32"),
    (np.zeros((5, 7, 3), bool), "got dtype bool"),
    (np.zeros((5, 7, 2), np.uint8), r"photo must have shape .*, got \(5, 7, 2\)"),
    (np.zeros((1, 5, 7, 3), np.uint8), r"got \(1, 5, 7, 3\)"),
    (np.zeros((0, 7, 3), np.uint8), "photo is empty"),
])
def test_bad_images_are_refused_by_name(image, message):
    with pytest.raises(ValueError, match=message):
        to_rgb(image, "photo")
    with pytest.raises(TypeError, match="photo must be a numpy array, got list"):
        to_rgb([[1, 2], [3, 4]], "photo")
