"""SOLO (mmdetection 3.3 ``SOLOHead``, docs/algorithms.md §5).

Heads -> model -> builder -> mmdetection key map. The model returns raw per-level logits and
nothing else, in train and eval mode alike: the criterion (``solo_fast.losses``) and the
post-processing are separate objects. mmdetection's eval-mode ``forward`` also applies a sigmoid,
resizes every mask map to level 0's size and points-NMSes the class scores
(docs/algorithms.md §5.2 step 3); here those steps belong to the post-processing.

Parameter names differ from mmdetection's where those are awkward; :func:`mmdet_head_key_map`
and :func:`mmdet_model_key_map` translate (:func:`solo_fast.convert_mmdet_state_dict` converts a
whole checkpoint):

================================================  ====================================
mmdetection (``mask_head.`` prefix in a detector)  solo_fast (``head.`` prefix)
================================================  ====================================
``mask_convs.{i}.conv / .gn``                     unchanged
``cls_convs.{i}.conv / .gn``                      unchanged
``conv_mask_list.{l}``                            ``mask_pred.{l}``
``conv_cls``                                      ``cls_pred``
================================================  ====================================
"""

# N=images, L=levels, S=grid side of a level, G=S*S cells of a level, C=classes,
# F=tower channels, h, w=size of a level's resized feature (its mask map is 2h x 2w)

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
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

__all__ = [
    "SOLO",
    "SOLOHead",
    "SOLOOutput",
    "build_solo",
    "build_solo_head",
    "category_logits",
    "mmdet_head_key_map",
    "mmdet_model_key_map",
]


class SOLOOutput(NamedTuple):
    """Raw SOLO outputs (mmdetection's train-mode ``mlvl_mask_preds, mlvl_cls_preds``).

    Attributes:
        mask_preds: L tensors (N, S_l^2, 2h_l, 2w_l); mask logits, channel i * S + j is the mask
            of the object centred in grid cell (row i, column j). The maps are at stride 4, 4,
            8, 16, 16 of the padded input.
        cls_preds: L tensors (N, C, S_l, S_l); class logits (no sigmoid, no points NMS).
    """

    mask_preds: list[Tensor]
    cls_preds: list[Tensor]


def category_logits(feat: Tensor, grid: int, convs: Sequence[nn.Module], pred: nn.Module, *,
                    down_index: int) -> Tensor:
    """The category branch of SOLO and Decoupled SOLO on one level.

    The feature (no coordinates) is bilinearly resized to S x S (align_corners=False, non-square
    maps squashed) just before tower conv ``down_index``, then goes through the rest of the tower
    and the output conv.

    Args:
        feat: (N, in_channels, h, w), the level's resized FPN feature.
        grid: S.
        convs: The class tower.
        pred: The output conv, F -> C channels.
        down_index: Index of the tower conv that first sees the S x S map.

    Returns:
        (N, C, S, S) class logits.
    """
    x = feat
    for j, conv in enumerate(convs):
        if j == down_index:
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)  # (N, ., S, S)
        x = conv(x)
    return pred(x)


class SOLOHead(nn.Module):
    """Mask and category towers shared by the five instance levels, one mask output conv per level.

    Mask path (docs/algorithms.md §5.2): [feature, x, y] -> ``stacked_convs`` ConvGNReLU ->
    bilinear x2 -> 1x1 conv to S_l^2 channels. Category path: :func:`category_logits`.

    Args:
        num_classes: C, foreground classes.
        in_channels: Channels of the FPN maps.
        feat_channels: F, width of both towers.
        stacked_convs: ConvGNReLU layers per tower.
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
        super().__init__()
        if not 0 <= cls_down_index < stacked_convs:
            raise ValueError(f"cls_down_index must be in [0, {stacked_convs}), "
                             f"got {cls_down_index}")
        self.num_classes = num_classes
        self.num_grids = tuple(num_grids)
        self.cls_down_index = cls_down_index
        self.mask_convs = conv_tower(in_channels + 2, feat_channels, stacked_convs,
                                     num_groups=num_groups)
        self.cls_convs = conv_tower(in_channels, feat_channels, stacked_convs,
                                    num_groups=num_groups)
        self.mask_pred = nn.ModuleList(nn.Conv2d(feat_channels, grid**2, 1) for grid in num_grids)
        self.cls_pred = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        init_output_convs(*self.mask_pred, self.cls_pred)

    def forward(self, feats: Sequence[Tensor]) -> SOLOOutput:
        """Raw outputs for FPN maps P2..P6.

        Args:
            feats: L tensors (N, in_channels, h_l, w_l), the FPN outputs of a canvas padded to a
                multiple of 32 (P2 at stride 4 ... P6 at stride 64).

        Returns:
            :class:`SOLOOutput`; identical in train and eval mode.
        """
        if len(feats) != len(self.num_grids):
            raise ValueError(f"expected {len(self.num_grids)} feature maps, got {len(feats)}")
        mask_preds, cls_preds = [], []
        for feat, grid, mask_pred in zip(resize_feats(feats), self.num_grids, self.mask_pred):
            x = torch.cat([feat, coord_features(feat)], 1)  # (N, in_channels + 2, h, w)
            x = upsample2x(self.mask_convs(x))  # (N, F, 2h, 2w)
            mask_preds.append(mask_pred(x))  # (N, G, 2h, 2w)
            cls_preds.append(category_logits(feat, grid, self.cls_convs, self.cls_pred,
                                             down_index=self.cls_down_index))
        return SOLOOutput(mask_preds, cls_preds)


class SOLO(SOLODetector):
    """Backbone -> FPN -> :class:`SOLOHead`; outputs :class:`SOLOOutput`."""


def build_solo_head(cfg: HeadConfig) -> SOLOHead:
    """The :class:`SOLOHead` of a head config.

    Raises:
        ValueError: ``cfg.family`` is not ``"solo"``.
        NotImplementedError: DCN is requested.
    """
    if cfg.family != "solo":
        raise ValueError(f"build_solo_head needs family 'solo', got {cfg.family!r}")
    if cfg.dcn:
        raise NotImplementedError("DCN is not supported yet: the SOLO head has no deformable "
                                  "convolutions (head.dcn)")
    return SOLOHead(
        num_classes=cfg.num_classes, in_channels=cfg.in_channels, feat_channels=cfg.feat_channels,
        stacked_convs=cfg.stacked_convs, num_grids=cfg.num_grids,
        cls_down_index=cfg.cls_down_index, num_groups=cfg.norm_groups)


def build_solo(cfg: ModelConfig, **parts: Any) -> SOLO:
    """A SOLO detector from a config, e.g. a :data:`~solo_fast.config.PRESETS` one.

    Raises:
        NotImplementedError: DCN or ResNeXt configs (checked before anything is built).
    """
    return build_detector(cfg, build_solo_head, SOLO, **parts)


# ------------------------------------------------------------------- mmdetection checkpoint names

_HEAD_KEYS = [
    (re.compile(r"^conv_mask_list\.(\d+)\.(weight|bias)$"), r"mask_pred.\1.\2"),
    (re.compile(r"^conv_cls\.(weight|bias)$"), r"cls_pred.\1"),
    (re.compile(r"^(mask_convs|cls_convs)\.(\d+)\." + CONV_GN_KEYS), r"\1.\2.\3"),
]


def mmdet_head_key_map(key: str) -> str:
    """The :class:`SOLOHead` name of an mmdetection ``SOLOHead`` key (no ``mask_head.`` prefix),
    e.g. ``"conv_mask_list.0.weight"`` -> ``"mask_pred.0.weight"``; KeyError for other keys."""
    return rename_key(key, _HEAD_KEYS, "SOLOHead")


def mmdet_model_key_map(key: str) -> str:
    """The :class:`SOLO` name of a full mmdetection SOLO detector key; KeyError for other keys."""
    return mmdet_detector_key(key, mmdet_head_key_map)
