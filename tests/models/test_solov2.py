"""solo_fast.models.solov2 against mmdetection 3.3's SOLOV2Head (tests/fixtures/mmdet)."""

from __future__ import annotations

import pytest
import torch

from solo_fast import build_model
from solo_fast.config import PRESETS, get_preset
from solo_fast.models.solov2 import (
    MaskFeatModule,
    SOLOv2,
    SOLOv2Head,
    SOLOv2Output,
    build_solov2_head,
    mmdet_head_key_map,
    mmdet_model_key_map,
)
from solo_fast.postprocess import points_nms
from tests.models.helpers import FIXTURES, TOL, assert_keys_match_mmdet

# N=images, L=levels, S=grid side, C=classes, E=mask-feature channels, G=cells of all levels


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURES / "head_solov2.pt", weights_only=True)


def _fixture_head(fixture: dict) -> SOLOv2Head:
    cfg = fixture["head_cfg"]
    mask_cfg = cfg["mask_feature_head"]
    assert (mask_cfg["start_level"], mask_cfg["end_level"], mask_cfg["mask_stride"]) == (0, 3, 4)
    mask_feat = MaskFeatModule(
        in_channels=cfg["in_channels"], feat_channels=mask_cfg["feat_channels"],
        out_channels=mask_cfg["out_channels"], num_groups=mask_cfg["norm_cfg"]["num_groups"])
    head = SOLOv2Head(
        mask_feat=mask_feat, num_classes=cfg["num_classes"], in_channels=cfg["in_channels"],
        feat_channels=cfg["feat_channels"], stacked_convs=cfg["stacked_convs"],
        num_grids=cfg["num_grids"], num_groups=cfg["norm_cfg"]["num_groups"])
    head.load_state_dict({mmdet_head_key_map(k): v for k, v in fixture["state_dict"].items()},
                         strict=True)
    return head


def _assert_outputs(actual: SOLOv2Output, expected: dict) -> None:
    for level, (k, c) in enumerate(zip(actual.kernel_preds, actual.cls_preds)):
        torch.testing.assert_close(k, expected["mlvl_kernel_preds"][level], **TOL)
        torch.testing.assert_close(c, expected["mlvl_cls_preds"][level], **TOL)
    torch.testing.assert_close(actual.mask_feats, expected["mask_feats"], **TOL)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_matches_mmdet(fixture, mode):
    head = _fixture_head(fixture).train(mode == "train")
    with torch.no_grad():
        outputs = head(fixture["inputs"]["feats"])
    assert isinstance(outputs, SOLOv2Output)
    assert len(outputs.kernel_preds) == len(outputs.cls_preds) == 5
    _assert_outputs(outputs, fixture[mode]["outputs"])


def test_outputs_give_mmdet_candidates(fixture):
    # The layout the post-processing relies on: sigmoid + points NMS, cells flattened level by
    # level, row-major, kernels gathered per cell; checked against mmdetection's candidate list.
    head = _fixture_head(fixture).eval()
    with torch.no_grad():
        out = head(fixture["inputs"]["feats"])
    scores = torch.cat([points_nms(c.sigmoid()).flatten(2) for c in out.cls_preds], 2)  # (N, C, G)
    kernels = torch.cat([k.flatten(2) for k in out.kernel_preds], 2)  # (N, E, G)
    for image, debug in enumerate(fixture["eval"]["debug"]):
        expected = debug["candidates"]
        cells, labels = (scores[image].T > 0.1).nonzero(as_tuple=True)  # (cell, class) order
        assert torch.equal(cells, expected["cell_index"])
        assert torch.equal(labels, expected["label"])
        torch.testing.assert_close(scores[image, labels, cells], expected["cls_score"], atol=1e-5,
                                   rtol=0)
        masks = torch.einsum("ek,ehw->khw", kernels[image][:, cells], out.mask_feats[image])
        areas = (masks.sigmoid() > 0.5).sum((1, 2)).float()  # (K,)
        assert torch.equal(areas, expected["mask_area"].float())


@pytest.mark.parametrize("config", ["solov2_r50_fpn_1x_coco", "solov2-light_r18_fpn_ms-3x_coco"])
def test_state_dict_keys_match_mmdet(config):
    assert_keys_match_mmdet(config, mmdet_model_key_map)


def test_key_map_names():
    assert mmdet_head_key_map("conv_cls.bias") == "cls_pred.bias"
    assert mmdet_head_key_map("conv_kernel.weight") == "kernel_pred.weight"
    assert mmdet_head_key_map("kernel_convs.3.gn.weight") == "kernel_convs.3.gn.weight"
    assert (mmdet_head_key_map("mask_feature_head.convs_all_levels.3.conv2.conv.weight")
            == "mask_feat.level_convs.3.2.conv.weight")
    assert (mmdet_model_key_map("mask_head.mask_feature_head.conv_pred.gn.bias")
            == "head.mask_feat.out_conv.gn.bias")
    with pytest.raises(KeyError):
        mmdet_head_key_map("kernel_convs.0.conv.conv_offset.weight")  # a DCN head
    with pytest.raises(KeyError):
        mmdet_model_key_map("bbox_head.conv.weight")


def test_init_matches_mmdet():
    torch.manual_seed(0)
    head = build_solov2_head(PRESETS["solov2_r50_fpn_1x_coco"].head)
    assert torch.allclose(head.cls_pred.bias, torch.full((80,), -4.59512), atol=1e-5)
    assert torch.count_nonzero(head.kernel_pred.bias) == 0
    for conv in (head.kernel_convs[1].conv, head.cls_convs[0].conv, head.cls_pred,
                 head.mask_feat.level_convs[3][0].conv):
        assert abs(conv.weight.std().item() - 0.01) < 5e-4
    # mmdetection's conv_pred ends up Kaiming-normal (fan_out = E): std sqrt(2 / 256)
    assert abs(head.mask_feat.out_conv.conv.weight.std().item() - (2 / 256) ** 0.5) < 5e-3
    gn = head.kernel_convs[0].gn
    assert torch.all(gn.weight == 1) and torch.all(gn.bias == 0) and gn.eps == 1e-5
    assert head.kernel_convs[0].conv.bias is None


def test_light_r18_model_forward():
    torch.manual_seed(0)
    model = build_model(get_preset("solov2-light_r18_fpn_ms-3x_coco", num_classes=3))
    assert isinstance(model, SOLOv2)
    model.train()
    out = model(torch.randn(2, 3, 96, 128))
    assert [tuple(k.shape) for k in out.kernel_preds] == [(2, 128, s, s) for s in
                                                          (40, 36, 24, 16, 12)]
    assert [tuple(c.shape) for c in out.cls_preds] == [(2, 3, s, s) for s in (40, 36, 24, 16, 12)]
    assert out.mask_feats.shape == (2, 128, 24, 32) and bool((out.mask_feats >= 0).all())
    (sum(k.sum() for k in [*out.kernel_preds, *out.cls_preds]) + out.mask_feats.sum()).backward()
    assert model.head.cls_convs[0].conv.weight.grad is not None  # cls path is in the graph too
    assert model.backbone.layer1[0].conv1.weight.grad is None  # frozen stage
    assert "MaskFeatModule" in repr(model)


def test_bad_inputs(fixture):
    head = _fixture_head(fixture)
    with pytest.raises(ValueError, match="expected 5 feature maps"):
        head(fixture["inputs"]["feats"][:4])
    with pytest.raises(ValueError, match="family 'solov2'"):
        build_solov2_head(PRESETS["solo_r50_fpn_1x_coco"].head)
    with pytest.raises(NotImplementedError, match="DCN/ResNeXt is not supported yet"):
        build_solov2_head(PRESETS["solov2-light_r50-dcn_fpn_ms-3x_coco"].head)
