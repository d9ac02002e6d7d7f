"""solo_fast.models.decoupled_solo and solo_fast.losses.DecoupledSOLOCriterion against
mmdetection 3.3's DecoupledSOLOHead and DecoupledSOLOLightHead
(tests/fixtures/mmdet/head_decoupled_solo.pt, head_decoupled_solo_light.pt)."""

from __future__ import annotations

import pytest
import torch

from solo_fast import build_model
from solo_fast.config import PRESETS, HeadConfig, get_preset
from solo_fast.losses import DecoupledSOLOCriterion
from solo_fast.models.decoupled_solo import (
    DecoupledSOLO,
    DecoupledSOLOHead,
    DecoupledSOLOLightHead,
    DecoupledSOLOOutput,
    build_decoupled_solo_head,
    mmdet_head_key_map,
    mmdet_model_key_map,
)
from tests.models.helpers import (
    BACKENDS,
    FIXTURES,
    GRAD_TOL,
    LOSS_TOL,
    TOL,
    assert_channel_subset,
    assert_keys_match_mmdet,
    assert_losses_match_mmdet,
    assert_total_gradients,
    eval_probabilities,
    gt_instances,
    head_kwargs,
    one_instance_gt,
    target_config,
)

# N=images, L=levels, S=grid side, C=classes, K=positives

VARIANTS = {"decoupled_solo": DecoupledSOLOHead, "decoupled_solo_light": DecoupledSOLOLightHead}
_CACHE: dict[str, dict] = {}


@pytest.fixture(params=list(VARIANTS))
def fixture(request) -> dict:
    if request.param not in _CACHE:
        _CACHE[request.param] = torch.load(FIXTURES / f"head_{request.param}.pt",
                                           weights_only=True)
    return _CACHE[request.param]


def _fixture_head(fixture: dict) -> DecoupledSOLOHead | DecoupledSOLOLightHead:
    head = VARIANTS[fixture["variant"]](**head_kwargs(fixture))
    head.load_state_dict({mmdet_head_key_map(k): v for k, v in fixture["state_dict"].items()},
                         strict=True)
    return head


def test_train_forward_matches_mmdet(fixture):
    head = _fixture_head(fixture).train()
    with torch.no_grad():
        out = head(fixture["inputs"]["feats"])
    assert isinstance(out, DecoupledSOLOOutput)
    expected = fixture["train"]["outputs"]
    for level in range(5):
        assert_channel_subset(out.mask_preds_x[level], expected["mlvl_mask_preds_x"][level],
                              **TOL, msg=f"X level {level}")
        assert_channel_subset(out.mask_preds_y[level], expected["mlvl_mask_preds_y"][level],
                              **TOL, msg=f"Y level {level}")
        torch.testing.assert_close(out.cls_preds[level], expected["mlvl_cls_preds"][level], **TOL)


def test_eval_forward_is_raw_and_gives_mmdet_eval_outputs(fixture):
    head = _fixture_head(fixture)
    with torch.no_grad():
        train_out = head.train()(fixture["inputs"]["feats"])
        eval_out = head.eval()(fixture["inputs"]["feats"])
    flat_train = [t for part in train_out for t in part]
    for a, b in zip(flat_train, [t for part in eval_out for t in part], strict=True):
        assert torch.equal(a, b)
    # mmdetection's eval forward: X and Y each sigmoided and resized to level 0's size
    masks_x, scores = eval_probabilities(eval_out.mask_preds_x, eval_out.cls_preds)
    masks_y, _ = eval_probabilities(eval_out.mask_preds_y, eval_out.cls_preds)
    expected = fixture["eval"]["outputs"]
    for level in range(5):
        assert_channel_subset(masks_x[level], expected["mlvl_mask_preds_x"][level], **TOL,
                              msg=f"eval X level {level}")
        assert_channel_subset(masks_y[level], expected["mlvl_mask_preds_y"][level], **TOL,
                              msg=f"eval Y level {level}")
        torch.testing.assert_close(scores[level], expected["mlvl_cls_preds"][level], **TOL)


@pytest.mark.parametrize("config", ["decoupled-solo_r50_fpn_1x_coco",
                                    "decoupled-solo-light_r50_fpn_3x_coco"])
def test_state_dict_keys_match_mmdet(config):
    assert_keys_match_mmdet(config, mmdet_model_key_map)


def test_key_map_names():
    assert mmdet_head_key_map("conv_mask_list_x.3.weight") == "mask_pred_x.3.weight"
    assert mmdet_head_key_map("conv_mask_list_y.0.bias") == "mask_pred_y.0.bias"
    assert mmdet_head_key_map("conv_cls.bias") == "cls_pred.bias"
    assert mmdet_head_key_map("mask_convs_y.6.conv.weight") == "mask_convs_y.6.conv.weight"
    assert mmdet_head_key_map("mask_convs.3.gn.bias") == "mask_convs.3.gn.bias"  # Light
    assert (mmdet_model_key_map("mask_head.mask_convs_x.0.gn.weight")
            == "head.mask_convs_x.0.gn.weight")
    with pytest.raises(KeyError):
        mmdet_head_key_map("mask_convs.3.conv.conv_offset.weight")  # a DCN Light head
    with pytest.raises(KeyError):
        mmdet_head_key_map("conv_mask_list.0.weight")  # a SOLO head
    with pytest.raises(KeyError):
        mmdet_model_key_map("bbox_head.conv.weight")


@pytest.mark.parametrize("preset", ["decoupled-solo_r50_fpn_1x_coco",
                                    "decoupled-solo-light_r50_fpn_3x_coco"])
def test_init_matches_mmdet(preset):
    torch.manual_seed(0)
    head = build_decoupled_solo_head(PRESETS[preset].head)
    light = "light" in preset
    assert isinstance(head, DecoupledSOLOLightHead if light else DecoupledSOLOHead)
    for convs in (head.mask_pred_x, head.mask_pred_y):
        assert [conv.out_channels for conv in convs] == [40, 36, 24, 16, 12]
        assert all(conv.kernel_size == (3, 3) for conv in convs)
    for conv in (head.mask_pred_x[0], head.mask_pred_y[4], head.cls_pred):
        assert torch.allclose(conv.bias, torch.full_like(conv.bias, -4.59512), atol=1e-5)
        assert abs(conv.weight.std().item() - 0.01) < 1e-3
    towers = [head.mask_convs] if light else [head.mask_convs_x, head.mask_convs_y]
    for tower in towers:
        assert len(tower) == (4 if light else 7)
        assert tower[0].conv.in_channels == (258 if light else 257)
        assert abs(tower[0].conv.weight.std().item() - 0.01) < 5e-4
    assert len(head.cls_convs) == len(towers[0]) and head.cls_convs[0].conv.in_channels == 256


@pytest.mark.parametrize("preset", ["decoupled-solo_r50_fpn_1x_coco",
                                    "decoupled-solo-light_r50_fpn_3x_coco"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_r18_preset_model_forward(preset, mode):
    torch.manual_seed(0)
    model = build_model(get_preset(preset, num_classes=3, **{"backbone.depth": 18}))
    assert isinstance(model, DecoupledSOLO)
    assert ("DecoupledSOLOLightHead" if "light" in preset else "DecoupledSOLOHead(") in repr(model)
    model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        out = model(torch.randn(1, 3, 64, 64))
    grids, mask_sizes = (40, 36, 24, 16, 12), (16, 16, 8, 4, 4)  # stride 4, 4, 8, 16, 16
    for preds in (out.mask_preds_x, out.mask_preds_y):
        assert [tuple(m.shape) for m in preds] == [(1, s, h, h) for s, h in zip(grids, mask_sizes)]
    assert [tuple(c.shape) for c in out.cls_preds] == [(1, 3, s, s) for s in grids]
    if mode == "train":
        sum(t.sum() for part in out for t in part).backward()
        assert model.head.cls_convs[0].conv.weight.grad is not None
        assert model.backbone.layer1[0].conv1.weight.grad is None  # frozen stage


def test_bad_inputs():
    head = DecoupledSOLOLightHead(in_channels=8, feat_channels=16, stacked_convs=2, num_groups=8)
    with pytest.raises(ValueError, match="expected 5 feature maps"):
        head([torch.zeros(1, 8, 8, 8)] * 4)
    with pytest.raises(ValueError, match="family 'decoupled_solo'"):
        build_decoupled_solo_head(PRESETS["solo_r50_fpn_1x_coco"].head)
    with pytest.raises(NotImplementedError, match="DCN"):
        build_decoupled_solo_head(HeadConfig(family="decoupled_solo_light", dcn=True))
    with pytest.raises(ValueError, match="cls_down_index"):
        DecoupledSOLOHead(stacked_convs=2, cls_down_index=5)


# ------------------------------------------------------------------------------------ criterion

def _criterion(fixture: dict, backend: str | None) -> DecoupledSOLOCriterion:
    return DecoupledSOLOCriterion(targets=target_config(fixture), dice_backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_criterion_matches_mmdet(fixture, backend):
    head = _fixture_head(fixture).train()
    feats = [f.clone().requires_grad_(True) for f in fixture["inputs"]["feats"]]
    out = head(feats)
    for tensor in [*out.mask_preds_x, *out.mask_preds_y]:
        tensor.retain_grad()
    expected = fixture["train"]
    losses = assert_losses_match_mmdet(_criterion(fixture, backend), out, gt_instances(fixture),
                                       expected)
    losses["loss_mask"].backward(retain_graph=True)
    grads = expected["grad_outputs"]
    for level in range(5):
        assert_channel_subset(out.mask_preds_x[level].grad, grads["mlvl_mask_preds_x"][level],
                              **GRAD_TOL, zero_elsewhere=True, msg=f"grad X level {level}")
        assert_channel_subset(out.mask_preds_y[level].grad, grads["mlvl_mask_preds_y"][level],
                              **GRAD_TOL, zero_elsewhere=True, msg=f"grad Y level {level}")

    assert_total_gradients(head, feats, losses, expected, mmdet_head_key_map, **GRAD_TOL)


def test_criterion_empty_ground_truth(fixture):
    head = _fixture_head(fixture).train()
    out = head(fixture["inputs"]["feats"])
    losses = _criterion(fixture, None)(out, gt_instances(fixture, empty=True))
    expected = fixture["train"]["loss_empty_gt"]
    assert expected["loss_mask"].item() == 0
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    torch.testing.assert_close(losses["loss_cls"].detach(), expected["loss_cls"], **LOSS_TOL)
    (losses["loss_mask"] + losses["loss_cls"]).backward()  # the mask branches stay in the graph
    for conv in (head.mask_pred_x[0], head.mask_pred_y[4]):
        assert conv.weight.grad is not None and torch.count_nonzero(conv.weight.grad) == 0


def test_criterion_one_instance_gives_both_losses(fixture):
    head = _fixture_head(fixture).train()
    out = head(fixture["inputs"]["feats"])
    losses = _criterion(fixture, None)(out, one_instance_gt(fixture))
    assert losses["loss_mask"].item() > 0 and losses["loss_cls"].item() > 0
