"""solo_fast.models.solo and solo_fast.losses.SOLOCriterion against mmdetection 3.3's SOLOHead
(tests/fixtures/mmdet/head_solo.pt)."""

from __future__ import annotations

import pytest
import torch

from solo_fast import build_model
from solo_fast.config import PRESETS, get_preset
from solo_fast.losses import SOLOCriterion
from solo_fast.models.solo import (
    SOLO,
    SOLOHead,
    SOLOOutput,
    build_solo_head,
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

# N=images, L=levels, S=grid side, G=S*S cells of a level, C=classes, K=positives


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURES / "head_solo.pt", weights_only=True)


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
    expected = fixture["train"]
    losses = assert_losses_match_mmdet(_criterion(fixture, backend), out, gt_instances(fixture),
                                       expected)
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
    losses = _criterion(fixture, None)(out, one_instance_gt(fixture))
    assert losses["loss_mask"].item() > 0 and losses["loss_cls"].item() > 0
