"""Losses of the SOLO family, as mmdetection 3.3 computes them (SPEC section 8).

The per-mask dice loss is the fused op ``solo_fast.ops.dice_loss``; this module holds the focal
loss of the category branch. The per-family criteria combine them with the targets of
``solo_fast.targets``.
"""

# M=cells of the whole batch (all images and levels), C=classes

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sigmoid_focal_loss", "FLOAT32_EPS"]

# mmdetection's weight_reduce_loss adds float32 machine epsilon to avg_factor.
FLOAT32_EPS = torch.finfo(torch.float32).eps


def sigmoid_focal_loss(logits: Tensor, labels: Tensor, *, avg_factor: float | Tensor,
                       gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Sigmoid focal loss of the category branch, summed and divided by ``avg_factor + eps``.

    mmdetection's CPU form (binary cross-entropy with logits times the focal weight), which the
    golden values come from; its CUDA kernel differs only for |logits| beyond ~88.

    Args:
        logits: (M, C) float class logits.
        labels: (M,) int64 in [0, C]; C is background (no class is positive).
        avg_factor: the normaliser, num_pos + 1 in every SOLO head.
        gamma: focusing exponent.
        alpha: weight of the positives (1 - alpha for the negatives).

    Returns:
        A 0-d tensor in logits' dtype.
    """
    if logits.dim() != 2:
        raise ValueError(f"sigmoid_focal_loss: logits must be (M, C), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"sigmoid_focal_loss: labels must have shape ({logits.shape[0]},), "
                         f"got {tuple(labels.shape)}")
    num_classes = logits.shape[1]
    # One column more for the background label, then dropped: background rows are all-negative.
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)  # (M, C)
    p = logits.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    return loss.sum() / (avg_factor + FLOAT32_EPS)
