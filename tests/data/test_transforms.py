"""Resize (mmcv's keep-ratio rule), multi-scale choice, flip consistency, normalisation."""

import pytest
import torch
import torch.nn.functional as F

from solo_fast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomChoiceResize,
    RandomFlip,
    Resize,
    build_eval_transform,
    build_train_transform,
    rescale_size,
)

# M=instances, H/W=image size


def _sample(h=30, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 5:12, 3:20] = True
    masks[1, 20:28, 25:39] = True
    boxes = torch.tensor([[3.0, 5.0, 20.0, 12.0], [25.0, 20.0, 39.0, 28.0]])
    return image, {"masks": masks, "boxes": boxes, "labels": torch.tensor([0, 2])}


# (h, w), scale -> (new_h, new_w), each worked out by hand:
# factor = min(long / max(h, w), short / min(h, w)); side -> int(side * factor + 0.5)
RESCALE_CASES = [
    # min(1333/640, 800/480) = 5/3: 480 -> 800, 640 -> 1066.67 -> 1067
    ((480, 640), (1333, 800), (800, 1067)),
    # a common COCO size: 800/427 = 1.87354 < 1333/640: 427 -> 800, 640 -> 1199.06 -> 1199
    ((427, 640), (1333, 800), (800, 1199)),
    # portrait: the same factor, sides swapped
    ((640, 480), (1333, 800), (1067, 800)),
    # the scale's order does not matter (keep_ratio takes max / min)
    ((480, 640), (800, 1333), (800, 1067)),
    # very wide: the long edge binds, 1333/1000: 200 -> 266.6 -> 267, 1000 -> 1333
    ((200, 1000), (1333, 800), (267, 1333)),
    # SOLOv2-light test scale (768, 448): 448/480 = 0.9333: 480 -> 448, 640 -> 597.33 -> 597
    ((480, 640), (768, 448), (448, 597)),
    # shrinking, truncation: 3/7: 5 -> 2.14 -> 2, 7 -> 3.0 -> 3
    ((5, 7), (3, 3), (2, 3)),
    # exact halves round up (not to even): 0.5: 5 -> 2.5 -> 3, 12 -> 6
    ((5, 12), (6, 6), (3, 6)),
    # already at scale: unchanged
    ((800, 1067), (1333, 800), (800, 1067)),
]


@pytest.mark.parametrize(("size", "scale", "expected"), RESCALE_CASES)
def test_rescale_size_matches_mmcv_rule(size, scale, expected):
    assert rescale_size(size, scale) == expected


@pytest.mark.parametrize(("size", "scale", "expected"), RESCALE_CASES[:3] + RESCALE_CASES[6:8])
def test_resize_output_sizes(size, scale, expected):
    image, target = _sample(*size)
    out, out_target = Resize(scale=scale)(image, target)
    assert out.shape == (3, *expected) and out.dtype == torch.uint8
    assert out_target["masks"].shape == (2, *expected) and out_target["masks"].dtype == torch.bool
    assert torch.equal(out_target["labels"], target["labels"])


def test_resize_does_not_modify_inputs():
    image, target = _sample()
    copies = image.clone(), {k: v.clone() for k, v in target.items()}
    Resize(scale=(100, 60))(image, target)
    assert torch.equal(image, copies[0])
    assert all(torch.equal(target[k], copies[1][k]) for k in target)


def test_mask_nearest_follows_opencv_index_rule():
    # cv2 INTER_NEAREST: src = min(floor(dst * (1 / (out / in))), in - 1)
    masks = torch.zeros(1, 5, 5, dtype=torch.bool)
    masks[0, 1, :] = True  # row 1
    masks[0, :, 3] = True  # column 3
    # (5, 5) -> (3, 3): factor 0.6, source rows/cols floor(0, 1.67, 3.33) = 0, 1, 3
    _, out = Resize(scale=(3, 3))(torch.zeros(3, 5, 5, dtype=torch.uint8),
                                  {"masks": masks, "boxes": torch.zeros(1, 4)})
    expected = masks[0][[0, 1, 3]][:, [0, 1, 3]]
    assert torch.equal(out["masks"][0], expected)
    # (2, 2) -> (4, 4): every pixel doubled
    small = torch.tensor([[[True, False], [False, True]]])
    _, out = Resize(scale=(4, 4))(torch.zeros(3, 2, 2, dtype=torch.uint8),
                                  {"masks": small, "boxes": torch.zeros(1, 4)})
    assert torch.equal(out["masks"][0], small[0].repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_resize_boxes_scaled_and_clipped():
    image, target = _sample(30, 40)
    # the second box overhangs the image
    target["boxes"] = torch.tensor([[3.0, 5.0, 20.0, 12.0], [25.0, 20.0, 45.0, 31.0]])
    _, out = Resize(scale=(100, 75))(image, target)  # factor 2.5 -> (75, 100)
    expected = torch.tensor([[7.5, 12.5, 50.0, 30.0], [62.5, 50.0, 100.0, 75.0]])
    assert out["boxes"].dtype == torch.float32
    assert torch.equal(out["boxes"], expected)


def test_resize_image_is_bilinear_half_pixel():
    # a constant image stays constant; a ramp matches F.interpolate(align_corners=False), rounded
    constant = torch.full((3, 10, 14), 77, dtype=torch.uint8)
    out, _ = Resize(scale=(31, 17))(constant, {})
    assert out.shape == (3, 17, 24) and bool((out == 77).all())
    ramp = (torch.arange(14, dtype=torch.float32) * 18).expand(3, 10, 14).to(torch.uint8)
    out, _ = Resize(scale=(31, 17))(ramp, {})
    reference = F.interpolate(ramp[None].double(), size=(17, 24), mode="bilinear",
                              align_corners=False)[0]
    assert (out.double() - reference).abs().max() <= 0.5 + 1e-9
    same, _ = Resize(scale=(14, 10))(ramp, {})
    assert torch.equal(same, ramp)


def test_resize_image_exact_halving_and_thread_invariance():
    # an exact 2x shrink is the rounded-up 2x2 mean, as OpenCV's INTER_AREA shortcut computes
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    out, _ = Resize(scale=(40, 32))(image, {})
    blocks = image.int().view(3, 32, 2, 40, 2).sum((2, 4))  # (3, 32, 40) sums of 2x2 blocks
    assert torch.equal(out.int(), (blocks + 2) >> 2)
    # single-threaded DataLoader workers must give the main process's pixels
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = Resize(scale=(211, 157))(image, {})
        torch.set_num_threads(max(2, threads))
        many, _ = Resize(scale=(211, 157))(image, {})
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_random_choice_resize_draws_every_scale_deterministically():
    scales = ((133, 80), (133, 72), (133, 64))
    t = RandomChoiceResize(scales=scales)
    image, target = _sample(48, 64)
    heights = set()
    for seed in range(30):
        a, _ = t(image, target, generator=torch.Generator().manual_seed(seed))
        b, _ = t(image, target, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
        heights.add(a.shape[1])
    assert heights == {80, 72, 64}


def _box_of(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_flip_moves_image_masks_and_boxes_together():
    h, w = 30, 40
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 5:12, 3:20] = True
    masks[1, 20:28, 25:39] = True
    image[0][masks[0]] = 200
    image[1][masks[1]] = 100
    boxes = torch.stack([_box_of(m) for m in masks])
    target = {"masks": masks, "boxes": boxes, "labels": torch.tensor([1, 0])}
    out, flipped = RandomFlip(prob=1.0)(image, target)
    assert torch.equal(out, image.flip(-1))
    for m in range(2):
        assert torch.equal(flipped["boxes"][m], _box_of(flipped["masks"][m]))
    assert bool((out[0][flipped["masks"][0]] == 200).all())
    assert bool((out[1][flipped["masks"][1]] == 100).all())
    assert torch.equal(flipped["boxes"][0], torch.tensor([w - 20.0, 5.0, w - 3.0, 12.0]))
    assert torch.equal(flipped["labels"], target["labels"])
    # twice is the identity
    back, back_target = RandomFlip(prob=1.0)(out, flipped)
    assert torch.equal(back, image) and torch.equal(back_target["boxes"], boxes)
    same, same_target = RandomFlip(prob=0.0)(image, target)
    assert torch.equal(same, image) and torch.equal(same_target["masks"], masks)


def test_flip_is_seeded_and_about_half_the_time():
    image, target = _sample()
    t = RandomFlip(prob=0.5)
    flips = []
    for seed in range(200):
        a, _ = t(image, target, generator=torch.Generator().manual_seed(seed))
        b, _ = t(image, target, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
        flips.append(not torch.equal(a, image))
    assert 70 < sum(flips) < 130


def test_normalize_values():
    image = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 3)
    out, _ = Normalize()(image, {})
    assert out.dtype == torch.float32 and out.shape == (3, 2, 3)
    mean = torch.tensor(IMAGENET_MEAN)
    std = torch.tensor(IMAGENET_STD)
    expected = (torch.tensor([0.0, 255.0, 128.0]) - mean) / std
    assert torch.equal(out[:, 0, 0], expected)
    # R channel of 0 is -123.675 / 58.395
    assert out[0, 1, 2].item() == pytest.approx(-2.1179039, abs=1e-6)
    assert out[1, 0, 0].item() == pytest.approx((255 - 116.28) / 57.12, abs=1e-6)


def test_compose_pipelines_are_deterministic():
    image, target = _sample(48, 64)
    train = build_train_transform(scales=((200, 120), (200, 96)), flip_prob=0.5)
    a = train(image, target, generator=torch.Generator().manual_seed(3))
    b = train(image, target, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])
    assert a[0].dtype == torch.float32
    ev = build_eval_transform(scale=(200, 120))
    out, out_target = ev(image, target)
    assert out.shape == (3, 120, 160) and out_target["boxes"].shape == (2, 4)
    single = build_train_transform(scales=((200, 120),), flip_prob=0.0)
    assert isinstance(single.transforms[0], Resize)


def test_invalid_arguments_and_repr():
    with pytest.raises(ValueError):
        Resize(scale=(0, 10))
    with pytest.raises(ValueError):
        RandomChoiceResize(scales=())
    with pytest.raises(ValueError):
        RandomFlip(prob=1.5)
    with pytest.raises(ValueError):
        rescale_size((0, 10), (100, 50))
    t = Compose(transforms=(Resize(scale=(1333, 800)), RandomFlip(prob=0.5), Normalize()))
    assert "Resize(scale=(1333, 800))" in repr(t) and "RandomFlip(prob=0.5)" in repr(t)
