"""solo_fast.losses against mmdetection 3.3's FocalLoss outputs (tests/fixtures/mmdet)."""

from pathlib import Path

import pytest
import torch

from solo_fast.losses import sigmoid_focal_loss

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mmdet"
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
