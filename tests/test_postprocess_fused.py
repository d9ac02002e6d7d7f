"""The fused post-processing (solo_fast.postprocess.fused, the default path) against the reference
path (``backend="reference"``, itself held to mmdetection in test_postprocess.py).

Tolerance: labels, keep order, masks and boxes must be equal; scores to 1e-6 absolute, because the
fused path sums each mask's probabilities in float64 where the reference sums in float32 (the
differences observed are ~1e-7).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torch import Tensor, nn

from solo_fast import ops
from solo_fast.config import TestConfig
from solo_fast.models.detector import SOLODetector
from solo_fast.models.solov2 import SOLOv2Output
from solo_fast.ops import PackedMasks, available_backends
from solo_fast.ops.reference import matrix_nms_reference, pack_masks_reference
from solo_fast.postprocess import (
    DecoupledSOLOPostProcessor,
    SOLOPostProcessor,
    SOLOv2PostProcessor,
    boxes_of_thresholded,
    encode_rle,
    fused,
    masks_to_boxes,
)
from tests.test_postprocess import (
    VARIANTS,
    _assert_empty,
    _load,
    _predict,
    _processor,
    _random_outputs,
    _raw_solov2,
    _sizes,
    _test_cfg,
)

# N=images, K=instances, M=candidates into matrix NMS, E=mask-feature channels, S=grid side,
# C=classes, H4, W4=stride-4 mask map, H0, W0=original size

SCORE_TOL = {"atol": 1e-6, "rtol": 0.0}
# The ops' backends the fused path is run with: "reference" is the ops' PyTorch reference
# (SOLO_FAST_BACKEND=reference; the processor's own backend="reference" is the reference PATH)
OP_BACKENDS = available_backends("cpu")
GRIDS = (10, 8, 6, 4, 3)
STRIDES = (8, 8, 16, 32, 32)
SIZES = {"image_sizes": [(256, 300), (200, 320), (240, 256)],
         "original_sizes": [(128, 150), (300, 480), (240, 256)]}


def _fused_processor(make, op_backend: str, monkeypatch):
    """``make(backend)`` -> a processor on the fused path with its ops on ``op_backend``."""
    if op_backend == "reference":
        monkeypatch.setenv("SOLO_FAST_BACKEND", "reference")
        return make(None)
    monkeypatch.delenv("SOLO_FAST_BACKEND", raising=False)
    return make(op_backend)


def _assert_same(results: list[dict], expected: list[dict]) -> None:
    assert len(results) == len(expected)
    for image, (result, target) in enumerate(zip(results, expected)):
        assert set(result) == {"masks", "labels", "scores", "boxes"}
        assert torch.equal(result["labels"], target["labels"]), f"image {image}"
        assert result["scores"].dtype == torch.float32
        torch.testing.assert_close(result["scores"], target["scores"], **SCORE_TOL)
        assert result["masks"].dtype == torch.bool
        assert torch.equal(result["masks"], target["masks"]), f"image {image}"
        assert torch.equal(result["boxes"], target["boxes"]), f"image {image}"


def _decode(encoded: list[dict], size: tuple[int, int]) -> Tensor:
    """RLE dicts -> (K, H, W) bool with pycocotools' decoder."""
    if not encoded:
        return torch.zeros(0, *size, dtype=torch.bool)
    rles = [{"size": rle["size"], "counts": rle["counts"].encode("ascii")} for rle in encoded]
    return torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).bool()  # (K, H, W)


# --------------------------------------------------------------------- golden head fixtures


@pytest.mark.parametrize("variant, op_backend",
                         [(variant, backend) for variant in VARIANTS for backend in OP_BACKENDS])
def test_fused_matches_reference_path_on_fixtures(variant, op_backend, monkeypatch):
    fixture = _load(variant)
    processor = _fused_processor(lambda b: _processor(fixture, backend=b), op_backend, monkeypatch)
    expected = _predict(fixture)
    assert sum(len(r["labels"]) for r in expected) >= 10
    _assert_same(_predict(fixture, processor=processor), expected)


def test_fused_heads_end_to_end_match_reference(monkeypatch):
    """Raw outputs of our heads (fixture weights) through both paths (SOLOv2 and Decoupled
    read raw logits here, not the prepared fixtures)."""
    from tests.models import test_decoupled_solo, test_solo, test_solov2

    modules = {"solo": test_solo, "solov2": test_solov2, "decoupled_solo": test_decoupled_solo,
               "decoupled_solo_light": test_decoupled_solo}
    for variant in VARIANTS:
        fixture = _load(variant)
        head = modules[variant]._fixture_head(fixture).eval()
        with torch.no_grad():
            outputs = head(fixture["inputs"]["feats"])
        sizes = _sizes(fixture)
        _assert_same(_processor(fixture, backend=None)(outputs, *sizes),
                     _processor(fixture)(outputs, *sizes))


# ------------------------------------------------------------------- random batched outputs


def _random_solov2(*, grids=GRIDS, canvas=(256, 320), classes=3, batch=3, channels=6, seed=0):
    """Raw SOLOv2 outputs with many candidates of smooth masks of all sizes."""
    generator = torch.Generator().manual_seed(seed)
    cls = [torch.randn(batch, classes, s, s, generator=generator) - 1.5 for s in grids]
    kernels = [torch.randn(batch, channels, s, s, generator=generator) for s in grids]
    coarse = torch.randn(batch, channels, 4, 5, generator=generator) * 3
    feats = torch.nn.functional.interpolate(coarse, size=(canvas[0] // 4, canvas[1] // 4),
                                            mode="bilinear")  # (N, E, H4, W4)
    return SOLOv2Output(kernels, cls, feats)


def _family_case(family: str, test_cfg: TestConfig):
    """(outputs, make(backend) -> processor) of a random 3-image batch."""
    kinds = {"solo": SOLOPostProcessor, "decoupled_solo": DecoupledSOLOPostProcessor,
             "solov2": SOLOv2PostProcessor}
    if family == "solov2":
        outputs = _random_solov2()
    else:
        outputs = _random_outputs(family, grids=GRIDS, canvas=(256, 320), batch=3)
    return outputs, lambda backend: kinds[family](test_cfg=test_cfg, num_grids=GRIDS,
                                                   strides=STRIDES, backend=backend)


# nms_pre and max_per_img below the candidate counts, so the per-image cut and the top-k matter
CUT_CFG = TestConfig(nms_pre=12, max_per_img=7)


@pytest.mark.parametrize("family,test_cfg", [
    ("solo", CUT_CFG), ("decoupled_solo", CUT_CFG), ("solov2", CUT_CFG),
    ("solov2", TestConfig(max_per_img=30))],  # nms_pre above every image's count: no cut
    ids=["solo", "decoupled_solo", "solov2", "solov2_no_cut"])
def test_fused_matches_reference_path_on_random_batches(family, test_cfg):
    outputs, make = _family_case(family, test_cfg)
    trace: list = []
    expected = make("reference")(outputs, **SIZES, trace=trace)
    into_nms = [len(t["nms_input"]["labels"]) for t in trace]
    assert min(into_nms) > 12 and all(len(r["labels"]) for r in expected), into_nms
    for image, result in enumerate(make(None)(outputs, **SIZES)):
        assert result["masks"].shape[1:] == SIZES["original_sizes"][image]
    _assert_same(make(None)(outputs, **SIZES), expected)


@pytest.mark.parametrize("family", ["solo", "decoupled_solo", "solov2"])
def test_small_chunks_give_the_same_results(family, monkeypatch):
    """Chunks of 5 and 3 masks (every chunk boundary inside an image) change nothing, and the
    final resize never holds more than one chunk of full-size masks."""
    outputs, make = _family_case(family, CUT_CFG)
    expected = make(None)(outputs, **SIZES)
    processor = make(None)
    seen = []
    resize = fused.resize_to_original

    def spy(soft, *args):
        seen.append(len(soft))
        return resize(soft, *args)

    monkeypatch.setattr(fused, "resize_to_original", spy)
    monkeypatch.setattr(fused, "MASK_CHUNK", 5)
    monkeypatch.setattr(fused, "RESIZE_CHUNK", 3)
    _assert_same(processor(outputs, **SIZES), expected)
    assert max(seen) == 3 and sum(seen) == sum(len(r["labels"]) for r in expected)


@pytest.mark.parametrize("family", ["solo", "decoupled_solo", "solov2"])
def test_an_image_without_candidates_in_a_batch(family):
    outputs, make = _family_case(family, CUT_CFG)
    cls = [t.clone() for t in outputs.cls_preds]
    for level in cls:
        level[1] = -20.0  # image 1: no class score above score_thr
    outputs = outputs._replace(cls_preds=cls)
    results = make(None)(outputs, **SIZES)
    _assert_same(results, make("reference")(outputs, **SIZES))
    assert len(results[0]["labels"]) and len(results[2]["labels"])
    _assert_empty(results[1:2], SIZES["original_sizes"][1:2])


def test_no_candidate_and_everything_filtered_give_empty_results():
    fixture = _load("solov2")
    outputs = fixture["eval"]["outputs"]
    image_sizes, original_sizes = _sizes(fixture)
    processor = _processor(fixture, backend=None)
    nothing = SOLOv2Output(outputs["mlvl_kernel_preds"],
                           [torch.full_like(t, -20.0) for t in outputs["mlvl_cls_preds"]],
                           outputs["mask_feats"])
    _assert_empty(processor(nothing, image_sizes, original_sizes), original_sizes)
    # every class score passes but every mask probability is 0.5: no mask has any area
    small = SOLOv2Output([torch.zeros_like(t) for t in outputs["mlvl_kernel_preds"]],
                         [torch.full_like(t, 5.0) for t in outputs["mlvl_cls_preds"]],
                         outputs["mask_feats"])
    _assert_empty(processor(small, image_sizes, original_sizes), original_sizes)
    for result in processor(small, image_sizes, original_sizes, mask_format="rle"):
        assert result["masks"] == [] and result["labels"].shape == (0,)


def test_fused_path_keeps_the_dtype_and_device_of_its_inputs():
    outputs, make = _family_case("solov2", CUT_CFG)
    double = SOLOv2Output([t.double() for t in outputs.kernel_preds],
                          [t.double() for t in outputs.cls_preds], outputs.mask_feats.double())
    fast, slow = make(None)(double, **SIZES), make("reference")(double, **SIZES)
    _assert_same(fast, slow)


# ----------------------------------------------------------------------------------- RLE


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("family", ["solo", "decoupled_solo", "solov2"])
def test_rle_decodes_to_the_bool_masks(family, backend):
    outputs, make = _family_case(family, CUT_CFG)
    dense = make(backend)(outputs, **SIZES)
    encoded = make(backend)(outputs, **SIZES, mask_format="rle")
    for image, (a, b) in enumerate(zip(encoded, dense)):
        size = SIZES["original_sizes"][image]
        assert isinstance(a["masks"], list) and len(a["masks"]) == len(b["labels"]) > 0
        for rle in a["masks"]:
            assert rle["size"] == list(size) and isinstance(rle["counts"], str)
        assert torch.equal(_decode(a["masks"], size), b["masks"])
        for key in ("labels", "scores", "boxes"):
            assert torch.equal(a[key], b[key]), f"image {image} {key}"
        json.dumps(a["masks"])  # COCO results are json


def test_encode_rle_of_known_masks():
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, 1:3, 2:4] = True
    masks[1, 3, 4] = True
    encoded = encode_rle(masks)
    # column-major runs: 0 x 9, 1 x 2, 0 x 2, 1 x 2, 0 x 5 for mask 0
    assert [rle["counts"] for rle in encoded][0] == mask_util.encode(
        np.asfortranarray(masks[0].numpy().astype(np.uint8)))["counts"].decode()
    assert torch.equal(_decode(encoded, (4, 5)), masks)
    assert mask_util.area([{"size": r["size"], "counts": r["counts"].encode()}
                           for r in encoded]).tolist() == [4, 1, 0]
    assert encode_rle(torch.zeros(0, 4, 5, dtype=torch.bool)) == []


# ------------------------------------------------------------- the cut and the NMS wrapper


def test_nms_pre_cut_takes_each_images_best_with_ties_by_index():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.7, 0.9, 0.5, 0.1, 0.5, 0.3])
    image = torch.tensor([1, 0, 1, 1, 2, 0, 1, 0, 0])
    # image 0: 1 (0.9), 5 (0.5), 7 (0.5), 8 (0.3); image 1: 3 (0.7), 0, 2 (0.5), 6; image 2: 4
    assert fused.nms_pre_cut(scores, image, 2).tolist() == [1, 5, 3, 0, 4]
    assert fused.nms_pre_cut(scores, image, 0).tolist() == [1, 5, 7, 8, 3, 0, 2, 6, 4]
    assert fused.nms_pre_cut(scores[:0], image[:0], 2).tolist() == []


def test_nms_pre_cut_equals_a_stable_sort_per_image():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (300,), generator=generator).float() / 5  # many ties
    image = torch.randint(0, 4, (300,), generator=generator)
    expected = []
    for n in range(4):
        members = [k for k in range(300) if image[k] == n]
        expected += sorted(members, key=lambda k: (-scores[k].item(), k))[:17]
    assert fused.nms_pre_cut(scores, image, 17).tolist() == expected


def _nms_masks_spy(monkeypatch) -> list:
    """Records the masks of every matrix_nms_by_image call of the fused path."""
    seen, real = [], fused.matrix_nms_by_image

    def spy(masks, *args, **kwargs):
        seen.append(masks)
        return real(masks, *args, **kwargs)

    monkeypatch.setattr(fused, "matrix_nms_by_image", spy)
    return seen


@pytest.mark.parametrize("op_backend", OP_BACKENDS)
def test_solov2_gives_matrix_nms_the_scoring_ops_packed_masks(op_backend, monkeypatch):
    """SOLOv2's fused path hands matrix NMS the rows of the scoring op's packed masks: the bool
    masks it would otherwise build from the soft masks, packed, and the same predictions."""
    outputs, make = _family_case("solov2", CUT_CFG)
    processor = _fused_processor(make, op_backend, monkeypatch)
    seen = _nms_masks_spy(monkeypatch)
    packed_results = processor(outputs, **SIZES)
    real = ops.dynamic_mask_scores  # without packing: the bool masks from the soft masks
    monkeypatch.setattr(ops, "dynamic_mask_scores",
                        lambda *args, pack_masks, **kwargs: real(*args, **kwargs))
    bool_results = processor(outputs, **SIZES)
    packed, masks = seen
    assert isinstance(packed, PackedMasks) and masks.dtype == torch.bool
    assert len(masks) > 12 and (packed.height, packed.width) == masks.shape[1:]
    assert torch.equal(packed.bits, pack_masks_reference(masks))
    _assert_same(packed_results, bool_results)


@pytest.mark.parametrize("family", ["solo", "decoupled_solo"])
def test_the_other_families_give_matrix_nms_bool_masks(family, monkeypatch):
    outputs, make = _family_case(family, CUT_CFG)
    seen = _nms_masks_spy(monkeypatch)
    make(None)(outputs, **SIZES)
    assert len(seen) == 1 and seen[0].dtype == torch.bool and len(seen[0]) > 12


def test_matrix_nms_by_image_is_matrix_nms_per_image():
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(40, 6, 7, generator=generator) > 0.4
    labels = torch.randint(0, 2, (40,), generator=generator)
    scores = torch.rand(40, generator=generator)
    image = torch.randint(0, 3, (40,), generator=generator)
    image[image == 1] = 3  # image 1 has no candidate
    cfg = TestConfig(nms_pre=8, max_per_img=5, filter_thr=0.1)
    area = masks.sum((1, 2)).float()
    results = fused.matrix_nms_by_image(masks, labels, scores, area, image, num_images=5,
                                       test_cfg=cfg)
    packed = PackedMasks(pack_masks_reference(masks), 6, 7)
    for result, same in zip(results, fused.matrix_nms_by_image(
            packed, labels, scores, area, image, num_images=5, test_cfg=cfg)):
        for a, b in zip(result, same):
            assert torch.equal(a, b)
    assert len(results) == 5
    for n, result in enumerate(results):
        members = (image == n).nonzero().squeeze(1)
        nms_scores, nms_labels, _, keep = matrix_nms_reference(
            masks[members], labels[members], scores[members], mask_area=area[members],
            nms_pre=8, max_num=5, filter_thr=0.1)
        assert torch.equal(result.keep, members[keep]), n
        assert torch.equal(result.scores, nms_scores) and torch.equal(result.labels, nms_labels)
    assert [len(r.keep) for r in results][1::3] == [0, 0]


def test_masks_to_boxes_of_chunks_equal_boxes_of_all():
    masks = torch.rand(9, 11, 13, generator=torch.Generator().manual_seed(0)) > 0.97
    assert torch.equal(torch.cat([masks_to_boxes(c) for c in masks.split(4)]),
                       masks_to_boxes(masks))


# ------------------------------------------------------------------ detector and arguments


def test_detector_predict_passes_mask_format():
    outputs, make = _family_case("solov2", CUT_CFG)
    model = SOLODetector(backbone=nn.Identity(), neck=nn.Identity(), head=nn.Identity(),
                         postprocess=make(None))
    dense = model.predict(outputs, SIZES["image_sizes"], SIZES["original_sizes"])
    encoded = model.predict(outputs, SIZES["image_sizes"], SIZES["original_sizes"],
                            mask_format="rle")
    for image, (a, b) in enumerate(zip(encoded, dense)):
        assert torch.equal(_decode(a["masks"], SIZES["original_sizes"][image]), b["masks"])
    model.postprocess.backend = "reference"  # the documented switch to the reference path
    _assert_same(model.predict(outputs, SIZES["image_sizes"], SIZES["original_sizes"]), dense)


def test_bad_arguments_of_the_fused_path():
    fixture = _load("solov2")
    raw = _raw_solov2(fixture)
    sizes = _sizes(fixture)
    processor = _processor(fixture, backend=None)
    with pytest.raises(ValueError, match=r"mask_format must be one of \('bool', 'rle'\), "
                                         r"got 'png'"):
        processor(raw, *sizes, mask_format="png")
    with pytest.raises(ValueError, match="trace records the reference path's intermediate"):
        processor(raw, *sizes, trace=[])
    with pytest.raises(ValueError, match="backend must be one of reference, cpu, cuda, triton "
                                         "or None, got 'gpu'"):
        SOLOv2PostProcessor(test_cfg=_test_cfg(fixture), num_grids=GRIDS, strides=STRIDES,
                            backend="gpu")
    processor.backend = "gpu"
    with pytest.raises(ValueError, match="got 'gpu'"):
        processor(raw, *sizes)
    processor.backend = None
    with pytest.raises(ValueError, match="one \\(h, w\\) per image of the batch \\(2\\)"):
        processor(raw, [(96, 120)], [(72, 90)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op_backend", ["cuda", "triton"])
@pytest.mark.parametrize("family", ["solo", "decoupled_solo", "solov2"])
def test_gpu_fused_matches_cpu_reference_path(family, op_backend):
    outputs, make = _family_case(family, CUT_CFG)
    expected = make("reference")(outputs, **SIZES)
    on_gpu = type(outputs)(*([t.cuda() for t in f] if isinstance(f, list) else f.cuda()
                             for f in outputs))
    results = [{k: v.cpu() for k, v in r.items()} for r in make(op_backend)(on_gpu, **SIZES)]
    for result, target in zip(results, expected):
        # GPU arithmetic rounds differently: compare labels and near-all mask pixels
        assert torch.equal(result["labels"], target["labels"])
        torch.testing.assert_close(result["scores"], target["scores"], atol=1e-5, rtol=0)
        assert (result["masks"] != target["masks"]).float().mean() < 1e-3


@pytest.mark.parametrize("num, height, width", [(0, 7, 9), (1, 1, 1), (5, 37, 53)])
def test_boxes_from_soft_masks_equal_boxes_of_the_thresholded_masks(num, height, width):
    generator = torch.Generator().manual_seed(num)
    soft = torch.rand((num, height, width), generator=generator) * 0.6
    if num > 1:
        soft[1] = 0.2  # an empty mask: box (0, 0, 0, 0)
        soft[0, height // 2, 0] = 0.5  # equal to the threshold: not in the mask
    expected = masks_to_boxes(soft > 0.5)
    assert torch.equal(boxes_of_thresholded(soft, 0.5), expected)
    if num:
        soft[-1, 0, 0] = float("nan")  # a NaN row maximum must not hide that row's pixels
        assert torch.equal(boxes_of_thresholded(soft, 0.5), masks_to_boxes(soft > 0.5))
