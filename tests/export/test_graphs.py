"""The export graphs' post-processing (plain torch) against the eager reference path
(``backend="reference"``, mmdetection 3.3's order of operations): same detections, labels and
order per image, scores within 1e-5 relative, the same stride-4 soft masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from solo_fast.config import get_preset
from solo_fast.export import PostprocessGraph, build_graph, io_names
from solo_fast.export.common import flatten_outputs, unflatten_outputs
from solo_fast.export.graphs import family_masks
from tests.export.helpers import (
    FAMILIES,
    PRESETS,
    assert_matches_reference,
    random_outputs,
    tiny_config,
)

# N=images, S=grid side, K=max_per_img

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mmdet"
VARIANTS = ["solo", "decoupled_solo", "decoupled_solo_light", "solov2"]


def _graph(cfg, cap=None) -> PostprocessGraph:
    return PostprocessGraph(cfg=cfg, masks=family_masks(cfg), cap=cap).eval()


def _detect(cfg, raw, image_sizes, cap=None):
    with torch.no_grad():
        return _graph(cfg, cap).detect(raw, torch.tensor(image_sizes))


@pytest.mark.parametrize("variant", VARIANTS)
def test_mmdet_fixtures_match_the_reference_path(variant):
    from tests.models import test_decoupled_solo, test_solo, test_solov2

    fixture = torch.load(FIXTURES / f"head_{variant}.pt", weights_only=True)
    modules = {"solo": test_solo, "solov2": test_solov2, "decoupled_solo": test_decoupled_solo,
               "decoupled_solo_light": test_decoupled_solo}
    head = modules[variant]._fixture_head(fixture).eval()
    with torch.no_grad():
        raw = head(fixture["inputs"]["feats"])
    head_cfg = fixture["head_cfg"]
    cfg = get_preset(PRESETS[variant], num_classes=head_cfg["num_classes"],
                     num_grids=tuple(head_cfg["num_grids"]), strides=tuple(head_cfg["strides"]))
    assert {k: getattr(cfg.test, k) for k in head_cfg["test_cfg"]} == head_cfg["test_cfg"]
    sizes = [tuple(m["img_shape"]) for m in fixture["inputs"]["batch_img_metas"]]
    detections = _detect(cfg, raw, sizes)
    assert_matches_reference(detections, cfg, raw, sizes)
    assert int(detections.num_dets.min()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_random_outputs_match_the_reference_path(family):
    cfg = tiny_config(family)
    raw = random_outputs(cfg, canvas=(128, 160), batch=2, seed=1)
    sizes = [(128, 150), (100, 160)]
    trace = assert_matches_reference(_detect(cfg, raw, sizes), cfg, raw, sizes)
    assert all(len(t["nms_output"]["labels"]) >= 10 for t in trace)


@pytest.mark.parametrize("family", ["solo", "decoupled_solo", "solov2"])
def test_caps_and_ties(family):
    """More candidates than nms_pre, more survivors than max_per_img, equal scores (class 1
    copies class 0), the linear kernel."""
    cfg = tiny_config(family, nms_pre=25, max_per_img=7, kernel="linear")
    raw = random_outputs(cfg, canvas=(96, 128), batch=3, seed=2, ties=True)
    sizes = [(96, 128), (64, 100), (96, 90)]
    trace = assert_matches_reference(_detect(cfg, raw, sizes), cfg, raw, sizes)
    for t in trace:
        assert len(t["nms_input"]["labels"]) > 25  # the cut to nms_pre happens
        assert len(t["nms_output"]["labels"]) == 7  # max_per_img is reached
        scores = t["nms_input"]["scores"]
        assert len(scores.unique()) < len(scores)  # ties exist


def test_filter_threshold_off_keeps_every_survivor():
    cfg = tiny_config("solov2", filter_thr=0.0, max_per_img=300)
    raw = random_outputs(cfg, canvas=(96, 128), batch=2, seed=3)
    sizes = [(96, 128), (96, 128)]
    assert_matches_reference(_detect(cfg, raw, sizes), cfg, raw, sizes)


@pytest.mark.parametrize("family", ["solo", "decoupled_solo", "solov2"])
def test_an_empty_image_alone_and_in_a_batch(family):
    cfg = tiny_config(family)
    raw = random_outputs(cfg, canvas=(96, 128), batch=3, seed=4)
    for logits in raw.cls_preds:
        logits[1] = -20.0  # image 1: no class score above score_thr
    sizes = [(96, 128), (80, 128), (96, 100)]
    batch = _detect(cfg, raw, sizes)
    assert_matches_reference(batch, cfg, raw, sizes)
    assert batch.num_dets[1] == 0 and batch.num_candidates[1] == 0
    assert batch.num_dets[0] > 0 and batch.num_dets[2] > 0
    for image in range(3):  # each image alone gives the batch's rows
        alone_raw = unflatten_outputs(type(raw), [t[image:image + 1]
                                                  for t in flatten_outputs(raw)], 5)
        alone = _detect(cfg, alone_raw, sizes[image:image + 1])
        for name, value in alone._asdict().items():
            torch.testing.assert_close(value[0], getattr(batch, name)[image], rtol=1e-6,
                                       atol=1e-7, msg=lambda m, n=name, i=image: f"{n} {i}: {m}")
    empty = _detect(cfg, unflatten_outputs(type(raw), [t[1:2] for t in flatten_outputs(raw)], 5),
                    sizes[1:2])
    assert empty.num_dets.tolist() == [0] and not empty.masks.any()
    assert empty.masks.shape == (1, cfg.test.max_per_img, 24, 32)


def test_a_fixed_cap_is_exact_under_it_and_reported_over_it():
    cfg = tiny_config("solov2")
    raw = random_outputs(cfg, canvas=(96, 128), batch=2, seed=5)
    sizes = [(96, 128), (96, 128)]
    full = _detect(cfg, raw, sizes)
    most = int(full.num_candidates.max())
    capped = _detect(cfg, raw, sizes, cap=most)
    for name, value in full._asdict().items():
        assert torch.equal(value, getattr(capped, name)), name
    assert (_detect(cfg, raw, sizes, cap=most // 4).num_candidates > most // 4).any()


def test_graphs_and_names():
    cfg = tiny_config("decoupled_solo")
    with pytest.raises(ValueError, match="graph must be one of"):
        build_graph(cfg, graph="everything")
    with pytest.raises(ValueError, match="needs the model"):
        build_graph(cfg, graph="end2end")
    with pytest.raises(ValueError, match="max_per_img must be > 0"):
        build_graph(tiny_config("solo", max_per_img=-1), graph="postprocess")
    inputs, outputs = io_names(cfg, "postprocess")
    assert inputs[:2] == ["mask_preds_x_0", "mask_preds_x_1"] and inputs[-1] == "image_sizes"
    assert len(inputs) == 3 * 5 + 1
    assert outputs == ["num_dets", "scores", "labels", "boxes", "masks", "num_candidates"]
    assert io_names(cfg, "end2end")[0] == ["images", "image_sizes"]
    assert "PostprocessGraph" in repr(build_graph(cfg, graph="postprocess"))
