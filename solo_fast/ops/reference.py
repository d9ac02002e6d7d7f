"""Readable PyTorch references of solo_fast's fused ops.

Each function states the maths of one op in plain tensor operations, as mmdetection 3.3 computes it.
Every compiled or Triton backend is tested against these; autograd differentiates them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dice_loss_reference"]


def dice_loss_reference(pred: Tensor, target: Tensor, *, logits: bool = True,
                        eps: float = 1e-3) -> Tensor:
    """Per-mask dice loss of SOLO (mmdetection ``DiceLoss``, ``naive_dice=False``, unweighted).

    Args:
        pred: (N, ...) logits (``logits=True``) or probabilities, any floating dtype.
        target: (N, ...) with pred's shape; bool, uint8 or floating.
        logits: apply a sigmoid to ``pred`` first.
        eps: added to each of the two squared sums.

    Returns:
        (N,) in pred's dtype: ``1 - 2 sum(p t) / ((sum(p^2) + eps) + (sum(t^2) + eps))``.
    """
    p = pred.sigmoid() if logits else pred
    p = p.flatten(1)  # (N, P)
    t = target.flatten(1).to(p.dtype)  # (N, P)
    a = (p * t).sum(1)
    b = (p * p).sum(1) + eps
    c = (t * t).sum(1) + eps
    return 1 - 2 * a / (b + c)
