"""solo_fast.losses against mmdetection 3.3's FocalLoss outputs (tests/fixtures/mmdet)."""

import dataclasses

import pytest
import torch

from solo_fast.config import HeadConfig
from solo_fast.losses import SOLOv2Criterion, build_criterion, sigmoid_focal_loss
from solo_fast.models.solov2 import mmdet_head_key_map
from tests.models.helpers import (
    FIXTURES,
    assert_total_gradients,
    gt_instances,
    one_instance_gt,
    target_config,
)
from tests.models.test_solov2 import _fixture_head

FOCAL_CASES = torch.load(FIXTURES / "focal_loss.pt", weights_only=False)["cases"]


@pytest.mark.parametrize("case", FOCAL_CASES, ids=lambda case: case["name"])
def test_focal_loss_matches_mmdetection(case):
    inputs, outputs = case["inputs"], case["outputs"]
    logits = inputs["logits"].clone().requires_grad_(True)
    loss = sigmoid_focal_loss(logits, inputs["labels"], avg_factor=inputs["avg_factor"])
    torch.testing.assert_close(loss.detach(), outputs["loss"], rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, outputs["grad_logits"], rtol=1e-4, atol=1e-6)


def test_focal_loss_rejects_mismatched_labels():
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        sigmoid_focal_loss(torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64), avg_factor=1.0)


# ------------------------------------------------------------------------------------------------
# SOLOv2 criterion against head_solov2.pt (mmdetection's loss_by_feat on a small head)

SOLOV2 = torch.load(FIXTURES / "head_solov2.pt", weights_only=False)


def _solov2_criterion(backend):
    return SOLOv2Criterion(targets=target_config(SOLOV2), dice_backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_solov2_criterion_matches_mmdetection(backend):
    head = _fixture_head(SOLOV2).train()
    feats = [f.clone().requires_grad_(True) for f in SOLOV2["inputs"]["feats"]]
    outputs = head(feats)
    for tensor in outputs.kernel_preds + [outputs.mask_feats]:
        tensor.retain_grad()
    losses = _solov2_criterion(backend)(outputs, gt_instances(SOLOV2))
    expected = SOLOV2["train"]
    for name in ("loss_mask", "loss_cls"):
        torch.testing.assert_close(losses[name].detach(), expected["loss"][name], rtol=1e-5, atol=0)

    losses["loss_mask"].backward(retain_graph=True)
    grads = expected["grad_outputs"]
    torch.testing.assert_close(outputs.mask_feats.grad, grads["mask_feats"], rtol=1e-4, atol=1e-6)
    for level, (kernel, sparse) in enumerate(zip(outputs.kernel_preds, grads["mlvl_kernel_preds"])):
        dense = torch.zeros(sparse["shape"]).flatten(2)  # (N, E, S*S)
        for image, (cells, values) in enumerate(zip(sparse["cells"], sparse["values"])):
            dense[image][:, cells] = values
        torch.testing.assert_close(kernel.grad.flatten(2), dense, rtol=1e-4, atol=1e-6,
                                   msg=f"level {level}")

    assert_total_gradients(head, feats, losses, expected, mmdet_head_key_map)


def test_solov2_criterion_empty_ground_truth():
    head = _fixture_head(SOLOV2).train()
    outputs = head(SOLOV2["inputs"]["feats"])
    losses = _solov2_criterion(None)(outputs, gt_instances(SOLOV2, empty=True))
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    torch.testing.assert_close(losses["loss_cls"].detach(),
                               SOLOV2["train"]["loss_empty_gt"]["loss_cls"], rtol=1e-5, atol=0)
    (losses["loss_mask"] + losses["loss_cls"]).backward()  # the mask branch stays in the graph
    assert head.mask_feat.out_conv.conv.weight.grad is not None


def test_solov2_criterion_one_instance_gives_both_losses():
    head = _fixture_head(SOLOV2).train()
    outputs = head(SOLOV2["inputs"]["feats"])
    losses = _solov2_criterion(None)(outputs, one_instance_gt(SOLOV2))
    assert losses["loss_mask"].item() > 0 and losses["loss_cls"].item() > 0


def test_solov2_fused_and_reference_paths_agree():
    """The fused op (one call for all levels) and the reference path: same losses, same grads."""
    results = []
    for backend in ("cpu", "reference"):
        head = _fixture_head(SOLOV2).train()
        feats = [f.clone().requires_grad_(True) for f in SOLOV2["inputs"]["feats"]]
        outputs = head(feats)
        leaves = outputs.kernel_preds + [outputs.mask_feats]
        losses = _solov2_criterion(backend)(outputs, gt_instances(SOLOV2))
        grads = torch.autograd.grad(losses["loss_mask"], leaves)
        results.append((losses["loss_mask"].detach(), losses["loss_cls"].detach(), grads))
    (mask, cls, grads), (ref_mask, ref_cls, ref_grads) = results
    torch.testing.assert_close(mask, ref_mask, rtol=1e-6, atol=0)
    torch.testing.assert_close(cls, ref_cls, rtol=0, atol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_cls_loss_weight_scales_loss_cls_and_leaves_loss_mask():
    """HeadConfig.cls_loss_weight is mmdetection's FocalLoss loss_weight: loss_cls times it."""
    cfg = SOLOV2["head_cfg"]
    head_cfg = HeadConfig(family="solov2", num_classes=cfg["num_classes"],
                          num_grids=cfg["num_grids"], scale_ranges=cfg["scale_ranges"],
                          strides=cfg["strides"], pos_scale=cfg["pos_scale"])
    assert head_cfg.cls_loss_weight == cfg["loss_cls"]["loss_weight"] == 1.0
    head = _fixture_head(SOLOV2).train()
    outputs = head(SOLOV2["inputs"]["feats"])
    losses = {weight: build_criterion(dataclasses.replace(head_cfg, cls_loss_weight=weight))(
        outputs, gt_instances(SOLOV2)) for weight in (1.0, 2.0, 0.3, 0.0)}
    torch.testing.assert_close(losses[1.0]["loss_cls"].detach(),
                               SOLOV2["train"]["loss"]["loss_cls"], rtol=1e-5, atol=0)
    base_cls, base_mask = losses[1.0]["loss_cls"], losses[1.0]["loss_mask"]
    assert base_cls.item() > 0
    for weight in (2.0, 0.3, 0.0):
        assert torch.equal(losses[weight]["loss_cls"], weight * base_cls), weight
        assert torch.equal(losses[weight]["loss_mask"], base_mask), weight
