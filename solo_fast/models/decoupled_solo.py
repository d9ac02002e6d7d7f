"""Decoupled SOLO and Decoupled SOLO Light (mmdetection 3.3 ``DecoupledSOLOHead`` and
``DecoupledSOLOLightHead``, docs/algorithms.md §6).

Instead of one mask channel per grid cell, each level predicts S "X" maps (one per grid column)
and S "Y" maps (one per grid row); the mask of cell (i, j) is sigmoid(Y[i]) * sigmoid(X[j]).
Decoupled SOLO has separate X and Y towers (with the x, respectively y, coordinate channel); the
Light head shares one tower (with both coordinates) between its X and Y output convs.

Heads -> model -> builder -> mmdetection key map. The model returns raw per-level logits, in
train and eval mode alike; mmdetection's eval-mode sigmoid, resize to level 0's size and points
NMS belong to the post-processing, the losses to ``solo_fast.losses``.

================================================  ====================================
mmdetection (``mask_head.`` prefix in a detector)  solo_fast (``head.`` prefix)
================================================  ====================================
``mask_convs_x.{i}``, ``mask_convs_y.{i}``,        unchanged
``mask_convs.{i}`` (Light), ``cls_convs.{i}``
``conv_mask_list_x.{l}``, ``conv_mask_list_y.{l}``  ``mask_pred_x.{l}``, ``mask_pred_y.{l}``
``conv_cls``                                      ``cls_pred``
================================================  ====================================
"""

# N=images, L=levels, S=grid side of a level, C=classes, F=tower channels,
# h, w=size of a level's resized feature (its mask maps are 2h x 2w)

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from solo_fast.config import HeadConfig, ModelConfig
from solo_fast.models.common import (
    conv_tower,
    coord_features,
    init_output_convs,
    resize_feats,
    upsample2x,
)
from solo_fast.models.detector import (
    CONV_GN_KEYS,
    SOLODetector,
    build_detector,
    mmdet_detector_key,
    rename_key,
)
from solo_fast.models.solo import category_logits

__all__ = [
    "DecoupledSOLO",
    "DecoupledSOLOHead",
    "DecoupledSOLOLightHead",
    "DecoupledSOLOOutput",
    "build_decoupled_solo",
    "build_decoupled_solo_head",
    "mmdet_head_key_map",
    "mmdet_model_key_map",
]


class DecoupledSOLOOutput(NamedTuple):
    """Raw Decoupled SOLO outputs (mmdetection's train-mode
    ``mlvl_mask_preds_x, mlvl_mask_preds_y, mlvl_cls_preds``).

    Attributes:
        mask_preds_x: L tensors (N, S_l, 2h_l, 2w_l); logits, channel j belongs to grid column j.
        mask_preds_y: L tensors (N, S_l, 2h_l, 2w_l); logits, channel i belongs to grid row i.
            The mask of cell (i, j) is ``sigmoid(mask_preds_y[:, i]) * sigmoid(mask_preds_x[:,
            j])``. The maps are at stride 4, 4, 8, 16, 16 of the padded input.
        cls_preds: L tensors (N, C, S_l, S_l); class logits (no sigmoid, no points NMS).
    """

    mask_preds_x: list[Tensor]
    mask_preds_y: list[Tensor]
    cls_preds: list[Tensor]


class _DecoupledHeadBase(nn.Module):
    """Class tower and the per-level X / Y / class output convs both Decoupled heads share."""

    def __init__(self, *, num_classes: int, in_channels: int, feat_channels: int,
                 stacked_convs: int, num_grids: Sequence[int], cls_down_index: int,
                 num_groups: int) -> None:
        super().__init__()
        if not 0 <= cls_down_index < stacked_convs:
            raise ValueError(f"cls_down_index must be in [0, {stacked_convs}), "
                             f"got {cls_down_index}")
        self.num_classes = num_classes
        self.num_grids = tuple(num_grids)
        self.cls_down_index = cls_down_index
        self.cls_convs = conv_tower(in_channels, feat_channels, stacked_convs,
                                    num_groups=num_groups)
        self.mask_pred_x = nn.ModuleList(
            nn.Conv2d(feat_channels, grid, 3, padding=1) for grid in num_grids)
        self.mask_pred_y = nn.ModuleList(
            nn.Conv2d(feat_channels, grid, 3, padding=1) for grid in num_grids)
        self.cls_pred = nn.Conv2d(feat_channels, num_classes, 3, padding=1)

    def _init_outputs(self) -> None:
        init_output_convs(*self.mask_pred_x, *self.mask_pred_y, self.cls_pred)

    def _mask_features(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """(N, in_channels, h, w) -> the upsampled X and Y tower outputs, each (N, F, 2h, 2w)."""
        raise NotImplementedError

    def forward(self, feats: Sequence[Tensor]) -> DecoupledSOLOOutput:
        """Raw outputs for FPN maps P2..P6.

        Args:
            feats: L tensors (N, in_channels, h_l, w_l), the FPN outputs of a canvas padded to a
                multiple of 32 (P2 at stride 4 ... P6 at stride 64).

        Returns:
            :class:`DecoupledSOLOOutput`; identical in train and eval mode.
        """
        if len(feats) != len(self.num_grids):
            raise ValueError(f"expected {len(self.num_grids)} feature maps, got {len(feats)}")
        preds_x, preds_y, cls_preds = [], [], []
        for level, (feat, grid) in enumerate(zip(resize_feats(feats), self.num_grids)):
            x_feat, y_feat = self._mask_features(feat)
            preds_x.append(self.mask_pred_x[level](x_feat))  # (N, S, 2h, 2w)
            preds_y.append(self.mask_pred_y[level](y_feat))  # (N, S, 2h, 2w)
            cls_preds.append(category_logits(feat, grid, self.cls_convs, self.cls_pred,
                                             down_index=self.cls_down_index))
        return DecoupledSOLOOutput(preds_x, preds_y, cls_preds)


class DecoupledSOLOHead(_DecoupledHeadBase):
    """Separate X and Y mask towers, a class tower, and per-level 3x3 X / Y output convs
    (docs/algorithms.md §6).

    X path: [feature, x] -> X tower -> bilinear x2 -> 3x3 conv to S_l channels; the Y path is the
    same with the y coordinate. Category path: :func:`~solo_fast.models.solo.category_logits`.
    All towers are shared by the levels.

    Args:
        num_classes: C, foreground classes.
        in_channels: Channels of the FPN maps.
        feat_channels: F, width of the towers.
        stacked_convs: ConvGNReLU layers per tower (7).
        num_grids: S per level.
        cls_down_index: The class feature is resized to S x S before this tower conv.
        num_groups: GroupNorm groups of the towers.
    """

    def __init__(
        self,
        *,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 7,
        num_grids: Sequence[int] = (40, 36, 24, 16, 12),
        cls_down_index: int = 0,
        num_groups: int = 32,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels,
                         feat_channels=feat_channels, stacked_convs=stacked_convs,
                         num_grids=num_grids, cls_down_index=cls_down_index,
                         num_groups=num_groups)
        self.mask_convs_x = conv_tower(in_channels + 1, feat_channels, stacked_convs,
                                       num_groups=num_groups)
        self.mask_convs_y = conv_tower(in_channels + 1, feat_channels, stacked_convs,
                                       num_groups=num_groups)
        self._init_outputs()

    def _mask_features(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        coords = coord_features(feat)  # (N, 2, h, w): [x, y]
        x_feat = torch.cat([feat, coords[:, :1]], 1)  # (N, in_channels + 1, h, w)
        y_feat = torch.cat([feat, coords[:, 1:]], 1)  # (N, in_channels + 1, h, w)
        return upsample2x(self.mask_convs_x(x_feat)), upsample2x(self.mask_convs_y(y_feat))


class DecoupledSOLOLightHead(_DecoupledHeadBase):
    """One mask tower shared by the X and Y output convs, and a class tower
    (docs/algorithms.md §6.3).

    Mask path: [feature, x, y] -> tower -> bilinear x2, then separate 3x3 X and Y convs to S_l
    channels each. Category path: :func:`~solo_fast.models.solo.category_logits`.

    Args:
        num_classes: C, foreground classes.
        in_channels: Channels of the FPN maps.
        feat_channels: F, width of the towers.
        stacked_convs: ConvGNReLU layers per tower (4).
        num_grids: S per level.
        cls_down_index: The class feature is resized to S x S before this tower conv.
        num_groups: GroupNorm groups of the towers.
    """

    def __init__(
        self,
        *,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_grids: Sequence[int] = (40, 36, 24, 16, 12),
        cls_down_index: int = 0,
        num_groups: int = 32,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels,
                         feat_channels=feat_channels, stacked_convs=stacked_convs,
                         num_grids=num_grids, cls_down_index=cls_down_index,
                         num_groups=num_groups)
        self.mask_convs = conv_tower(in_channels + 2, feat_channels, stacked_convs,
                                     num_groups=num_groups)
        self._init_outputs()

    def _mask_features(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([feat, coord_features(feat)], 1)  # (N, in_channels + 2, h, w)
        x = upsample2x(self.mask_convs(x))  # (N, F, 2h, 2w)
        return x, x


class DecoupledSOLO(SOLODetector):
    """Backbone -> FPN -> :class:`DecoupledSOLOHead` or :class:`DecoupledSOLOLightHead`; outputs
    :class:`DecoupledSOLOOutput`."""


_HEADS = {"decoupled_solo": DecoupledSOLOHead, "decoupled_solo_light": DecoupledSOLOLightHead}


def build_decoupled_solo_head(cfg: HeadConfig) -> DecoupledSOLOHead | DecoupledSOLOLightHead:
    """The Decoupled SOLO head (family ``decoupled_solo``) or the Light one
    (``decoupled_solo_light``) of a head config.

    Raises:
        ValueError: another family.
        NotImplementedError: DCN is requested.
    """
    if cfg.family not in _HEADS:
        raise ValueError(f"build_decoupled_solo_head needs family 'decoupled_solo' or "
                         f"'decoupled_solo_light', got {cfg.family!r}")
    if cfg.dcn:
        raise NotImplementedError("DCN is not supported yet: the Decoupled SOLO heads have no "
                                  "deformable convolutions (head.dcn)")
    return _HEADS[cfg.family](
        num_classes=cfg.num_classes, in_channels=cfg.in_channels, feat_channels=cfg.feat_channels,
        stacked_convs=cfg.stacked_convs, num_grids=cfg.num_grids,
        cls_down_index=cfg.cls_down_index, num_groups=cfg.norm_groups)


def build_decoupled_solo(cfg: ModelConfig, **parts: Any) -> DecoupledSOLO:
    """A Decoupled SOLO / Decoupled SOLO Light detector from a config, e.g. a
    :data:`~solo_fast.config.PRESETS` one.

    Raises:
        NotImplementedError: DCN or ResNeXt configs (checked before anything is built).
    """
    return build_detector(cfg, build_decoupled_solo_head, DecoupledSOLO, **parts)


# ------------------------------------------------------------------- mmdetection checkpoint names

_HEAD_KEYS = [
    (re.compile(r"^conv_mask_list_(x|y)\.(\d+)\.(weight|bias)$"), r"mask_pred_\1.\2.\3"),
    (re.compile(r"^conv_cls\.(weight|bias)$"), r"cls_pred.\1"),
    (re.compile(r"^(mask_convs_x|mask_convs_y|mask_convs|cls_convs)\.(\d+)\." + CONV_GN_KEYS),
     r"\1.\2.\3"),
]


def mmdet_head_key_map(key: str) -> str:
    """The solo_fast name of an mmdetection ``DecoupledSOLOHead`` / ``DecoupledSOLOLightHead``
    key (no ``mask_head.`` prefix), e.g. ``"conv_mask_list_x.0.weight"`` ->
    ``"mask_pred_x.0.weight"``; KeyError for other keys."""
    return rename_key(key, _HEAD_KEYS, "DecoupledSOLOHead")


def mmdet_model_key_map(key: str) -> str:
    """The :class:`DecoupledSOLO` name of a full mmdetection detector key; KeyError otherwise."""
    return mmdet_detector_key(key, mmdet_head_key_map)
