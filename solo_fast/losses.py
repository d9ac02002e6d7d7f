"""Losses of the SOLO family, as mmdetection 3.3 computes them (SPEC section 8).

The per-mask dice loss is the fused op ``solo_fast.ops.dice_loss``; this module holds the focal
loss of the category branch. The per-family criteria combine them with the targets of
``solo_fast.targets``.
"""

# M=cells of the whole batch (all images and levels), C=classes, N=images, K=positives,
# E=mask-feature channels, h, w=mask-map size

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from solo_fast.config import HeadConfig
from solo_fast.ops import dice_loss
from solo_fast.targets import LevelTargets, TargetConfig, solov2_targets

__all__ = ["FLOAT32_EPS", "SOLOv2Criterion", "category_loss", "dynamic_mask_logits",
           "sigmoid_focal_loss", "target_config"]

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


def target_config(head: HeadConfig) -> TargetConfig:
    """The grid-assignment settings of a head config."""
    return TargetConfig(num_grids=head.num_grids, scale_ranges=head.scale_ranges,
                        strides=head.strides, pos_scale=head.pos_scale,
                        num_classes=head.num_classes, mask_stride=head.mask_stride)


def category_loss(cls_preds: Sequence[Tensor], levels: Sequence[LevelTargets], *,
                  num_pos: Tensor, gamma: float, alpha: float) -> Tensor:
    """Focal loss over every cell of every level and image, normalised by num_pos + 1.

    Cells are ordered as mmdetection orders them: per level image-major, then levels.
    """
    logits = torch.cat([
        c.permute(0, 2, 3, 1).reshape(-1, c.shape[1])  # (N*S*S, C)
        for c in cls_preds])
    labels = torch.cat([level.labels.reshape(-1) for level in levels])  # (sum N*S*S,)
    return sigmoid_focal_loss(logits, labels, avg_factor=num_pos + 1, gamma=gamma, alpha=alpha)


class SOLOv2Criterion(nn.Module):
    """The training losses of SOLOv2 and Light SOLOv2 (SPEC section 8.3).

    Every positive (duplicates included) gets the dynamic mask ``kernel . mask_feats`` of its image;
    its dice loss against the GT mask it is assigned to is weighted by ``mask_loss_weight`` and the
    sum is divided by the number of *distinct* positive cells. The category loss is the focal loss
    of :func:`category_loss`.

    Args:
        targets: Grid assignment settings (:func:`target_config` of the head config).
        mask_loss_weight: Weight of the dice loss (3 in every mmdetection config).
        focal_gamma, focal_alpha: Focal loss parameters.
        dice_backend: ``backend`` of :func:`solo_fast.ops.dice_loss` (None: the default).
    """

    def __init__(self, *, targets: TargetConfig, mask_loss_weight: float = 3.0,
                 focal_gamma: float = 2.0, focal_alpha: float = 0.25,
                 dice_backend: str | None = None) -> None:
        super().__init__()
        self.targets = targets
        self.mask_loss_weight = mask_loss_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.dice_backend = dice_backend

    def forward(self, outputs, gt_instances: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Losses of one batch.

        Args:
            outputs: :class:`~solo_fast.models.solov2.SOLOv2Output` of the batch: kernel_preds
                L x (N, E, S, S), cls_preds L x (N, C, S, S), mask_feats (N, E, H/4, W/4).
            gt_instances: Per image ``{"masks": bool (M, Hp, Wp), "labels": int64 (M,),
                "boxes": (M, 4) xyxy}`` on the padded canvas.

        Returns:
            ``{"loss_mask": 0-d, "loss_cls": 0-d}``.
        """
        levels = solov2_targets(gt_instances, config=self.targets)
        num_pos = sum(level.num_pos for level in levels)
        mask_feats = outputs.mask_feats
        n, e, h, w = mask_feats.shape
        # Positives of all levels in mmdetection's order (level, image, instance, cell).
        kernels = torch.cat([
            k.flatten(2)[level.pos_image, :, level.pos_cell]  # (K_l, E)
            for k, level in zip(outputs.kernel_preds, levels)])  # (K, E)
        images = torch.cat([level.pos_image for level in levels])  # (K,)
        targets = torch.cat([level.gt_masks[level.pos_instance] for level in levels])  # (K, h, w)
        if kernels.shape[0] == 0:
            loss_mask = mask_feats.sum() * 0
        else:
            logits = dynamic_mask_logits(kernels, images, mask_feats)  # (K, h, w)
            dice = dice_loss(logits, targets, backend=self.dice_backend)  # (K,)
            loss_mask = (self.mask_loss_weight * dice).sum() / num_pos
        loss_cls = category_loss(outputs.cls_preds, levels, num_pos=num_pos,
                                 gamma=self.focal_gamma, alpha=self.focal_alpha)
        return {"loss_mask": loss_mask, "loss_cls": loss_cls}


def dynamic_mask_logits(kernels: Tensor, images: Tensor, mask_feats: Tensor) -> Tensor:
    """SOLOv2's dynamic 1x1 convolution: the mask logits of K kernels on their images' features.

    Args:
        kernels: (K, E) one kernel per positive.
        images: (K,) int64, the image of each kernel.
        mask_feats: (N, E, h, w).

    Returns:
        (K, h, w) logits.
    """
    n, e, h, w = mask_feats.shape
    logits = kernels.new_empty((kernels.shape[0], h * w))  # (K, h*w)
    for image in range(n):
        selected = images == image
        logits[selected] = kernels[selected] @ mask_feats[image].reshape(e, h * w)
    return logits.reshape(-1, h, w)  # (K, h, w)
