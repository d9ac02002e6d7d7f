"""Losses of the SOLO family, as mmdetection 3.3 computes them (docs/algorithms.md §9).

The criteria take a head's raw outputs and the GT instances of a batch and return
``{"loss_mask": ..., "loss_cls": ...}``:

* loss_mask: the dice loss of every positive against its GT mask at the mask-map size, times
  ``mask_loss_weight``, summed over all levels and images and divided by the number of positive
  cells. With no positive it is exactly 0 and still part of the graph, as in mmdetection. The
  dice is a fused op: ``solo_fast.ops.dice_loss`` on SOLO's logits,
  ``solo_fast.ops.decoupled_dice_loss`` on Decoupled SOLO's X/Y logits (the products are never
  stored), ``solo_fast.ops.dynamic_mask_dice_loss`` on SOLOv2's kernels and mask features (the
  logits are never stored); ``dice_backend="reference"`` selects the plain PyTorch path.
* loss_cls: the focal loss over every cell of every level and image, divided by num_pos + 1,
  times ``cls_loss_weight`` (mmdetection's ``loss_cls=dict(type='FocalLoss', loss_weight=1.0)``).

No dense (S*S, h, w) target stack is built: each positive gathers its own prediction and its GT
mask (``LevelTargets.gt_masks[pos_instance]``).
"""

# M=cells of the whole batch (all images and levels), C=classes, N=images, L=levels,
# S=grid side of a level, G=S*S cells of a level, K=positives, E=mask-feature channels,
# h, w=a level's mask-map size

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from solo_fast.config import HeadConfig
from solo_fast.ops import decoupled_dice_loss, dice_loss, dynamic_mask_dice_loss
from solo_fast.targets import (
    LevelTargets,
    TargetConfig,
    decoupled_solo_targets,
    solo_targets,
    solov2_targets,
)

__all__ = ["FLOAT32_EPS", "DecoupledSOLOCriterion", "SOLOCriterion", "SOLOv2Criterion",
           "build_criterion", "category_loss", "sigmoid_focal_loss",
           "target_config"]

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
                  avg_factor: Tensor, gamma: float, alpha: float) -> Tensor:
    """Focal loss over every cell of every level and image, divided by ``avg_factor``
    (num_pos + 1 in mmdetection).

    Cells are ordered as mmdetection orders them: per level image-major, then levels.
    """
    logits = torch.cat([
        c.permute(0, 2, 3, 1).reshape(-1, c.shape[1])  # (N*S*S, C)
        for c in cls_preds])
    labels = torch.cat([level.labels.reshape(-1) for level in levels])  # (sum N*S*S,)
    return sigmoid_focal_loss(logits, labels, avg_factor=avg_factor, gamma=gamma, alpha=alpha)


class _Criterion(nn.Module):
    """What every criterion shares: settings, the mask-loss reduction and the category loss.

    Args:
        targets: Grid assignment settings (:func:`~solo_fast.losses.target_config` of the head
            config); ``targets.num_classes`` is the background label.
        mask_loss_weight: Weight of the dice loss (3 in every mmdetection config).
        cls_loss_weight: Weight of the focal loss (1 in every mmdetection config).
        focal_gamma, focal_alpha: Focal loss parameters.
        dice_backend: ``backend`` of :func:`solo_fast.ops.dice_loss` (None: the default).
    """

    def __init__(self, *, targets: TargetConfig, mask_loss_weight: float = 3.0,
                 cls_loss_weight: float = 1.0, focal_gamma: float = 2.0,
                 focal_alpha: float = 0.25, dice_backend: str | None = None) -> None:
        super().__init__()
        self.targets = targets
        self.mask_loss_weight = mask_loss_weight
        self.cls_loss_weight = cls_loss_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.dice_backend = dice_backend
        # Set by the trainer under torch.distributed (see forward).
        self.sync_num_pos = False

    def assign(self, gt_instances: Sequence[Mapping[str, Tensor]]) -> list[LevelTargets]:
        """The targets of a batch (one :class:`~solo_fast.targets.LevelTargets` per level)."""
        raise NotImplementedError

    def mask_losses(self, outputs, levels: Sequence[LevelTargets]) -> list[Tensor]:
        """Weighted dice loss of every positive, per level: L tensors (K_l,), mmdetection's order
        (image-major, then cell). Empty levels give empty tensors tied to the outputs."""
        raise NotImplementedError

    def empty_mask_loss(self, outputs, terms: Tensor) -> Tensor:
        """loss_mask of a batch without positives: exactly 0, tied to every mask output so that
        backward (and DDP) reaches every parameter of the mask branch."""
        # mmdetection: the sum of empty selections of the mask outputs
        return terms.sum()

    def forward(self, outputs, gt_instances: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Losses of one batch.

        Args:
            outputs: The head's raw outputs for the batch (``SOLOOutput``,
                ``DecoupledSOLOOutput`` or ``SOLOv2Output`` of :mod:`solo_fast.models`).
            gt_instances: Per image ``{"masks": bool (M, Hp, Wp), "labels": int64 (M,),
                "boxes": (M, 4) xyxy}`` on the padded canvas (Hp, Wp = 4x the level-0 mask map).

        Returns:
            ``{"loss_mask": 0-d, "loss_cls": 0-d}``.
        """
        levels = self.assign(gt_instances)
        num_pos = sum(level.num_pos for level in levels)
        processes = 1
        if self.sync_num_pos and dist.is_available() and dist.is_initialized():
            # Normalise by the positives of the whole distributed batch (spread over the
            # processes, whose gradients DDP averages): the losses and gradients are then those of
            # one process with the whole batch. mmdetection normalises per process instead.
            processes = dist.get_world_size()
            num_pos = num_pos.to(torch.float64)
            dist.all_reduce(num_pos)
        terms = torch.cat(self.mask_losses(outputs, levels))  # (sum K,)
        if terms.shape[0] == 0:
            loss_mask = self.empty_mask_loss(outputs, terms)
        else:
            loss_mask = terms.sum() * processes / num_pos
        # mmdetection's FocalLoss.forward: loss_weight times the reduced (averaged) loss
        loss_cls = self.cls_loss_weight * category_loss(
            outputs.cls_preds, levels, avg_factor=(num_pos + 1) / processes,
            gamma=self.focal_gamma, alpha=self.focal_alpha)
        return {"loss_mask": loss_mask, "loss_cls": loss_cls}


def _gather(preds: Tensor, image: Tensor, channel: Tensor) -> Tensor:
    """``preds[image, channel]`` for preds (N, Q, h, w) -> (K, h, w), through index_select."""
    n, q, h, w = preds.shape
    return preds.reshape(n * q, h, w).index_select(0, image * q + channel)  # (K, h, w)


class SOLOCriterion(_Criterion):
    """The training losses of SOLO (docs/algorithms.md §9.3).

    Each positive cell (i, j) of a level takes mask-logit channel i * S + j of its image; its dice
    loss (sigmoid inside the op) against the GT mask it is assigned to is weighted by
    ``mask_loss_weight``, and the sum over all positives is divided by their number. Where GTs
    share a cell the later GT is the target (``solo_targets``).

    Constructor arguments: those of every criterion (``_Criterion``).
    """

    def assign(self, gt_instances: Sequence[Mapping[str, Tensor]]) -> list[LevelTargets]:
        """:func:`solo_fast.targets.solo_targets` of the batch."""
        return solo_targets(gt_instances, config=self.targets)

    def mask_losses(self, outputs, levels: Sequence[LevelTargets]) -> list[Tensor]:
        """Weighted dice loss of every positive, per level.

        Args:
            outputs: :class:`~solo_fast.models.solo.SOLOOutput`; mask_preds L x (N, G, h, w).
            levels: The batch's targets.

        Returns:
            L tensors (K_l,), positives ordered by (image, cell) as mmdetection orders them.
        """
        losses = []
        for preds, level in zip(outputs.mask_preds, levels):
            logits = _gather(preds, level.pos_image, level.pos_cell)  # (K, h, w)
            if logits.shape[0] == 0:
                losses.append(logits.sum(dim=(1, 2)))  # (0,), still tied to the graph
                continue
            target = level.gt_masks[level.pos_instance]  # (K, h, w) bool
            dice = dice_loss(logits, target, logits=True, backend=self.dice_backend)
            losses.append(self.mask_loss_weight * dice)
        return losses


class DecoupledSOLOCriterion(_Criterion):
    """The training losses of Decoupled SOLO and Decoupled SOLO Light (docs/algorithms.md §9.3).

    The soft mask of positive cell (i, j) is p = sigmoid(Y[i]) * sigmoid(X[j]) of its image; its
    dice loss (:func:`solo_fast.ops.decoupled_dice_loss`, which never stores p) is weighted by
    ``mask_loss_weight`` and the sum over all positives divided by their number.

    Constructor arguments: those of every criterion (``_Criterion``).
    """

    def assign(self, gt_instances: Sequence[Mapping[str, Tensor]]) -> list[LevelTargets]:
        """:func:`solo_fast.targets.decoupled_solo_targets` of the batch."""
        return decoupled_solo_targets(gt_instances, config=self.targets)

    def mask_losses(self, outputs, levels: Sequence[LevelTargets]) -> list[Tensor]:
        """Weighted dice loss of every positive, per level.

        Args:
            outputs: :class:`~solo_fast.models.decoupled_solo.DecoupledSOLOOutput`;
                mask_preds_x and mask_preds_y L x (N, S, h, w).
            levels: The batch's targets.

        Returns:
            L tensors (K_l,), positives ordered by (image, row, column) as mmdetection orders
            them.
        """
        losses = []
        for preds_x, preds_y, level in zip(outputs.mask_preds_x, outputs.mask_preds_y, levels):
            if level.pos_cell.shape[0] == 0:
                losses.append(preds_x.flatten()[:0] + preds_y.flatten()[:0])  # (0,), in the graph
                continue
            target = level.gt_masks[level.pos_instance]  # (K, h, w) bool
            # The fused op forms sigmoid(Y[i]) * sigmoid(X[j]) of each positive in its kernels and
            # never stores these (K, h, w) products; its backward sums the terms of the positives
            # that share a row or column of X and Y.
            dice = decoupled_dice_loss(preds_x, preds_y, level.pos_image, level.pos_row,
                                       level.pos_col, target, backend=self.dice_backend)
            losses.append(self.mask_loss_weight * dice)
        return losses


class SOLOv2Criterion(_Criterion):
    """The training losses of SOLOv2 and Light SOLOv2 (docs/algorithms.md §9.3).

    Every positive (duplicates included) gets the dynamic mask ``kernel . mask_feats`` of its
    image; its dice loss (sigmoid inside the op) against the GT mask it is assigned to is weighted
    by ``mask_loss_weight``, and the sum is divided by the number of *distinct* positive cells.

    Constructor arguments: those of every criterion (``_Criterion``).
    """

    def assign(self, gt_instances: Sequence[Mapping[str, Tensor]]) -> list[LevelTargets]:
        """:func:`solo_fast.targets.solov2_targets` of the batch."""
        return solov2_targets(gt_instances, config=self.targets)

    def mask_losses(self, outputs, levels: Sequence[LevelTargets]) -> list[Tensor]:
        """Weighted dice loss of every positive, per level.

        All levels of the batch go through ONE call of
        :func:`solo_fast.ops.dynamic_mask_dice_loss` (every level's targets are at the
        mask-feature size), which never stores the (K, h, w) logits; ``dice_backend="reference"``
        runs its PyTorch reference instead. The (sum K,) result is split back into levels.

        Args:
            outputs: ``SOLOv2Output``; kernel_preds L x (N, E, S, S), mask_feats (N, E, h, w).
            levels: The batch's targets.

        Returns:
            L tensors (K_l,), positives ordered by (image, instance, cell) as mmdetection orders
            them.
        """
        kernels = [kernel_preds.flatten(2)[level.pos_image, :, level.pos_cell]  # (K_l, E)
                   for kernel_preds, level in zip(outputs.kernel_preds, levels)]
        counts = [k.shape[0] for k in kernels]
        if sum(counts) == 0:
            return [k.sum(dim=1) for k in kernels]  # L x (0,), still tied to the graph
        pos_image = torch.cat([level.pos_image for level in levels])  # (sum K,)
        target = torch.cat([level.gt_masks[level.pos_instance]
                            for level in levels])  # (sum K, h, w)
        # Under autocast the two branches may end in different dtypes: the op takes one.
        mask_feats = outputs.mask_feats
        dtype = torch.promote_types(kernels[0].dtype, mask_feats.dtype)
        dice = dynamic_mask_dice_loss(torch.cat(kernels).to(dtype), mask_feats.to(dtype),
                                      pos_image, target, backend=self.dice_backend)  # (sum K,)
        return list((self.mask_loss_weight * dice).split(counts))

    def empty_mask_loss(self, outputs, terms: Tensor) -> Tensor:
        """mmdetection's ``mask_feats.sum() * 0``, plus the kernel branch times 0: the value and
        the gradients are mmdetection's (zeros), and under DDP no parameter is left unused."""
        kernels = sum(kernel_preds.sum() for kernel_preds in outputs.kernel_preds)
        return (outputs.mask_feats.sum() + kernels) * 0


_CRITERIA = {"solo": SOLOCriterion, "decoupled_solo": DecoupledSOLOCriterion,
             "decoupled_solo_light": DecoupledSOLOCriterion, "solov2": SOLOv2Criterion}


def build_criterion(head: HeadConfig, *, dice_backend: str | None = None) -> _Criterion:
    """The criterion of a head config's family, with its loss weights and focal parameters."""
    return _CRITERIA[head.family](
        targets=target_config(head), mask_loss_weight=head.mask_loss_weight,
        cls_loss_weight=head.cls_loss_weight, focal_gamma=head.focal_gamma,
        focal_alpha=head.focal_alpha, dice_backend=dice_backend)
