"""solo_fast.ops.reference.matrix_nms_reference against mmdetection's ``mask_matrix_nms``
(tests/fixtures/mmdet/matrix_nms.pt) and the behaviours it defines where mmdetection does not;
then solo_fast.ops.matrix_nms / batched_matrix_nms, every backend against that reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from solo_fast.ops import PackedMasks, available_backends, batched_matrix_nms, matrix_nms
from solo_fast.ops._backend import choose_backend
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import (
    matrix_nms_reference,
    pack_masks_reference,
    unpack_masks_reference,
)

# N=candidates, B=images, H, W=mask size, P=H*W, Wd=packed words = ceil(P / 64)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmdet" / "matrix_nms.pt"
SCORE_TOL = {"atol": 1e-6, "rtol": 0.0}  # fixtures README §0: matrix-NMS scores


def _cases() -> list[dict]:
    return torch.load(FIXTURE, weights_only=True)["cases"]


CASES = _cases()


def _run(case: dict, **overrides):
    inputs = case["inputs"]
    kwargs = {**case["kwargs"], **overrides}
    return matrix_nms_reference(inputs["masks"], inputs["labels"], inputs["scores"],
                                mask_area=inputs.get("mask_area"), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_mmdet(case):
    scores, labels, masks, keep_inds = _run(case)
    expected = case["outputs"]
    assert torch.equal(keep_inds, expected["keep_inds"])
    assert torch.equal(labels, expected["labels"])
    assert torch.equal(masks, expected["masks"])
    assert scores.dtype == expected["scores"].dtype
    torch.testing.assert_close(scores, expected["scores"], **SCORE_TOL)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_decayed_scores_match_mmdet(case):
    # README §1 "debug": the same call without filter and max_num gives every decayed score
    scores, _, _, keep_inds = _run(case, filter_thr=-1, max_num=-1)
    assert torch.equal(keep_inds, case["debug"]["decayed_keep_inds"])
    torch.testing.assert_close(scores, case["debug"]["decayed_scores"], **SCORE_TOL)


def _blocks(shape, *boxes) -> torch.Tensor:
    """(len(boxes), H, W) bool masks, each the rectangle (y1, x1, y2, x2) (exclusive ends)."""
    masks = torch.zeros(len(boxes), *shape, dtype=torch.bool)
    for mask, (y1, x1, y2, x2) in zip(masks, boxes):
        mask[y1:y2, x1:x2] = True
    return masks


def test_worked_example():
    # SPEC §10: A (2x2) inside B (2x3, IoU 2/3), C disjoint, one class, scores 0.9 / 0.8 / 0.7
    masks = _blocks((6, 8), (0, 0, 2, 2), (0, 0, 2, 3), (4, 5, 6, 8))
    scores, labels, out_masks, keep_inds = matrix_nms_reference(
        masks, torch.zeros(3, dtype=torch.int64), torch.tensor([0.9, 0.8, 0.7]))
    assert keep_inds.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.8 * math.exp(-2 * (2 / 3) ** 2)]),
                               **SCORE_TOL)
    assert abs(scores[2].item() - 0.328890) < 1e-6
    assert torch.equal(out_masks, masks[[0, 2, 1]])
    assert labels.tolist() == [0, 0, 0]


def test_thousand_identical_masks_keep_one():
    # SPEC §10, mmdetection v2's unit test: 1000 identical masks of score 1
    masks = torch.ones(1000, 8, 8, dtype=torch.bool)
    labels = torch.zeros(1000, dtype=torch.int64)
    kwargs = {"nms_pre": 500, "max_num": 100, "kernel": "gaussian", "sigma": 2.0}
    scores, _, out_masks, keep_inds = matrix_nms_reference(
        masks, labels, torch.ones(1000), filter_thr=0.5, **kwargs)
    assert scores.tolist() == [1.0] and keep_inds.tolist() == [0] and out_masks.shape == (1, 8, 8)
    # without the filter: the 499 others of the nms_pre kept decay to exp(-2)
    scores, _, _, keep_inds = matrix_nms_reference(masks, labels, torch.ones(1000),
                                                   filter_thr=-1, **kwargs)
    assert len(scores) == 100 and scores[0].item() == 1.0
    torch.testing.assert_close(scores[1:], torch.full((99,), math.exp(-2)), **SCORE_TOL)
    assert keep_inds.tolist() == list(range(100))


def test_ties_are_ordered_by_input_index():
    # identical masks with equal scores: the first by index survives, the others decay to e^-2
    masks = torch.ones(4, 5, 5, dtype=torch.bool)
    scores, _, _, keep_inds = matrix_nms_reference(masks, torch.zeros(4, dtype=torch.int64),
                                                   torch.full((4,), 0.5))
    assert keep_inds.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(scores, torch.tensor([0.5] + [0.5 * math.exp(-2)] * 3),
                               **SCORE_TOL)
    # many disjoint candidates with one score: nothing decays and the order is the input order
    num = 3000
    masks = torch.zeros(num, 1, num, dtype=torch.bool)
    masks[torch.arange(num), 0, torch.arange(num)] = True
    scores, _, _, keep_inds = matrix_nms_reference(masks, torch.zeros(num, dtype=torch.int64),
                                                   torch.full((num,), 0.25))
    assert torch.equal(keep_inds, torch.arange(num))
    assert torch.equal(scores, torch.full((num,), 0.25))


def test_ties_keep_input_order_through_both_sorts():
    # B (0.8) decays below C and D, which tie at 0.5 in both sorts and keep their input order
    masks = _blocks((4, 12), (0, 0, 4, 4), (0, 0, 4, 4), (0, 4, 4, 8), (0, 8, 4, 12))
    labels = torch.tensor([0, 0, 1, 2])
    scores, _, _, keep_inds = matrix_nms_reference(masks, labels,
                                                   torch.tensor([0.9, 0.8, 0.5, 0.5]))
    assert keep_inds.tolist() == [0, 2, 3, 1]


def test_linear_identical_masks_decay_to_zero_not_nan():
    # mmdetection: comp = 1 gives 0/0 = NaN, which sorts first (SPEC §18.14); here the decay is 0
    masks = torch.ones(3, 6, 6, dtype=torch.bool)
    labels = torch.zeros(3, dtype=torch.int64)
    scores, _, _, keep_inds = matrix_nms_reference(masks, labels, torch.tensor([0.9, 0.8, 0.7]),
                                                   kernel="linear")
    assert not scores.isnan().any()
    assert keep_inds.tolist() == [0, 1, 2]
    assert scores.tolist() == [pytest.approx(0.9), 0.0, 0.0]
    scores, _, _, keep_inds = matrix_nms_reference(masks, labels, torch.tensor([0.9, 0.8, 0.7]),
                                                   kernel="linear", filter_thr=0.05)
    assert keep_inds.tolist() == [0]
    # an identical pair in another class does not disturb the linear decay of the first class
    masks = torch.cat([masks, _blocks((6, 6), (0, 0, 3, 6))])
    labels = torch.tensor([1, 1, 1, 0])
    scores, _, _, keep_inds = matrix_nms_reference(
        masks, labels, torch.tensor([0.9, 0.8, 0.7, 0.6]), kernel="linear")
    assert keep_inds.tolist() == [0, 3, 1, 2] and not scores.isnan().any()


def test_mask_area_is_used_as_given():
    # SPEC §18.16: two identical 4-pixel masks; areas of 8 make IoU 1/3 instead of 1
    masks = _blocks((4, 4), (0, 0, 2, 2), (0, 0, 2, 2))
    labels, scores = torch.zeros(2, dtype=torch.int64), torch.tensor([0.9, 0.8])
    default = matrix_nms_reference(masks, labels, scores)[0]
    given = matrix_nms_reference(masks, labels, scores, mask_area=torch.tensor([8.0, 8.0]))[0]
    torch.testing.assert_close(default[1], torch.tensor(0.8 * math.exp(-2)), **SCORE_TOL)
    torch.testing.assert_close(given[1], torch.tensor(0.8 * math.exp(-2 / 9)), **SCORE_TOL)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32])
def test_empty_input(mask_dtype):
    scores, labels, masks, keep_inds = matrix_nms_reference(
        torch.zeros(0, 7, 9, dtype=mask_dtype), torch.zeros(0, dtype=torch.int64),
        torch.zeros(0), filter_thr=0.05, nms_pre=500, max_num=100)
    assert scores.shape == (0,) and scores.dtype == torch.float32
    assert labels.shape == (0,) and labels.dtype == torch.int64
    assert masks.shape == (0, 7, 9) and masks.dtype == mask_dtype
    assert keep_inds.shape == (0,) and keep_inds.dtype == torch.int64


def test_everything_filtered_gives_empty_results():
    masks = _blocks((4, 4), (0, 0, 2, 2), (2, 2, 4, 4))
    scores, labels, out_masks, keep_inds = matrix_nms_reference(
        masks, torch.tensor([0, 1]), torch.tensor([0.2, 0.1]), filter_thr=0.5)
    assert scores.shape == labels.shape == keep_inds.shape == (0,)
    assert out_masks.shape == (0, 4, 4) and out_masks.dtype == torch.bool
    assert keep_inds.dtype == torch.int64


@pytest.mark.parametrize("arguments,kwargs,match", [
    ((torch.ones(3, 16, dtype=torch.bool), torch.zeros(3, dtype=torch.int64), torch.ones(3)), {},
     r"masks must be 3-D .*got shape \(3, 16\)"),
    ((torch.ones(3, 4, 4, dtype=torch.bool), torch.zeros(2, dtype=torch.int64), torch.ones(3)),
     {}, r"labels must have shape \(3,\).*got \(2,\)"),
    ((torch.ones(3, 4, 4, dtype=torch.bool), torch.zeros(3, dtype=torch.int64), torch.ones(3, 1)),
     {}, r"scores must have shape \(3,\).*got \(3, 1\)"),
    ((torch.ones(3, 4, 4, dtype=torch.bool), torch.zeros(3, dtype=torch.int64), torch.ones(3)),
     {"mask_area": torch.ones(4)}, r"mask_area must have shape \(3,\).*got \(4,\)"),
    ((torch.ones(3, 4, 4, dtype=torch.bool), torch.zeros(3, dtype=torch.int64), torch.ones(3)),
     {"kernel": "box"}, r"kernel must be one of \('gaussian', 'linear'\), got 'box'"),
    ((torch.ones(0, 4, 4, dtype=torch.bool), torch.zeros(0, dtype=torch.int64), torch.ones(0)),
     {"kernel": "Gaussian"}, r"kernel must be one of"),
])
def test_bad_inputs(arguments, kwargs, match):
    with pytest.raises(ValueError, match=match):
        matrix_nms_reference(*arguments, **kwargs)


# ----------------------------------------------------------------------------------------------
# The fused op: every backend against the reference. Scores are held to SCORE_TOL (1e-6
# absolute): the fused kernels evaluate exp with the C library (or the GPU's), the reference with
# torch's vectorised exp, which may differ in the last bit. Everything else must be equal.

CPU_BACKENDS = ["cpu", "triton"]


def make_nms_inputs(num: int, size: tuple[int, int], *, num_classes: int = 3, seed: int = 0,
                    ties: bool = False, device: str = "cpu"):
    """Random (masks, labels, scores): rectangles and ragged blobs of random sizes, every mask
    non-empty, candidate 1 identical to candidate 0 and candidate 2 nested inside it (same
    label), and with ``ties`` scores on a coarse grid so that many are equal."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size

    def draw(high):
        return int(torch.randint(high, (1,), generator=generator))

    masks = torch.zeros(num, height, width, dtype=torch.bool)
    for k in range(num):
        y1, x1 = draw(height), draw(width)
        y2, x2 = y1 + 1 + draw(height - y1), x1 + 1 + draw(width - x1)
        masks[k, y1:y2, x1:x2] = True
        if k % 3 == 2:  # ragged: a random subset of the box, never empty
            masks[k] &= torch.rand(height, width, generator=generator) > 0.4
            masks[k, y1, x1] = True
    labels = torch.randint(num_classes, (num,), generator=generator)
    if num >= 3:
        masks[1] = masks[0]
        masks[2] = masks[0] & (torch.rand(height, width, generator=generator) > 0.5)
        masks[2].view(-1)[masks[0].view(-1).nonzero()[0]] = True
        labels[1] = labels[2] = labels[0]
    scores = torch.rand(num, generator=generator)
    if ties:
        scores = (scores * 6).round() / 6
    return masks.to(device), labels.to(device), scores.to(device)


def _require(backend: str, device: str = "cpu") -> None:
    # A backend that fell back to the reference would compare the reference with itself.
    assert choose_backend("matrix_nms", torch.device(device), backend) == backend, (
        f"backend {backend} is not available on {device}: {available_backends(device)}")


def _assert_same(actual, expected):
    scores, labels, masks, keep_inds = actual
    assert torch.equal(keep_inds, expected[3]), (keep_inds, expected[3])
    assert torch.equal(labels, expected[1]) and labels.dtype == expected[1].dtype
    assert torch.equal(masks, expected[2]) and masks.dtype == expected[2].dtype
    assert scores.dtype == expected[0].dtype
    torch.testing.assert_close(scores, expected[0], equal_nan=True, **SCORE_TOL)


def _compare(backend, masks, labels, scores, **kwargs):
    expected = matrix_nms_reference(masks, labels, scores, **kwargs)
    actual = matrix_nms(masks, labels, scores, backend=backend, **kwargs)
    _assert_same(actual, expected)
    return actual


OPTIONS = [
    {},
    {"filter_thr": 0.3, "nms_pre": 25, "max_num": 10},
    {"filter_thr": 0.05, "max_num": 7, "sigma": 0.5},
    {"nms_pre": 1, "sigma": 0.0},
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num", [0, 1, 2, 3, 40])
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "limits", "sigma_half", "pre1_sigma0"])
def test_matches_reference(backend, num, kernel, options):
    _require(backend)
    masks, labels, scores = make_nms_inputs(num, (23, 37), seed=num)
    _compare(backend, masks, labels, scores, kernel=kernel, **options)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("num_classes", [1, 7])
def test_many_candidates_with_partial_last_word(kernel, ties, num_classes):
    # 23 x 37 = 851 pixels: 13 full words and a last one of 19 bits
    _require("cpu")
    masks, labels, scores = make_nms_inputs(300, (23, 37), num_classes=num_classes, seed=3,
                                            ties=ties)
    _compare("cpu", masks, labels, scores, kernel=kernel)
    _compare("cpu", masks, labels, scores, kernel=kernel, filter_thr=0.2, nms_pre=200,
             max_num=90)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("area_dtype", [torch.float32, torch.float64])
def test_mask_area_given(backend, area_dtype):
    _require(backend)
    masks, labels, scores = make_nms_inputs(30, (9, 13), seed=5)
    generator = torch.Generator().manual_seed(1)
    # areas at least the pixel counts, as a caller's rescaled areas would be
    areas = masks.sum((1, 2)).to(area_dtype) * (1 + torch.rand(30, generator=generator,
                                                               dtype=area_dtype))
    for kernel in ("gaussian", "linear"):
        scores_out = _compare(backend, masks, labels, scores, kernel=kernel, mask_area=areas)[0]
        assert scores_out.dtype == torch.promote_types(scores.dtype, area_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32])
def test_mask_dtypes(backend, mask_dtype):
    _require(backend)
    masks, labels, scores = make_nms_inputs(12, (7, 9), seed=2)
    masks = masks.to(mask_dtype)
    if mask_dtype == torch.uint8:
        masks = masks * 255  # any nonzero byte is inside, as `!= 0`
        expected = matrix_nms_reference(masks != 0, labels, scores)
        actual = matrix_nms(masks, labels, scores, backend=backend)
        _assert_same(actual[:2] + (actual[2] != 0,) + actual[3:], expected)
    else:
        _compare(backend, masks, labels, scores)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fused_matches_mmdet(backend, case):
    _require(backend)
    inputs, expected = case["inputs"], case["outputs"]
    actual = matrix_nms(inputs["masks"], inputs["labels"], inputs["scores"],
                        mask_area=inputs.get("mask_area"), backend=backend, **case["kwargs"])
    _assert_same(actual, (expected["scores"], expected["labels"], expected["masks"],
                          expected["keep_inds"]))


def _special_cases():
    ones = torch.ones(3, 6, 6, dtype=torch.bool)
    zeros3 = torch.zeros(3, dtype=torch.int64)
    two_empty = torch.zeros(3, 4, 4, dtype=torch.bool)
    two_empty[1, :2, :2] = True
    return {
        "worked_example": (_blocks((6, 8), (0, 0, 2, 2), (0, 0, 2, 3), (4, 5, 6, 8)), zeros3,
                           torch.tensor([0.9, 0.8, 0.7]), {}),
        "tied_identical": (torch.ones(4, 5, 5, dtype=torch.bool), torch.zeros(4, dtype=torch.int64),
                           torch.full((4,), 0.5), {}),
        "linear_identical": (ones, zeros3, torch.tensor([0.9, 0.8, 0.7]), {"kernel": "linear"}),
        "linear_identical_filtered": (ones, zeros3, torch.tensor([0.9, 0.8, 0.7]),
                                      {"kernel": "linear", "filter_thr": 0.05}),
        "area_as_given": (_blocks((4, 4), (0, 0, 2, 2), (0, 0, 2, 2)),
                          torch.zeros(2, dtype=torch.int64), torch.tensor([0.9, 0.8]),
                          {"mask_area": torch.tensor([8.0, 8.0])}),
        # SPEC §18.15: two empty masks (of *different* classes) make every score NaN
        "two_empty_masks": (two_empty, torch.tensor([0, 1, 2]), torch.tensor([0.9, 0.8, 0.7]), {}),
        "two_empty_masks_same_class": (two_empty, zeros3, torch.tensor([0.9, 0.8, 0.7]), {}),
        # given zero areas: 0/0 only for disjoint masks (0 and 2 overlap, 1 and 3 do not)
        "zero_areas_given": (
            _blocks((4, 8), (0, 0, 2, 2), (2, 2, 4, 4), (0, 0, 2, 2), (0, 4, 4, 8)),
            torch.tensor([0, 1, 0, 2]), torch.tensor([0.9, 0.8, 0.7, 0.6]),
            {"mask_area": torch.tensor([0.0, 4.0, 0.0, 8.0])}),
        "zero_areas_given_disjoint": (
            _blocks((4, 8), (0, 0, 2, 2), (2, 2, 4, 4), (0, 4, 4, 8)), torch.tensor([0, 1, 2]),
            torch.tensor([0.9, 0.8, 0.7]), {"mask_area": torch.tensor([0.0, 4.0, 0.0])}),
        "nan_area": (ones, torch.tensor([0, 1, 1]), torch.tensor([0.9, 0.8, 0.7]),
                     {"mask_area": torch.tensor([36.0, math.nan, 36.0])}),
        "nan_score": (ones, zeros3, torch.tensor([0.9, math.nan, 0.7]), {}),
        "huge_sigma": (ones, zeros3, torch.tensor([0.9, 0.8, 0.7]), {"sigma": 1e6}),
        "one_empty_mask": (two_empty[:2], torch.zeros(2, dtype=torch.int64),
                           torch.tensor([0.9, 0.8]), {}),
    }


SPECIAL = _special_cases()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(SPECIAL))
def test_special_cases_match_reference(backend, name):
    _require(backend)
    masks, labels, scores, kwargs = SPECIAL[name]
    actual = _compare(backend, masks, labels, scores, **kwargs)
    if name.startswith("two_empty") or name in ("nan_area", "zero_areas_given_disjoint"):
        assert actual[0].isnan().all()


def test_cpu_result_does_not_depend_on_the_thread_count():
    _require("cpu")
    masks, labels, scores = make_nms_inputs(200, (23, 37), num_classes=2, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = matrix_nms(masks, labels, scores, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, matrix_nms(masks, labels, scores, backend="cpu")):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# The batched form: per image equal to matrix_nms on that image's candidates.

def _per_image(masks, labels, scores, image_ids, num_images, **kwargs):
    parts = []
    for b in range(num_images):
        rows = torch.nonzero(image_ids == b).flatten()
        out = matrix_nms(masks[rows], labels[rows], scores[rows], backend="reference",
                         **{k: (v[rows] if k == "mask_area" else v) for k, v in kwargs.items()})
        parts.append((*out[:3], rows[out[3]]))
    return parts


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("kwargs", [
    {}, {"filter_thr": 0.2, "nms_pre": 9, "max_num": 4},
    {"kernel": "linear", "max_num": 6}, {"mask_area": "given", "sigma": 1.0}])
def test_batched_equals_per_image_calls(backend, kwargs):
    _require(backend)
    num_images = 5
    masks, labels, scores = make_nms_inputs(60, (11, 15), seed=7, ties=True)
    generator = torch.Generator().manual_seed(3)
    image_ids = torch.randint(num_images, (60,), generator=generator)
    image_ids[image_ids == 2] = 4  # image 2 has no candidates
    image_ids[:3] = 1  # the identical and nested candidates share an image
    if kwargs.get("mask_area") == "given":
        kwargs = {**kwargs, "mask_area": masks.sum((1, 2)).double() + 1}
    out = batched_matrix_nms(masks, labels, scores, image_ids, num_images=num_images,
                             backend=backend, **kwargs)
    counts = out[4]
    assert counts.dtype == torch.int64 and counts.shape == (num_images,) and counts[2] == 0
    expected = _per_image(masks, labels, scores, image_ids, num_images, **kwargs)
    assert counts.tolist() == [len(e[3]) for e in expected]
    for b, chunk in enumerate(zip(*(torch.split(t, counts.tolist()) for t in out[:4]))):
        if len(expected[b][3]) == 0:
            # matrix_nms returns an image without candidates in the input scores' dtype; the
            # flat batch has one dtype, that of the decayed scores
            assert len(chunk[3]) == 0
            continue
        _assert_same(chunk, expected[b])


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_batched_empty(backend):
    _require(backend)
    masks = torch.zeros(0, 5, 7, dtype=torch.bool)
    for num_images in (0, 3):
        scores, labels, out_masks, keep_inds, counts = batched_matrix_nms(
            masks, torch.zeros(0, dtype=torch.int64), torch.zeros(0),
            torch.zeros(0, dtype=torch.int64), num_images=num_images, backend=backend)
        assert scores.shape == labels.shape == keep_inds.shape == (0,)
        assert out_masks.shape == (0, 5, 7) and keep_inds.dtype == torch.int64
        assert counts.tolist() == [0] * num_images


# ----------------------------------------------------------------------------------------------
# Packed masks in (PackedMasks, as dynamic_mask_scores(pack_masks=True) writes them): exactly the
# results of the same call with the bool masks, the kept masks returned packed.

def _assert_same_packed(actual, expected):
    """actual (from PackedMasks) equals expected (from the bool masks), bit for bit."""
    packed = actual[2]
    assert isinstance(packed, PackedMasks)
    assert (packed.height, packed.width) == tuple(expected[2].shape[1:])
    assert torch.equal(packed.bits, pack_masks_reference(expected[2]))
    assert torch.equal(unpack_masks_reference(*packed), expected[2])
    for a, b in zip(actual[:2] + actual[3:], expected[:2] + expected[3:]):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("num,size", [(0, (7, 9)), (1, (7, 9)), (40, (7, 9)), (40, (8, 8)),
                                      (40, (23, 37))], ids=lambda v: str(v))
@pytest.mark.parametrize("options", [
    {}, {"filter_thr": 0.3, "nms_pre": 25, "max_num": 10, "kernel": "linear"},
    {"mask_area": "given", "sigma": 1.0}], ids=["plain", "limits_linear", "area_given"])
def test_packed_masks_give_the_bool_masks_results(backend, num, size, options):
    _require(backend)
    masks, labels, scores = make_nms_inputs(num, size, seed=num + size[0], ties=True)
    if options.get("mask_area") == "given":
        options = {**options, "mask_area": masks.sum((1, 2)).double() + 1}
    packed = PackedMasks(pack_masks_reference(masks), *size)
    _assert_same_packed(matrix_nms(packed, labels, scores, backend=backend, **options),
                        matrix_nms(masks, labels, scores, backend=backend, **options))
    image_ids = torch.arange(num) % 3  # image 3 has no candidate
    _assert_same_packed(
        batched_matrix_nms(packed, labels, scores, image_ids, num_images=4, backend=backend,
                           **options),
        batched_matrix_nms(masks, labels, scores, image_ids, num_images=4, backend=backend,
                           **options))


_BITS = torch.zeros(3, 1, dtype=torch.int64)  # three 4 x 4 masks: one word each


@pytest.mark.parametrize("masks,error,match", [
    (PackedMasks(_BITS.int(), 4, 4), TypeError,
     "masks.bits must be int64 .64 pixels a word., got torch.int32"),
    (PackedMasks(torch.zeros(3, 2, dtype=torch.int64), 4, 4), ValueError,
     r"masks.bits must have shape \(N, Wd\) with Wd = ceil\(height \* width / 64\) = "
     r"ceil\(4 \* 4 / 64\) = 1, got \(3, 2\)"),
    (PackedMasks(_BITS[:, 0], 4, 4), ValueError, r"masks.bits must have shape .*got \(3,\)"),
    (PackedMasks(_BITS, 4, 20), ValueError, r"Wd = ceil\(height \* width / 64\) .* = 2"),
    (PackedMasks(_BITS, -4, 4), ValueError, "masks.height must be an int >= 0, got -4"),
    (PackedMasks(_BITS, 4, 4.0), ValueError, "masks.width must be an int >= 0, got 4.0"),
    (PackedMasks(_BITS, True, 4), ValueError, "masks.height must be an int >= 0, got True"),
    (PackedMasks(_BITS.numpy(), 4, 4), TypeError,
     "masks.bits must be a torch.Tensor, got ndarray"),
    (PackedMasks(_BITS[:2], 4, 4), ValueError,
     r"labels must have shape \(2,\), one entry per mask, got \(3,\)"),
    (PackedMasks(_BITS.to("meta"), 4, 4), ValueError, "labels is on cpu but masks is on meta"),
    ((_BITS, 4, 4), TypeError, "masks must be a torch.Tensor or a PackedMasks, got tuple"),
])
@pytest.mark.parametrize("batched", [False, True])
def test_bad_packed_masks_name_the_argument(masks, error, match, batched):
    _, labels, scores = _good()
    with pytest.raises(error, match=match):
        if batched:
            batched_matrix_nms(masks, labels, scores, torch.zeros(3, dtype=torch.int64),
                               num_images=1)
        else:
            matrix_nms(masks, labels, scores)


# ----------------------------------------------------------------------------------------------
# The ops themselves.

def _numpy_pack(masks: torch.Tensor) -> np.ndarray:
    flat = masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2]).numpy() != 0  # (N, P)
    words = (flat.shape[1] + 63) // 64
    bits = np.zeros((flat.shape[0], words * 64), dtype=bool)
    bits[:, :flat.shape[1]] = flat
    return np.packbits(bits, axis=1, bitorder="little").view("<i8")  # (N, Wd)


PACK_OPS = [pytest.param("compiled", marks=pytest.mark.skipif(not has_ops(), reason="no _C")),
            "triton"]


def _pack_op(which):
    return (torch.ops.solo_fast.matrix_nms_pack if which == "compiled"
            else torch.ops.solo_fast.matrix_nms_triton_pack)


def _decay_op(which):
    return (torch.ops.solo_fast.matrix_nms_decay if which == "compiled"
            else torch.ops.solo_fast.matrix_nms_triton_decay)


@pytest.mark.parametrize("which", PACK_OPS)
@pytest.mark.parametrize("shape", [(0, 3, 5), (1, 1, 1), (3, 8, 8), (5, 23, 37), (2, 1, 129)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_pack_matches_numpy(which, shape, dtype):
    if which == "triton":
        _require("triton")
    generator = torch.Generator().manual_seed(shape[-1])
    masks = torch.randint(0, 4, shape, generator=generator, dtype=torch.uint8)
    masks = (masks > 1) if dtype == torch.bool else masks * 85  # uint8: 0, 85, 170, 255
    packed = _pack_op(which)(masks)
    assert packed.dtype == torch.int64 and packed.shape == (shape[0], (shape[1] * shape[2] + 63)
                                                             // 64)
    assert np.array_equal(packed.numpy(), _numpy_pack(masks))
    if which == "compiled":
        counts = torch.ops.solo_fast.matrix_nms_popcount(packed)
        assert torch.equal(counts, (masks != 0).sum((1, 2)))
    # a strided view packs as its contiguous copy
    assert torch.equal(_pack_op(which)(masks.transpose(1, 2)),
                       _pack_op(which)(masks.transpose(1, 2).contiguous()))


@pytest.mark.parametrize("which", PACK_OPS)
def test_decay_segments_are_independent(which):
    if which == "triton":
        _require("triton")
    masks, labels, _ = make_nms_inputs(40, (9, 11), num_classes=2, seed=4)
    packed = _pack_op(which)(masks)
    areas = masks.sum((1, 2)).float()
    segments = torch.tensor([0, 0, 13, 13, 40])  # two empty segments
    for kernel in (0, 1):
        whole = _decay_op(which)(packed, labels, areas, segments, kernel, 2.0)
        assert whole.dtype == torch.float32 and whole.shape == (40,)
        for begin, end in ((0, 13), (13, 40)):
            alone = _decay_op(which)(packed[begin:end], labels[begin:end], areas[begin:end],
                                     torch.tensor([0, end - begin]), kernel, 2.0)
            assert torch.equal(whole[begin:end], alone)
        assert (whole <= 1).all() and whole[0] == 1 and whole[13] == 1


@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.solo_fast.matrix_nms_pack(torch.ones(3, 4)), "masks must be 3-D"),
    (lambda: torch.ops.solo_fast.matrix_nms_pack(torch.ones(3, 4, 4)), "bool or uint8"),
    (lambda: torch.ops.solo_fast.matrix_nms_decay(
        torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), torch.ones(3),
        torch.tensor([0, 2]), 0, 2.0), "segments must start at 0 and end at n = 3"),
    (lambda: torch.ops.solo_fast.matrix_nms_decay(
        torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), torch.ones(3),
        torch.tensor([0, 2, 1, 3]), 0, 2.0), "segments must be non-decreasing"),
    (lambda: torch.ops.solo_fast.matrix_nms_decay(
        torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int32), torch.ones(3),
        torch.tensor([0, 3]), 0, 2.0), "labels must be int64"),
    (lambda: torch.ops.solo_fast.matrix_nms_decay(
        torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
        torch.ones(3, dtype=torch.float16), torch.tensor([0, 3]), 0, 2.0),
     "areas must be float32 or float64"),
    (lambda: torch.ops.solo_fast.matrix_nms_decay(
        torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), torch.ones(3),
        torch.tensor([0, 3]), 2, 2.0), "kernel must be 0 .gaussian. or 1 .linear., got 2"),
])
def test_compiled_ops_check_their_inputs(call, match):
    assert has_ops(), "solo_fast._C is not built"
    with pytest.raises(RuntimeError, match=match):
        call()


def test_opcheck_compiled_ops():
    assert has_ops(), "solo_fast._C is not built"
    masks, labels, _ = make_nms_inputs(9, (5, 13), seed=1)
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_pack.default, (masks,))
    packed = torch.ops.solo_fast.matrix_nms_pack(masks)
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_popcount.default, (packed,))
    areas = masks.sum((1, 2)).double()
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_decay.default,
                          (packed, labels, areas, torch.tensor([0, 4, 9]), 1, 2.0))


def test_opcheck_triton_ops():
    _require("triton")
    masks, labels, _ = make_nms_inputs(9, (5, 13), seed=1)
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_triton_pack.default, (masks,))
    packed = torch.ops.solo_fast.matrix_nms_triton_pack(masks)
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_triton_decay.default,
                          (packed, labels, masks.sum((1, 2)).float(), torch.tensor([0, 4, 9]), 0,
                           2.0))


def _good():
    return torch.ones(3, 4, 4, dtype=torch.bool), torch.zeros(3, dtype=torch.int64), torch.ones(3)


@pytest.mark.parametrize("change,error,match", [
    ({"masks": torch.ones(3, 16, dtype=torch.bool)}, ValueError,
     r"masks must be 3-D \(N, H, W\), got shape \(3, 16\)"),
    ({"masks": torch.ones(3, 4, 4, dtype=torch.int32)}, TypeError,
     "masks must be bool, uint8 or floating .0/1., got torch.int32"),
    ({"labels": torch.zeros(2, dtype=torch.int64)}, ValueError,
     r"labels must have shape \(3,\), one entry per mask, got \(2,\)"),
    ({"labels": torch.zeros(3)}, TypeError, "labels must be an integer dtype, got torch.float32"),
    ({"scores": torch.ones(3, 1)}, ValueError, r"scores must have shape \(3,\).*got \(3, 1\)"),
    ({"scores": torch.ones(3, dtype=torch.int64)}, TypeError, "scores must be floating"),
    ({"mask_area": torch.ones(4)}, ValueError, r"mask_area must have shape \(3,\).*got \(4,\)"),
    ({"mask_area": torch.ones(3, dtype=torch.float16)}, TypeError,
     "mask_area must be float32 or float64, got torch.float16"),
    ({"mask_area": [1.0, 1.0, 1.0]}, TypeError, "mask_area must be a torch.Tensor, got list"),
    ({"scores": torch.ones(3, device="meta")}, ValueError,
     "scores is on meta but masks is on cpu"),
    ({"kernel": "box"}, ValueError,
     r"kernel must be one of \('gaussian', 'linear'\), got 'box'"),
    ({"sigma": -1.0}, ValueError, "sigma must be a finite number >= 0.*got -1.0"),
    ({"sigma": math.inf}, ValueError, "sigma must be a finite number >= 0"),
    ({"backend": "gpu"}, ValueError, "backend must be one of reference, cpu, cuda, triton"),
])
@pytest.mark.parametrize("batched", [False, True])
def test_bad_input_names_the_argument(change, error, match, batched):
    masks, labels, scores = _good()
    arguments = {"masks": masks, "labels": labels, "scores": scores, **change}
    positional = [arguments.pop(name) for name in ("masks", "labels", "scores")]
    with pytest.raises(error, match=match):
        if batched:
            batched_matrix_nms(*positional, torch.zeros(3, dtype=torch.int64), num_images=1,
                               **arguments)
        else:
            matrix_nms(*positional, **arguments)


@pytest.mark.parametrize("image_ids,num_images,error,match", [
    (torch.zeros(2, dtype=torch.int64), 1, ValueError, r"image_ids must have shape \(3,\)"),
    (torch.zeros(3, dtype=torch.int32), 1, TypeError, "image_ids must be int64, got torch.int32"),
    (torch.tensor([0, 1, 2]), 2, ValueError,
     r"image_ids must lie in \[0, num_images\) = \[0, 2\), got values in \[0, 2\]"),
    (torch.tensor([0, 0, 0]), -1, ValueError, "num_images must be an int >= 0, got -1"),
    ([0, 0, 0], 1, TypeError, "image_ids must be a torch.Tensor, got list"),
])
def test_batched_bad_images(image_ids, num_images, error, match):
    with pytest.raises(error, match=match):
        batched_matrix_nms(*_good(), image_ids, num_images=num_images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("num,size", [(0, (23, 37)), (1, (23, 37)), (40, (23, 37)),
                                      (300, (23, 37)), (500, (200, 272))])
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_gpu_matches_reference(backend, num, size, kernel):
    _require(backend, "cuda")
    masks, labels, scores = make_nms_inputs(num, size, num_classes=7, seed=num, device="cuda")
    _compare(backend, masks, labels, scores, kernel=kernel, nms_pre=400, max_num=100)
    for name, (m, lab, s, kwargs) in SPECIAL.items():
        kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        _compare(backend, m.cuda(), lab.cuda(), s.cuda(), **kwargs)
    for case in CASES:
        inputs = {k: v.cuda() for k, v in case["inputs"].items()}
        _compare(backend, inputs["masks"], inputs["labels"], inputs["scores"],
                 mask_area=inputs.get("mask_area"), **case["kwargs"])
