"""Every family, built from its mmdetection preset: train and predict on CPU via the public API."""

import pytest
import torch

import solo_fast
from solo_fast.models.detector import SOLODetector

# One preset per family (ResNet-18 backbones to keep the step small).
FAMILY_PRESETS = [
    "solo_r50_fpn_1x_coco",
    "decoupled-solo_r50_fpn_1x_coco",
    "decoupled-solo-light_r50_fpn_3x_coco",
    "solov2_r50_fpn_1x_coco",
    "solov2-light_r18_fpn_ms-3x_coco",
]


def _targets(height, width):
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 8:40, 10:50] = True  # ~36 px: level 0
    masks[1, 20:60, 40:90] = True
    boxes = torch.tensor([[10.0, 8.0, 50.0, 40.0], [40.0, 20.0, 90.0, 60.0]])
    return [{"masks": masks, "labels": torch.tensor([0, 2]), "boxes": boxes},
            {"masks": masks[:0], "labels": torch.zeros(0, dtype=torch.int64),
             "boxes": torch.zeros(0, 4)}]


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_training_step(preset):
    torch.manual_seed(0)
    model = solo_fast.build_model(preset, num_classes=3, depth=18)
    assert isinstance(model, SOLODetector)
    model.train()
    images = torch.randn(2, 3, 64, 96)
    losses = model.loss(model(images), _targets(64, 96))
    assert set(losses) == {"loss_mask", "loss_cls"}
    assert all(torch.isfinite(value) and value > 0 for value in losses.values())
    sum(losses.values()).backward()
    head_grads = [p.grad for p in model.head.parameters()]
    assert all(grad is not None for grad in head_grads)  # every head parameter is in the graph
    assert model.backbone.layer1[0].conv1.weight.grad is None  # frozen stage


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_empty_batch_keeps_every_head_parameter_in_the_graph(preset):
    torch.manual_seed(0)
    model = solo_fast.build_model(preset, num_classes=3, depth=18).train()
    empty = _targets(64, 96)[1]
    losses = model.loss(model(torch.randn(2, 3, 64, 96)), [empty, empty])
    assert losses["loss_mask"].item() == 0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    # DDP needs every parameter to get a gradient, zero or not.
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_predict_returns_instances_at_the_original_size(preset):
    torch.manual_seed(0)
    model = solo_fast.build_model(preset, num_classes=3, depth=18, score_thr=0.0).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 96))
        predictions = model.predict(outputs, [(64, 90), (50, 96)], [(128, 180), (75, 144)])
    assert len(predictions) == 2
    for prediction, (height, width) in zip(predictions, [(128, 180), (75, 144)]):
        count = prediction["scores"].shape[0]
        assert prediction["masks"].shape == (count, height, width)
        assert prediction["masks"].dtype == torch.bool
        assert prediction["labels"].dtype == torch.int64 and prediction["boxes"].shape == (count, 4)
        assert bool((prediction["labels"] < 3).all())
        assert torch.equal(prediction["scores"], prediction["scores"].sort(descending=True)[0])
