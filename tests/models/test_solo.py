"""solo_fast.models.solo and solo_fast.losses.SOLOCriterion against mmdetection 3.3's SOLOHead
(tests/fixtures/mmdet/head_solo.pt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from solo_fast.config import PRESETS, get_preset
from solo_fast.losses import SOLOCriterion
from solo_fast import build_model
from solo_fast.postprocess import points_nms
from solo_fast.models.solo import (
    SOLO,
    SOLOHead,
    SOLOOutput,
    build_solo_head,
    mmdet_head_key_map,
    mmdet_model_key_map,
)
from solo_fast.targets import TargetConfig
from tests.models.helpers import assert_total_gradients

# N=images, L=levels, S=grid side, G=S*S cells of a level, C=classes, K=positives

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mmdet"
TOL = {"atol": 1e-5, "rtol": 1e-5}  # forward activations: the issue asks 1e-5 relative
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}
LOSS_TOL = {"atol": 0.0, "rtol": 1e-5}
BACKENDS = ["reference", None]  # None: the default, the C++ kernels on CPU tensors


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURES / "head_solo.pt", weights_only=True)


# --------------------------------------------------------------------------- shared test helpers
# (imported by test_decoupled_solo.py)

def head_kwargs(fixture: dict) -> dict:
    """The constructor arguments of a SOLO / Decoupled head from a fixture's ``head_cfg``."""
    cfg = fixture["head_cfg"]
    return {"num_classes": cfg["num_classes"], "in_channels": cfg["in_channels"],
            "feat_channels": cfg["feat_channels"], "stacked_convs": cfg["stacked_convs"],
            "num_grids": cfg["num_grids"], "cls_down_index": cfg["cls_down_index"],
            "num_groups": cfg["norm_cfg"]["num_groups"]}


def target_config(fixture: dict) -> TargetConfig:
    cfg = fixture["head_cfg"]
    return TargetConfig(num_grids=tuple(cfg["num_grids"]),
                        scale_ranges=tuple(tuple(r) for r in cfg["scale_ranges"]),
                        strides=tuple(cfg["strides"]), pos_scale=cfg["pos_scale"],
                        num_classes=cfg["num_classes"])


def gt_instances(fixture: dict, *, empty: bool = False) -> list[dict]:
    keep = slice(0, 0) if empty else slice(None)
    return [{"masks": g["masks"][keep], "labels": g["labels"][keep], "boxes": g["bboxes"][keep]}
            for g in fixture["inputs"]["batch_gt_instances"]]


def assert_channel_subset(actual: Tensor, encoded: dict, *, atol: float, rtol: float,
                          zero_elsewhere: bool = False, msg: str = "") -> None:
    """``actual`` (N, Q, h, w) against a ``channel_subset`` encoding
    (tests/fixtures/mmdet/README.md §0).

    The stored channels are compared value by value; the per-channel sum and sum of squares of
    every channel with the float64 statistics (tolerance scaled by the pixel count). With
    ``zero_elsewhere`` (gradients) every channel not stored must be exactly 0.
    """
    assert tuple(actual.shape) == tuple(encoded["shape"]), msg
    actual = actual.detach()
    for image, (channels, values) in enumerate(zip(encoded["channels"], encoded["values"])):
        torch.testing.assert_close(actual[image, channels], values, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{msg} image {image}: {m}")
        if zero_elsewhere:
            others = torch.ones(actual.shape[1], dtype=torch.bool)
            others[channels] = False
            assert torch.count_nonzero(actual[image, others]) == 0, f"{msg} image {image}"
    pixels = actual.shape[2] * actual.shape[3]
    wide = actual.double()
    torch.testing.assert_close(wide.sum((2, 3)), encoded["channel_sum"], atol=atol * pixels,
                               rtol=rtol, msg=lambda m: f"{msg} channel_sum: {m}")
    torch.testing.assert_close(wide.square().sum((2, 3)), encoded["channel_sq_sum"],
                               atol=atol * pixels, rtol=rtol,
                               msg=lambda m: f"{msg} channel_sq_sum: {m}")


def eval_probabilities(mask_preds: list[Tensor], cls_preds: list[Tensor]):
    """mmdetection's eval-mode forward extras on raw logits: sigmoid, then every mask map resized
    to level 0's size; class sigmoid with points NMS (SPEC §3.2 step 3)."""
    size = mask_preds[0].shape[-2:]
    masks = [F.interpolate(m.sigmoid(), size=size, mode="bilinear", align_corners=False)
             for m in mask_preds]
    return masks, [points_nms(c.sigmoid()) for c in cls_preds]


def mmdet_keys(config: str) -> dict[str, tuple[list[int], str]]:
    keys = {}
    for line in (FIXTURES / "state_dict_keys" / f"{config}.txt").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        keys[key] = ([int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype)
    return keys


def assert_keys_match_mmdet(config: str, key_map) -> None:
    """The preset's model (built on the meta device) has exactly mmdetection's keys and shapes."""
    mmdet = mmdet_keys(config)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(get_preset(config))
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()}
    mapped = {key_map(k): k for k in mmdet}
    assert len(mapped) == len(mmdet)
    for key, mmdet_key in mapped.items():
        assert key in ours, f"{mmdet_key} -> {key} is not a key of solo_fast's model"
        assert ours[key] == mmdet[mmdet_key], f"{mmdet_key} -> {key}: {ours[key]}"
    assert set(ours) == set(mapped), f"unmatched solo_fast keys: {set(ours) - set(mapped)}"


# --------------------------------------------------------------------------------------- model

def _fixture_head(fixture: dict) -> SOLOHead:
    head = SOLOHead(**head_kwargs(fixture))
    head.load_state_dict({mmdet_head_key_map(k): v for k, v in fixture["state_dict"].items()},
                         strict=True)
    return head


def test_train_forward_matches_mmdet(fixture):
    head = _fixture_head(fixture).train()
    with torch.no_grad():
        out = head(fixture["inputs"]["feats"])
    assert isinstance(out, SOLOOutput)
    expected = fixture["train"]["outputs"]
    assert len(out.mask_preds) == len(out.cls_preds) == 5
    for level in range(5):
        assert_channel_subset(out.mask_preds[level], expected["mlvl_mask_preds"][level], **TOL,
                              msg=f"mask level {level}")
        torch.testing.assert_close(out.cls_preds[level], expected["mlvl_cls_preds"][level], **TOL)


def test_eval_forward_is_raw_and_gives_mmdet_eval_outputs(fixture):
    # forward returns logits in both modes; mmdetection's eval extras applied to them (what the
    # post-processing does) reproduce mmdetection's eval-mode forward
    head = _fixture_head(fixture)
    with torch.no_grad():
        train_out = head.train()(fixture["inputs"]["feats"])
        eval_out = head.eval()(fixture["inputs"]["feats"])
    for a, b in zip([*train_out.mask_preds, *train_out.cls_preds],
                    [*eval_out.mask_preds, *eval_out.cls_preds]):
        assert torch.equal(a, b)
    masks, scores = eval_probabilities(eval_out.mask_preds, eval_out.cls_preds)
    expected = fixture["eval"]["outputs"]
    for level in range(5):
        assert_channel_subset(masks[level], expected["mlvl_mask_preds"][level], **TOL,
                              msg=f"eval mask level {level}")
        torch.testing.assert_close(scores[level], expected["mlvl_cls_preds"][level], **TOL)


def test_state_dict_keys_match_mmdet():
    assert_keys_match_mmdet("solo_r50_fpn_1x_coco", mmdet_model_key_map)


def test_key_map_names():
    assert mmdet_head_key_map("conv_mask_list.4.bias") == "mask_pred.4.bias"
    assert mmdet_head_key_map("conv_cls.weight") == "cls_pred.weight"
    assert mmdet_head_key_map("mask_convs.6.gn.weight") == "mask_convs.6.gn.weight"
    assert (mmdet_model_key_map("mask_head.cls_convs.0.conv.weight")
            == "head.cls_convs.0.conv.weight")
    assert mmdet_model_key_map("neck.fpn_convs.0.conv.weight") == "neck.output_convs.0.weight"
    with pytest.raises(KeyError):
        mmdet_head_key_map("mask_convs.0.conv.conv_offset.weight")  # a DCN head
    with pytest.raises(KeyError):
        mmdet_head_key_map("conv_mask_list_x.0.weight")  # a Decoupled head
    with pytest.raises(KeyError):
        mmdet_model_key_map("bbox_head.conv.weight")


def test_init_matches_mmdet():
    torch.manual_seed(0)
    head = build_solo_head(PRESETS["solo_r50_fpn_1x_coco"].head)
    assert [conv.out_channels for conv in head.mask_pred] == [1600, 1296, 576, 256, 144]
    assert head.mask_pred[0].kernel_size == (1, 1) and head.cls_pred.kernel_size == (3, 3)
    for conv in (head.mask_pred[2], head.cls_pred):
        assert torch.allclose(conv.bias, torch.full_like(conv.bias, -4.59512), atol=1e-5)
    for conv in (head.mask_convs[0].conv, head.cls_convs[6].conv, head.mask_pred[0]):
        assert abs(conv.weight.std().item() - 0.01) < 5e-4
    assert head.mask_convs[0].conv.in_channels == 258 and head.cls_convs[0].conv.in_channels == 256
    gn = head.mask_convs[0].gn
    assert torch.all(gn.weight == 1) and torch.all(gn.bias == 0) and gn.eps == 1e-5
    assert head.mask_convs[0].conv.bias is None


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_r18_preset_model_forward(mode):
    torch.manual_seed(0)
    model = build_model(get_preset("solo_r50_fpn_1x_coco", num_classes=3,
                                   **{"backbone.depth": 18}))
    assert isinstance(model, SOLO) and "SOLOHead" in repr(model)
    model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        out = model(torch.randn(1, 3, 64, 64))
    mask_sizes = [16, 16, 8, 4, 4]  # stride 4, 4, 8, 16, 16
    assert [tuple(m.shape) for m in out.mask_preds] == [
        (1, s * s, h, h) for s, h in zip((40, 36, 24, 16, 12), mask_sizes)]
    assert [tuple(c.shape) for c in out.cls_preds] == [(1, 3, s, s) for s in (40, 36, 24, 16, 12)]
    if mode == "train":
        sum(t.sum() for t in [*out.mask_preds, *out.cls_preds]).backward()
        assert model.head.mask_convs[0].conv.weight.grad is not None
        assert model.backbone.layer1[0].conv1.weight.grad is None  # frozen stage


def test_bad_inputs(fixture):
    head = _fixture_head(fixture)
    with pytest.raises(ValueError, match="expected 5 feature maps"):
        head(fixture["inputs"]["feats"][:4])
    with pytest.raises(ValueError, match="family 'solo'"):
        build_solo_head(PRESETS["solov2_r50_fpn_1x_coco"].head)
    with pytest.raises(ValueError, match="cls_down_index"):
        SOLOHead(stacked_convs=2, cls_down_index=2)


# ------------------------------------------------------------------------------------ criterion

def _criterion(fixture: dict, backend: str | None) -> SOLOCriterion:
    return SOLOCriterion(targets=target_config(fixture), dice_backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_criterion_matches_mmdet(fixture, backend):
    head = _fixture_head(fixture).train()
    feats = [f.clone().requires_grad_(True) for f in fixture["inputs"]["feats"]]
    out = head(feats)
    for tensor in out.mask_preds:
        tensor.retain_grad()
    criterion = _criterion(fixture, backend)
    gts = gt_instances(fixture)
    losses = criterion(out, gts)
    expected = fixture["train"]
    assert set(losses) == {"loss_mask", "loss_cls"}
    for name in ("loss_mask", "loss_cls"):
        torch.testing.assert_close(losses[name].detach(), expected["loss"][name], **LOSS_TOL)

    # per-level dice terms: mmdetection calls the dice loss once per level with positives
    levels = criterion.assign(gts)
    assert sum(int(level.num_pos) for level in levels) == expected["num_pos"]
    terms = [t for t in criterion.mask_losses(out, levels) if t.shape[0]]
    assert len(terms) == len(expected["dice_calls"])
    for term, call, level in zip(terms, expected["dice_calls"], levels):
        assert (term.shape[0], *level.gt_masks.shape[1:]) == tuple(call["pred_shape"])
        torch.testing.assert_close(term.detach(), call["loss_per_mask"], **LOSS_TOL)

    losses["loss_mask"].backward(retain_graph=True)
    for level, (pred, encoded) in enumerate(zip(out.mask_preds,
                                                expected["grad_outputs"]["mlvl_mask_preds"])):
        assert_channel_subset(pred.grad, encoded, **GRAD_TOL, zero_elsewhere=True,
                              msg=f"grad level {level}")

    assert_total_gradients(head, feats, losses, expected, mmdet_head_key_map, **GRAD_TOL)


def test_criterion_empty_ground_truth(fixture):
    head = _fixture_head(fixture).train()
    out = head(fixture["inputs"]["feats"])
    losses = _criterion(fixture, None)(out, gt_instances(fixture, empty=True))
    expected = fixture["train"]["loss_empty_gt"]
    assert expected["loss_mask"].item() == 0
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    torch.testing.assert_close(losses["loss_cls"].detach(), expected["loss_cls"], **LOSS_TOL)
    (losses["loss_mask"] + losses["loss_cls"]).backward()  # the mask branch stays in the graph
    assert head.mask_pred[0].weight.grad is not None
    assert torch.count_nonzero(head.mask_pred[0].weight.grad) == 0


def test_criterion_one_instance_gives_both_losses(fixture):
    head = _fixture_head(fixture).train()
    out = head(fixture["inputs"]["feats"])
    gts = gt_instances(fixture)
    one = [{key: value[:1] for key, value in gts[0].items()},
           gt_instances(fixture, empty=True)[1]]
    losses = _criterion(fixture, None)(out, one)
    assert losses["loss_mask"].item() > 0 and losses["loss_cls"].item() > 0
