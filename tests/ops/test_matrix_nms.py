"""solo_fast.ops.reference.matrix_nms_reference against mmdetection's ``mask_matrix_nms``
(tests/fixtures/mmdet/matrix_nms.pt) and the behaviours it defines where mmdetection does not;
then the argument checks of solo_fast.ops.matrix_nms / batched_matrix_nms. Every backend against
the reference: tests/ops/test_matrix_nms_backends.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from solo_fast.ops import PackedMasks, batched_matrix_nms, matrix_nms
from solo_fast.ops.reference import (
    matrix_nms_reference,
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
    # docs/algorithms.md §11: A (2x2) inside B (2x3, IoU 2/3), C disjoint, one class, scores
    # 0.9 / 0.8 / 0.7
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
    # docs/algorithms.md §11, mmdetection v2's unit test: 1000 identical masks of score 1
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
    # mmdetection: comp = 1 gives 0/0 = NaN, which sorts first (docs/algorithms.md §11.2); here the
    # decay is 0
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
    # docs/algorithms.md §11.2: two identical 4-pixel masks; areas of 8 make IoU 1/3 instead of 1
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
# Argument checks of the public ops (every backend shares them).

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
