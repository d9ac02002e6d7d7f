"""The numpy paste-back against the torch path: ``F.interpolate`` (bilinear, align_corners=False),
``resize_to_original`` + threshold + ``masks_to_boxes``.

Where PyTorch runs its generic bilinear kernel (output height + width > 128, and not 3 channels
on one thread) the numpy resize is compared bit for bit: both compute the same float32
operations, fused multiply-adds included (solo_fast/deploy/masks.py explains). Below that size
PyTorch switches to a channels-last kernel that rounds differently, so there the comparison
allows 4 ulp.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from solo_fast.deploy import masks as deploy_masks
from solo_fast.deploy.masks import fma, masks_to_boxes, paste_masks, resize_bilinear
from solo_fast.postprocess import masks_to_boxes as torch_masks_to_boxes
from solo_fast.postprocess import resize_to_original

F32 = np.float32


def torch_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear",
                         align_corners=False)[0].numpy()


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in units in the last place between float32 arrays of one sign each."""
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32)).max(initial=0))


# (K, H, W) -> (h, w); every output has h + w > 128 and K != 3 (PyTorch's generic kernel: with one
# thread it gives 3-channel inputs to the channels-last kernel too)
GENERIC = [
    ((4, 13, 17), (100, 71)),     # up, odd factors
    ((2, 250, 97), (61, 90)),     # down
    ((4, 37, 53), (37, 200)),     # rows unchanged, columns up
    ((1, 64, 64), (64, 64)),      # identity
    ((5, 1, 29), (77, 131)),      # one-pixel-high input
    ((2, 31, 1), (140, 1)),       # one-pixel-wide input and output
    ((2, 200, 272), (800, 1088)),  # the 4x paste onto a COCO canvas
    ((2, 7, 300), (1, 300)),      # a one-pixel-high output
    ((9, 45, 22), (226, 170)),    # 9 channels
]


@pytest.mark.parametrize(("shape", "size"), GENERIC)
def test_resize_equals_torch_bit_for_bit(shape, size):
    x = np.random.default_rng(sum(shape) + sum(size)).random(shape, dtype=F32) * 3 - 1
    expected = torch_resize(x, size)
    got = resize_bilinear(x, size)
    assert got.shape == expected.shape and got.dtype == F32
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize(("shape", "size"), [((3, 9, 14), (40, 31)), ((11, 20, 20), (7, 9)),
                                             ((8, 5, 6), (60, 60)), ((1, 1, 1), (1, 5))])
def test_small_outputs_are_within_4_ulp_of_torch(shape, size):
    # PyTorch's channels-last kernel serves these (see the module docstring)
    x = np.random.default_rng(sum(shape)).random(shape, dtype=F32)
    assert ulps(resize_bilinear(x, size), torch_resize(x, size)) <= 4


def test_resize_of_no_masks_is_empty():
    assert resize_bilinear(np.zeros((0, 6, 7), F32), (20, 30)).shape == (0, 20, 30)


@pytest.mark.parametrize(("x", "size", "message"), [
    (np.zeros((4, 4), np.float64), (2, 2), "float32"),
    (np.zeros(4, F32), (2, 2), "at least 2 axes"),
    (np.zeros((4, 4), F32), (0, 2), "h, w >= 1"),
])
def test_resize_rejects_bad_arguments(x, size, message):
    with pytest.raises(ValueError, match=message):
        resize_bilinear(x, size)


def _round_to_float32(value: Fraction) -> F32:
    """Round-to-nearest-even of an exact rational to float32 (the reference for fma)."""
    guess = F32(float(value))
    candidates = [np.nextafter(guess, F32(-np.inf)), guess, np.nextafter(guess, F32(np.inf))]
    distances = [abs(Fraction(float(c)) - value) for c in candidates]
    best = min(distances)
    ties = [c for c, d in zip(candidates, distances) if d == best]
    return min(ties, key=lambda c: int(np.asarray(c).view(np.int32)) & 1)


def test_fma_rounds_once_where_float64_would_round_twice():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(2000).astype(F32)
    b = rng.standard_normal(2000).astype(F32)
    c = rng.standard_normal(2000).astype(F32)
    # a * b + c lies 2^-64 below the float32 midpoint 64 + 2^-17 + 2^-18: float64 rounds it onto
    # the midpoint, whose tie then rounds to the even neighbour above; the right answer is below
    hard_a = [F32(1 + 2.0**-23), F32(1 + 2.0**-23), F32(2.0**-70)]
    hard_b = [F32((1 - 2.0**-23) * 2.0**-18), F32((1 - 2.0**-23) * -2.0**-18), F32(2.0**-70)]
    hard_c = [F32(64 + 2.0**-17), F32(-64 - 2.0**-17), F32(2.0**-149)]  # the last: subnormal
    a, b, c = (np.concatenate([v, np.array(h, F32)]) for v, h in
               ((a, hard_a), (b, hard_b), (c, hard_c)))
    expected = np.array([_round_to_float32(Fraction(float(x)) * Fraction(float(y))
                                           + Fraction(float(z))) for x, y, z in zip(a, b, c)])
    np.testing.assert_array_equal(fma(a, b, c).view(np.int32), expected.view(np.int32))
    twice = (a.astype(np.float64) * b + c).astype(F32)
    assert twice[-3] != expected[-3]  # the hard case does defeat plain float64


def torch_paste(soft: np.ndarray, canvas, image_size, original_size, mask_thr):
    full = resize_to_original(torch.from_numpy(soft), canvas, image_size, original_size)
    binary = full > mask_thr
    return binary.numpy(), torch_masks_to_boxes(binary).numpy()


# (K, H4, W4), stride-4 canvas, (h, w) in it, (H0, W0)
PASTES = [
    ((6, 25, 34), (100, 136), (100, 133), (240, 320)),   # up to the original
    ((4, 50, 68), (200, 272), (187, 272), (150, 218)),   # down to the original
    ((2, 40, 32), (160, 128), (160, 101), (160, 101)),   # original = resized image
    ((1, 32, 40), (128, 160), (128, 160), (1, 400)),     # one-pixel-high original
    ((0, 20, 24), (80, 96), (75, 96), (300, 384)),       # no masks
    ((11, 24, 24), (96, 96), (96, 91), (512, 486)),      # more masks than a chunk
]


@pytest.mark.parametrize(("shape", "canvas", "image_size", "original"), PASTES)
def test_paste_equals_the_torch_path(shape, canvas, image_size, original):
    rng = np.random.default_rng(shape[0] + canvas[0])
    # smooth blobs (upsampled noise) so masks have edges, boxes and empty masks
    coarse = rng.random((shape[0], shape[1] // 4 + 1, shape[2] // 4 + 1), dtype=F32)
    soft = np.kron(coarse, np.ones((4, 4), F32))[:, :shape[1], :shape[2]] ** 3
    soft = np.ascontiguousarray(soft * rng.uniform(0.3, 1.6, (shape[0], 1, 1)).astype(F32))
    expected_masks, expected_boxes = (torch_paste(soft, canvas, image_size, original, 0.5)
                                      if shape[0] else (np.zeros((0, *original), bool),
                                                        np.zeros((0, 4), F32)))
    masks, boxes = paste_masks(soft, canvas=canvas, image_size=image_size,
                               original_size=original, mask_thr=0.5)
    assert masks.dtype == bool and masks.shape == (shape[0], *original)
    np.testing.assert_array_equal(masks, expected_masks)
    assert boxes.dtype == F32
    np.testing.assert_array_equal(boxes, expected_boxes)


@pytest.mark.parametrize("original", [(300, 411), (90, 120)])
def test_paste_of_small_objects_at_the_borders_equals_the_torch_path(original):
    """Only a window around each object is resized: objects in corners, on the crop's edge, in
    the padding, just below the threshold everywhere, and above it everywhere."""
    yy, xx = np.mgrid[0:30, 0:40].astype(np.float64)
    centres = [(0, 0), (29, 39), (29.4, 20), (12, 38.9), (15, 20), (45, 60)]  # last: padding
    soft = [1 / (1 + np.exp(np.minimum(50, (np.hypot(yy - cy, xx - cx) - 2.5) / 0.8)))
            for cy, cx in centres]
    soft += [np.full((30, 40), 0.49999997), np.full((30, 40), 0.5000001)]
    soft = np.ascontiguousarray(np.stack(soft).astype(F32))  # (8, 30, 40)
    args = {"canvas": (120, 160), "image_size": (117, 150), "original_size": original,
            "mask_thr": 0.5}
    expected_masks, expected_boxes = torch_paste(soft, args["canvas"], args["image_size"],
                                                 original, 0.5)
    masks, boxes = paste_masks(soft, **args)
    np.testing.assert_array_equal(masks, expected_masks)
    np.testing.assert_array_equal(boxes, expected_boxes)
    areas = masks.sum((1, 2))
    assert areas[-2] == 0 and areas[-1] == original[0] * original[1] and (areas[:5] > 0).all()


def test_pixels_at_the_threshold_are_decided_exactly(monkeypatch):
    """Soft values within a few ulp of mask_thr: the plain float32 resize alone gets some of them
    wrong, and the exact recomputation puts them right."""
    rng = np.random.default_rng(7)
    soft = (F32(0.5) + rng.integers(-40, 41, (4, 30, 40)).astype(F32) * F32(2.0**-25))
    args = {"canvas": (120, 160), "image_size": (117, 160), "original_size": (300, 411),
            "mask_thr": 0.5}
    expected_masks, expected_boxes = torch_paste(soft, args["canvas"], args["image_size"],
                                                 args["original_size"], 0.5)
    masks, boxes = paste_masks(soft, **args)
    np.testing.assert_array_equal(masks, expected_masks)
    np.testing.assert_array_equal(boxes, expected_boxes)
    monkeypatch.setattr(deploy_masks, "ERROR_ULPS", -1.0)  # no pixel recomputed
    plain, _ = paste_masks(soft, **args)
    assert (plain != expected_masks).sum() > 0


@pytest.mark.parametrize("kwargs", [
    {"soft": np.zeros((2, 8, 8), np.float64)},
    {"soft": np.zeros((8, 8), F32)},
    {"image_size": (40, 20)},
    {"original_size": (0, 5)},
])
def test_paste_rejects_bad_arguments(kwargs):
    args = {"soft": np.zeros((2, 8, 8), F32), "canvas": (32, 32), "image_size": (30, 31),
            "original_size": (60, 62), "mask_thr": 0.5, **kwargs}
    with pytest.raises(ValueError, match="soft must be|image_size"):
        paste_masks(**args)


def test_boxes_equal_torch_masks_to_boxes():
    rng = np.random.default_rng(3)
    masks = rng.random((7, 23, 31)) > 0.997  # sparse: small boxes, some masks empty
    masks[2] = False
    masks[3, 22, 30] = True  # the last pixel: x2, y2 exclusive
    expected = torch_masks_to_boxes(torch.from_numpy(masks)).numpy()
    assert (expected[2] == 0).all()
    np.testing.assert_array_equal(masks_to_boxes(masks), expected)
    assert masks_to_boxes(np.zeros((0, 5, 5), bool)).shape == (0, 4)
