"""solo_fast.ops.matrix_nms / batched_matrix_nms: every backend against the reference (whose own
behaviour tests/ops/test_matrix_nms.py holds to mmdetection), packed masks in, and the compiled
and Triton building blocks (pack, popcount, decay) on their own."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from solo_fast.ops import PackedMasks, batched_matrix_nms, matrix_nms
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import (
    matrix_nms_reference,
    pack_masks_reference,
    unpack_masks_reference,
)
from tests.ops.helpers import require_backend
from tests.ops.test_matrix_nms import CASES, SCORE_TOL, _blocks

# N=candidates, B=images, H, W=mask size, P=H*W, Wd=packed words = ceil(P / 64)


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


_require = functools.partial(require_backend, "matrix_nms")


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
        # docs/algorithms.md §11.2: two empty masks (of *different* classes) make every score NaN
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
