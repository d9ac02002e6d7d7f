"""solo_fast.postprocess's reference path (``backend="reference"``) against mmdetection 3.3's
``predict_by_feat`` on the head fixtures (tests/fixtures/mmdet/head_<variant>.pt; their
README.md §5 "Inference (eval)"). The fused path is held to this one in
test_postprocess_fused.py."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from solo_fast.config import PRESETS, TestConfig
from solo_fast.models.solov2 import SOLOv2Output
from solo_fast.ops.reference import matrix_nms_reference
from solo_fast.postprocess import (
    DecoupledSOLOPostProcessor,
    SOLOPostProcessor,
    SOLOv2PostProcessor,
    build_postprocessor,
    masks_to_boxes,
    prepare_cls_scores,
    prepare_mask_probs,
)

# N=images, L=levels, S=grid side, Q=mask channels of a level, C=classes, K=instances,
# h, w=size of a level's mask map, H4, W4=stride-4 mask map

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mmdet"
VARIANTS = ["solo", "decoupled_solo", "decoupled_solo_light", "solov2"]
MASK_KEYS = {"solo": ["mlvl_mask_preds"],
             "decoupled_solo": ["mlvl_mask_preds_x", "mlvl_mask_preds_y"],
             "decoupled_solo_light": ["mlvl_mask_preds_x", "mlvl_mask_preds_y"]}
SCORE_TOL = {"atol": 1e-5, "rtol": 0.0}  # tests/fixtures/mmdet/README.md §0: head prediction
NMS_TOL = {"atol": 1e-6, "rtol": 0.0}  # tests/fixtures/mmdet/README.md §0: matrix NMS
_CACHE: dict[str, dict] = {}


class SOLOOutput(NamedTuple):  # the attribute names the post-processing reads
    mask_preds: list[Tensor]
    cls_preds: list[Tensor]


class DecoupledOutput(NamedTuple):
    mask_preds_x: list[Tensor]
    mask_preds_y: list[Tensor]
    cls_preds: list[Tensor]


def _load(variant: str) -> dict:
    if variant not in _CACHE:
        _CACHE[variant] = torch.load(FIXTURES / f"head_{variant}.pt", weights_only=True)
    return _CACHE[variant]


@pytest.fixture(params=VARIANTS)
def fixture(request) -> dict:
    return _load(request.param)


def _test_cfg(fixture: dict) -> TestConfig:
    cfg = fixture["head_cfg"]["test_cfg"]
    return TestConfig(**{f: cfg[f] for f in ("nms_pre", "score_thr", "mask_thr", "filter_thr",
                                               "kernel", "sigma", "max_per_img")})


def _processor(fixture: dict, backend: str | None = "reference", test_cfg=None):
    kinds = {"solo": SOLOPostProcessor, "solov2": SOLOv2PostProcessor}
    kind = kinds.get(fixture["variant"], DecoupledSOLOPostProcessor)
    cfg = fixture["head_cfg"]
    return kind(test_cfg=test_cfg or _test_cfg(fixture), num_grids=cfg["num_grids"],
                strides=cfg["strides"], backend=backend)


def _sizes(fixture: dict) -> tuple[list, list]:
    metas = fixture["inputs"]["batch_img_metas"]
    return [m["img_shape"] for m in metas], [m["ori_shape"] for m in metas]


def _dense(encoded: dict) -> Tensor:
    """A ``channel_subset`` tensor with its stored channels filled in and zeros elsewhere."""
    dense = torch.zeros(encoded["shape"])  # (N, Q, H4, W4)
    for image, (channels, values) in enumerate(zip(encoded["channels"], encoded["values"])):
        dense[image, channels] = values
    return dense


def _predict(fixture: dict, trace: list | None = None, images: slice = slice(None),
             processor=None, **kwargs) -> list[dict]:
    """The post-processing of the fixture's eval outputs (mmdetection's eval-mode forward), by
    ``processor`` (default: the reference path); kwargs go to the call (mask_format)."""
    outputs = fixture["eval"]["outputs"]
    processor = processor or _processor(fixture)
    image_sizes, original_sizes = (sizes[images] for sizes in _sizes(fixture))
    cls = [t[images] for t in outputs["mlvl_cls_preds"]]
    if fixture["variant"] == "solov2":  # eval outputs = raw outputs
        raw = SOLOv2Output([t[images] for t in outputs["mlvl_kernel_preds"]], cls,
                           outputs["mask_feats"][images])
        return processor(raw, image_sizes, original_sizes, trace=trace, **kwargs)
    probs = {key: [_dense(t)[images] for t in outputs[key]]
             for key in MASK_KEYS[fixture["variant"]]}
    if fixture["variant"] == "solo":
        return processor.process_prepared(mask_probs=probs["mlvl_mask_preds"], cls_scores=cls,
                                          image_sizes=image_sizes, original_sizes=original_sizes,
                                          trace=trace, **kwargs)
    return processor.process_prepared(
        mask_probs_x=probs["mlvl_mask_preds_x"], mask_probs_y=probs["mlvl_mask_preds_y"],
        cls_scores=cls, image_sizes=image_sizes, original_sizes=original_sizes, trace=trace,
        **kwargs)


# --------------------------------------------------------------------- against mmdetection


def test_predictions_match_mmdet(fixture):
    results = _predict(fixture)
    expected = fixture["eval"]["predictions"]
    allowed = fixture["eval"]["margins"]["final_pixels_within_1e-5"]
    assert len(results) == len(expected) == 2
    flipped = 0
    for image, (result, target) in enumerate(zip(results, expected)):
        assert set(result) == {"masks", "labels", "scores", "boxes"}
        assert torch.equal(result["labels"], target["labels"]), f"image {image}"
        torch.testing.assert_close(result["scores"], target["scores"], **SCORE_TOL)
        assert result["masks"].dtype == torch.bool
        assert result["masks"].shape == target["masks"].shape
        flipped += (result["masks"] != target["masks"]).sum().item()
        assert result["boxes"].dtype == torch.float32 and result["boxes"].shape == (
            len(target["labels"]), 4)
    assert flipped <= allowed


def _assert_predictions_match(results: list[dict], fixture: dict) -> None:
    expected = fixture["eval"]["predictions"]
    allowed = fixture["eval"]["margins"]["final_pixels_within_1e-5"]
    flipped = 0
    for image, (result, target) in enumerate(zip(results, expected, strict=True)):
        assert torch.equal(result["labels"], target["labels"]), f"image {image}"
        torch.testing.assert_close(result["scores"], target["scores"], **SCORE_TOL)
        flipped += (result["masks"] != target["masks"]).sum().item()
    assert flipped <= allowed


def test_heads_and_post_processing_end_to_end_match_mmdet(fixture):
    """Our heads (fixture weights) -> raw outputs -> our post-processing = mmdetection's results."""
    from tests.models import test_decoupled_solo, test_solo, test_solov2

    modules = {"solo": test_solo, "solov2": test_solov2, "decoupled_solo": test_decoupled_solo,
               "decoupled_solo_light": test_decoupled_solo}
    head = modules[fixture["variant"]]._fixture_head(fixture).eval()
    with torch.no_grad():
        outputs = head(fixture["inputs"]["feats"])
    image_sizes, original_sizes = _sizes(fixture)
    _assert_predictions_match(_processor(fixture)(outputs, image_sizes, original_sizes), fixture)


def test_debug_values_match_mmdet(fixture):
    trace: list[dict] = []
    _predict(fixture, trace)
    assert len(trace) == 2
    for image, (mine, debug) in enumerate(zip(trace, fixture["eval"]["debug"])):
        candidates = debug["candidates"]
        for key in ("cell_index", "level", "label", "mask_area", "passes_area_filter"):
            assert torch.equal(mine["candidates"][key], candidates[key]), f"{image} {key}"
        torch.testing.assert_close(mine["candidates"]["cls_score"], candidates["cls_score"],
                                   **NMS_TOL)
        torch.testing.assert_close(mine["maskness"], debug["maskness"], **NMS_TOL)
        nms_input = mine["nms_input"]
        for key in ("masks", "labels", "mask_area"):
            assert torch.equal(nms_input[key], debug["nms_input"][key]), f"{image} {key}"
        torch.testing.assert_close(nms_input["scores"], debug["nms_input"]["scores"], **NMS_TOL)
        assert debug["nms_input"]["kwargs"] == {"nms_pre": 500, "max_num": 100,
                                                "kernel": "gaussian", "sigma": 2.0,
                                                "filter_thr": 0.05}
        nms_output = mine["nms_output"]
        for key in ("labels", "keep_inds"):
            assert torch.equal(nms_output[key], debug["nms_output"][key]), f"{image} {key}"
        torch.testing.assert_close(nms_output["scores"], debug["nms_output"]["scores"], **NMS_TOL)
        # the cells the predictions come from
        kept = candidates["passes_area_filter"]
        cells = mine["candidates"]["cell_index"][kept][nms_output["keep_inds"]]
        levels = mine["candidates"]["level"][kept][nms_output["keep_inds"]]
        assert torch.equal(cells, debug["pred_cell_index"])
        assert torch.equal(levels, debug["pred_level"])
        # every decayed score, as mmdetection's debug call without filter and max_num
        decayed, _, _, decayed_inds = matrix_nms_reference(
            nms_input["masks"], nms_input["labels"], nms_input["scores"],
            mask_area=nms_input["mask_area"], nms_pre=500, filter_thr=-1, max_num=-1)
        assert torch.equal(decayed_inds, debug["nms_decayed_all"]["keep_inds"])
        torch.testing.assert_close(decayed, debug["nms_decayed_all"]["scores"], **NMS_TOL)


@pytest.mark.parametrize("variant", ["solo", "decoupled_solo", "decoupled_solo_light"])
def test_preparation_matches_mmdet_eval_forward(variant):
    """sigmoid -> resize and sigmoid -> points NMS of the train-mode logits (the same logits)
    against mmdetection's eval-mode forward, on the channels both fixtures store."""
    fixture = _load(variant)
    train, evaluation = fixture["train"]["outputs"], fixture["eval"]["outputs"]
    for level, (scores, expected) in enumerate(zip(prepare_cls_scores(train["mlvl_cls_preds"]),
                                                   evaluation["mlvl_cls_preds"])):
        assert torch.equal(scores, expected), f"class scores, level {level}"
    compared = 0
    for key in MASK_KEYS[variant]:
        for level, (logits, probs) in enumerate(zip(train[key], evaluation[key])):
            size = tuple(probs["shape"][-2:])
            for image in range(2):
                stored = {c: i for i, c in enumerate(logits["channels"][image].tolist())}
                wanted = {c: i for i, c in enumerate(probs["channels"][image].tolist())}
                common = sorted(stored.keys() & wanted.keys())
                chosen = logits["values"][image][[stored[c] for c in common]]  # (Q', h, w)
                mine = prepare_mask_probs(chosen[None], size)[0]  # (Q', H4, W4)
                target = probs["values"][image][[wanted[c] for c in common]]
                if tuple(logits["shape"][-2:]) == size:  # levels 0-1: no resize, exact
                    assert torch.equal(mine, target), f"{key} level {level}"
                else:
                    # PyTorch's CPU bilinear kernel is picked by channel count for outputs with
                    # H + W <= 128 (vectorised over channels or not), so a channel subset may
                    # differ from the whole level in the last bit or two (see postprocess.py)
                    torch.testing.assert_close(mine, target, atol=1e-6, rtol=0.0,
                                               msg=lambda m: f"{key} level {level}: {m}")
                compared += len(common)
    assert compared >= 40


# ------------------------------------------------------------------------------- properties


def _tight_boxes(masks: Tensor) -> Tensor:
    boxes = torch.zeros(len(masks), 4)
    for k, mask in enumerate(masks):
        ys, xs = mask.nonzero(as_tuple=True)
        if len(ys):
            boxes[k] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return boxes


def test_boxes_are_the_tight_boxes_of_the_masks(fixture):
    for result in _predict(fixture):
        assert torch.equal(result["boxes"], _tight_boxes(result["masks"]))
        assert (result["boxes"][:, 2:] > result["boxes"][:, :2]).all()


def test_masks_to_boxes():
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 6] = True
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[2, 1, 6, 3], [6, 4, 7, 5], [0, 0, 0, 0]]
    assert masks_to_boxes(torch.zeros(0, 5, 7, dtype=torch.bool)).shape == (0, 4)


def test_one_image_alone_gives_the_same_results(fixture):
    batch = _predict(fixture)
    for image in range(2):
        (alone,) = _predict(fixture, images=slice(image, image + 1))
        for key in batch[image]:
            assert torch.equal(alone[key], batch[image][key]), f"image {image} {key}"


def _random_outputs(family: str, *, grids, canvas, classes=3, batch=2, seed=0):
    """Raw head outputs with plenty of candidates: mask maps at strides 4, 4, 8, 16, 16."""
    generator = torch.Generator().manual_seed(seed)
    height, width = canvas[0] // 4, canvas[1] // 4
    sizes = [(height, width), (height, width), (height // 2, width // 2),
             (height // 4, width // 4), (height // 4, width // 4)]
    cls = [torch.randn(batch, classes, s, s, generator=generator) - 1.5 for s in grids]

    def maps(channels, size):  # smooth blobs: every candidate has a sizeable mask
        coarse = torch.randn(batch, channels, 3, 4, generator=generator) * 4
        return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")

    if family == "solo":
        return SOLOOutput([maps(s * s, size) for s, size in zip(grids, sizes)], cls)
    return DecoupledOutput([maps(s, size) for s, size in zip(grids, sizes)],
                           [maps(s, size) for s, size in zip(grids, sizes)], cls)


@pytest.mark.parametrize("family", ["solo", "decoupled_solo"])
def test_raw_outputs_give_the_results_of_prepared_outputs(family):
    """Soft masks from the candidates' channels only equal mmdetection's order of operations
    (sigmoid and resize of every channel, then the candidates'), bit for bit at real sizes
    (mask maps with H + W > 128, where the resize does not depend on the channel count)."""
    grids = (10, 8, 6, 4, 3)
    outputs = _random_outputs(family, grids=grids, canvas=(256, 320))
    kind = SOLOPostProcessor if family == "solo" else DecoupledSOLOPostProcessor
    processor = kind(test_cfg=TestConfig(), num_grids=grids, strides=(8, 8, 16, 32, 32),
                     backend="reference")
    sizes = {"image_sizes": [(256, 300), (200, 320)], "original_sizes": [(128, 150), (300, 480)]}
    trace_raw, trace_prepared = [], []
    raw = processor(outputs, sizes["image_sizes"], sizes["original_sizes"], trace=trace_raw)
    size = tuple(outputs[0][0].shape[-2:])  # level 0 of the first mask field: (H4, W4)
    cls = prepare_cls_scores(outputs.cls_preds)
    if family == "solo":
        prepared = processor.process_prepared(
            mask_probs=[prepare_mask_probs(t, size) for t in outputs.mask_preds],
            cls_scores=cls, **sizes, trace=trace_prepared)
    else:
        prepared = processor.process_prepared(
            mask_probs_x=[prepare_mask_probs(t, size) for t in outputs.mask_preds_x],
            mask_probs_y=[prepare_mask_probs(t, size) for t in outputs.mask_preds_y],
            cls_scores=cls, **sizes, trace=trace_prepared)
    assert sum(len(t["nms_input"]["labels"]) for t in trace_raw) > 20
    assert all(len(r["labels"]) for r in raw)
    for image, (a, b) in enumerate(zip(raw, prepared)):
        assert a["masks"].shape[1:] == sizes["original_sizes"][image]
        for key in a:
            assert torch.equal(a[key], b[key]), f"image {image} {key}"
    for a, b in zip(trace_raw, trace_prepared):
        assert torch.equal(a["maskness"], b["maskness"])
        assert torch.equal(a["nms_input"]["masks"], b["nms_input"]["masks"])


def _empty_cls(fixture: dict) -> list[Tensor]:
    return [torch.full_like(t, -20.0) for t in fixture["train"]["outputs"]["mlvl_cls_preds"]]


def _assert_empty(results: list[dict], original_sizes) -> None:
    assert len(results) == len(original_sizes)
    for result, size in zip(results, original_sizes):
        assert result["masks"].shape == (0, *size) and result["masks"].dtype == torch.bool
        assert result["labels"].shape == (0,) and result["labels"].dtype == torch.int64
        assert result["scores"].shape == (0,) and result["scores"].dtype == torch.float32
        assert result["boxes"].shape == (0, 4) and result["boxes"].dtype == torch.float32


def test_no_candidate_gives_empty_results(fixture):
    processor = _processor(fixture)
    image_sizes, original_sizes = _sizes(fixture)
    outputs = fixture["eval"]["outputs"]
    cls = _empty_cls(fixture)
    trace: list = []
    if fixture["variant"] == "solov2":
        raw = SOLOv2Output(outputs["mlvl_kernel_preds"], cls, outputs["mask_feats"])
        results = processor(raw, image_sizes, original_sizes, trace=trace)
    else:
        masks = {key: [torch.zeros(t["shape"]) for t in outputs[key]]
                 for key in MASK_KEYS[fixture["variant"]]}
        raw = (SOLOOutput(*masks.values(), cls) if fixture["variant"] == "solo"
               else DecoupledOutput(*masks.values(), cls))
        results = processor(raw, image_sizes, original_sizes, trace=trace)
    _assert_empty(results, original_sizes)
    assert [len(t["candidates"]["cell_index"]) for t in trace] == [0, 0]


def test_small_masks_are_filtered_out():
    # every class score passes but every mask probability is 0.5 or less: nothing is kept
    fixture = _load("solov2")
    outputs = fixture["eval"]["outputs"]
    cls = [torch.full_like(t, 5.0) for t in outputs["mlvl_cls_preds"]]
    kernels = [torch.zeros_like(t) for t in outputs["mlvl_kernel_preds"]]
    trace: list = []
    image_sizes, original_sizes = _sizes(fixture)
    results = _processor(fixture)(SOLOv2Output(kernels, cls, outputs["mask_feats"]), image_sizes,
                                  original_sizes, trace=trace)
    _assert_empty(results, original_sizes)
    assert len(trace[0]["candidates"]["cell_index"]) == 3872 * 4  # points NMS keeps the ties
    assert not trace[0]["candidates"]["passes_area_filter"].any()


def test_build_postprocessor_per_family():
    kinds = {"solo": SOLOPostProcessor, "decoupled_solo": DecoupledSOLOPostProcessor,
             "decoupled_solo_light": DecoupledSOLOPostProcessor, "solov2": SOLOv2PostProcessor}
    for name, cfg in PRESETS.items():
        processor = build_postprocessor(cfg)
        assert type(processor) is kinds[cfg.head.family], name
        assert processor.num_grids == cfg.head.num_grids and processor.test_cfg == cfg.test
        assert type(processor).__name__ in repr(processor)
        assert processor.backend is None and "backend=None" in repr(processor)
        assert build_postprocessor(cfg, backend="reference").backend == "reference"


def _raw_solov2(fixture: dict) -> SOLOv2Output:
    """The SOLOv2 fixture's eval-mode outputs (its raw outputs: SOLOv2 prepares nothing)."""
    outputs = fixture["eval"]["outputs"]
    return SOLOv2Output(outputs["mlvl_kernel_preds"], outputs["mlvl_cls_preds"],
                        outputs["mask_feats"])


def test_bad_arguments():
    fixture = _load("solov2")
    raw = _raw_solov2(fixture)
    processor = _processor(fixture)
    with pytest.raises(ValueError, match="one \\(h, w\\) per image of the batch \\(2\\)"):
        processor(raw, [(96, 120)], [(72, 90)])
    with pytest.raises(ValueError, match="cls_preds must have one tensor per level"):
        processor(raw._replace(cls_preds=raw.cls_preds[:4]), *_sizes(fixture))
    with pytest.raises(ValueError, match=r"kernel_preds\[0\] must have shape \(N, 16, h, w\)"):
        processor(raw._replace(kernel_preds=[t[:, :8] for t in raw.kernel_preds]),
                  *_sizes(fixture))
    with pytest.raises(ValueError, match="num_grids and strides"):
        SOLOPostProcessor(test_cfg=TestConfig(), num_grids=(40, 36), strides=(8,))
    with pytest.raises(TypeError, match="SOLOv2PostProcessor has no eval-mode-prepared form"):
        processor.process_prepared(cls_scores=prepare_cls_scores(raw.cls_preds),
                                   image_sizes=_sizes(fixture)[0],
                                   original_sizes=_sizes(fixture)[1])
