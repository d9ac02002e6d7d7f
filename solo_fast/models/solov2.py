"""SOLOv2 and Light SOLOv2 (mmdetection 3.3 ``SOLOV2Head`` + ``MaskFeatModule``,
docs/algorithms.md §7).

Heads -> model -> builder -> mmdetection key map. The model returns raw per-level tensors and
nothing else: the criterion (losses) and the post-processing (predictions) are separate objects.
SOLOv2's forward does no eval-mode processing, so train- and eval-mode outputs are the same.

Parameter names differ from mmdetection's where those are awkward; :func:`mmdet_head_key_map`
and :func:`mmdet_model_key_map` translate (:func:`solo_fast.convert_mmdet_state_dict` converts a
whole checkpoint):

================================================  ====================================
mmdetection (``mask_head.`` prefix in a detector)  solo_fast (``head.`` prefix)
================================================  ====================================
``kernel_convs.{i}.conv / .gn``                   unchanged
``cls_convs.{i}.conv / .gn``                      unchanged
``conv_kernel``                                   ``kernel_pred``
``conv_cls``                                      ``cls_pred``
``mask_feature_head.convs_all_levels.{l}.conv{j}``  ``mask_feat.level_convs.{l}.{j}``
``mask_feature_head.conv_pred``                   ``mask_feat.out_conv``
================================================  ====================================
"""

# N=images, L=levels, S=grid side of a level, C=classes, E=mask-feature channels,
# H, W=padded input size, h, w=size of one FPN level

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from solo_fast.config import HeadConfig, ModelConfig
from solo_fast.models.common import (
    ConvGNReLU,
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
    "MaskFeatModule",
    "SOLOv2",
    "SOLOv2Head",
    "SOLOv2Output",
    "build_solov2",
    "build_solov2_head",
    "mmdet_head_key_map",
    "mmdet_model_key_map",
]


class SOLOv2Output(NamedTuple):
    """Raw SOLOv2 outputs (mmdetection's ``mlvl_kernel_preds, mlvl_cls_preds, mask_feats``).

    Attributes:
        kernel_preds: L tensors (N, E, S_l, S_l); the dynamic 1x1 kernel of every grid cell.
        cls_preds: L tensors (N, C, S_l, S_l); class logits (no sigmoid, no points NMS).
        mask_feats: (N, E, H / mask_stride, W / mask_stride); the unified mask features, >= 0.
    """

    kernel_preds: list[Tensor]
    cls_preds: list[Tensor]
    mask_feats: Tensor


class MaskFeatModule(nn.Module):
    """The unified mask-feature branch: FPN levels ``start_level..end_level`` fused at stride 4.

    FPN level l (stride 2^(l+2)) goes through max(l, 1) ConvGNReLU 3x3 convs, each followed by
    a bilinear x2 upsample when l > 0; the last level first gets the coordinate channels. The
    sum goes through a 1x1 ConvGNReLU to E channels, so the features are >= 0
    (docs/algorithms.md §7.1).

    Args:
        in_channels: Channels of the FPN maps.
        feat_channels: Hidden channels (128 in every config).
        out_channels: E, the mask-feature channels (256; 128 for the light heads).
        start_level: First FPN map fused (0 = P2).
        end_level: Last FPN map fused (3 = P5).
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        feat_channels: int = 128,
        out_channels: int = 256,
        start_level: int = 0,
        end_level: int = 3,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if not 0 <= start_level < end_level:
            raise ValueError(f"need 0 <= start_level < end_level, got {start_level}, {end_level}")
        self.start_level, self.end_level = start_level, end_level
        self.out_channels = out_channels
        self.level_convs = nn.ModuleList()
        for level in range(start_level, end_level + 1):
            first_in = in_channels + 2 if level == end_level else in_channels
            self.level_convs.append(nn.ModuleList(
                ConvGNReLU(first_in if j == 0 else feat_channels, feat_channels,
                           num_groups=num_groups)
                for j in range(max(level, 1))))
        self.out_conv = ConvGNReLU(feat_channels, out_channels, 1, num_groups=num_groups)
        # mmdetection re-initialises this direct child ConvModule after the Normal(0.01) init
        # of everything else: Kaiming-normal, fan_out (docs/algorithms.md §4.4)
        nn.init.kaiming_normal_(self.out_conv.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Fuse FPN maps ``start_level..end_level`` into the mask features.

        Args:
            feats: FPN outputs, finest first, (N, in_channels, h_k, w_k); level k + 1 must be
                exactly half the size of level k (true on a canvas padded to 32).

        Returns:
            (N, out_channels, H / 4, W / 4) for a canvas H x W: every level is upsampled to
            stride 4 (P2's size).
        """
        inputs = feats[self.start_level:self.end_level + 1]
        fused = None
        for i, (x, convs) in enumerate(zip(inputs, self.level_convs)):
            if i == len(inputs) - 1:
                x = torch.cat([x, coord_features(x)], 1)  # (N, in_channels + 2, h, w)
            for conv in convs:
                x = conv(x)
                if self.start_level + i > 0:
                    x = upsample2x(x)
            fused = x if fused is None else fused + x
        return self.out_conv(fused)


class SOLOv2Head(nn.Module):
    """Kernel and category branches on the five instance levels, plus the mask-feature branch.

    Per level, the resampled FPN map and its coordinate channels are bilinearly resized to
    S x S together, so the coordinates at S x S are resampled ramps (docs/algorithms.md §4.3,
    §7.2).
    The kernel tower sees all channels, the category tower the features only; towers are shared by
    levels.

    Args:
        mask_feat: The mask-feature branch; its ``out_channels`` is the kernel length E.
        num_classes: C, foreground classes.
        in_channels: Channels of the FPN maps.
        feat_channels: Width of both towers (512; 256 for the light heads).
        stacked_convs: ConvGNReLU layers per tower (4; 2 or 3 for the light heads).
        num_grids: S per level.
        num_groups: GroupNorm groups of the towers.
    """

    def __init__(
        self,
        *,
        mask_feat: MaskFeatModule,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 512,
        stacked_convs: int = 4,
        num_grids: Sequence[int] = (40, 36, 24, 16, 12),
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_grids = tuple(num_grids)
        self.kernel_convs = conv_tower(in_channels + 2, feat_channels, stacked_convs,
                                       num_groups=num_groups)
        self.cls_convs = conv_tower(in_channels, feat_channels, stacked_convs,
                                    num_groups=num_groups)
        self.kernel_pred = nn.Conv2d(feat_channels, mask_feat.out_channels, 3, padding=1)
        self.cls_pred = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.mask_feat = mask_feat
        init_output_convs(self.kernel_pred, bias=0.0)
        init_output_convs(self.cls_pred)

    def forward(self, feats: Sequence[Tensor]) -> SOLOv2Output:
        """Raw outputs for FPN maps P2..P6.

        Args:
            feats: L tensors (N, in_channels, h_l, w_l), the FPN outputs of a canvas padded to a
                multiple of 32 (P2 at stride 4 ... P6 at stride 64).

        Returns:
            :class:`SOLOv2Output`; identical in train and eval mode.
        """
        if len(feats) != len(self.num_grids):
            raise ValueError(f"expected {len(self.num_grids)} feature maps, got {len(feats)}")
        mask_feats = self.mask_feat(feats)
        kernel_preds, cls_preds = [], []
        for feat, grid in zip(resize_feats(feats), self.num_grids):
            x = torch.cat([feat, coord_features(feat)], 1)  # (N, in_channels + 2, h, w)
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)  # (N, ., S, S)
            cls_x = x[:, :-2].contiguous()  # (N, in_channels, S, S): no coordinates
            kernel_preds.append(self.kernel_pred(self.kernel_convs(x)))  # (N, E, S, S)
            cls_preds.append(self.cls_pred(self.cls_convs(cls_x)))  # (N, C, S, S)
        return SOLOv2Output(kernel_preds, cls_preds, mask_feats)


class SOLOv2(SOLODetector):
    """Backbone -> FPN -> :class:`SOLOv2Head`; outputs :class:`SOLOv2Output`."""


def build_solov2_head(cfg: HeadConfig) -> SOLOv2Head:
    """The :class:`SOLOv2Head` (with its :class:`MaskFeatModule`) of a head config.

    Raises:
        ValueError: ``cfg.family`` is not ``"solov2"``.
        NotImplementedError: DCN is requested.
    """
    if cfg.family != "solov2":
        raise ValueError(f"build_solov2_head needs family 'solov2', got {cfg.family!r}")
    if cfg.dcn or cfg.mask_feat_dcn:
        raise NotImplementedError(
            "DCN/ResNeXt is not supported yet: the SOLOv2 head has no deformable convolutions "
            "(head.dcn / head.mask_feat_dcn)")
    if cfg.mask_stride != 4:
        # FPN level l (stride 2^(l+2)) is upsampled l times, so the fused map is always at 4
        raise ValueError(f"head.mask_stride must be 4, the stride of the fused mask features; "
                         f"got {cfg.mask_stride}")
    mask_feat = MaskFeatModule(
        in_channels=cfg.in_channels, feat_channels=cfg.mask_feat_channels,
        out_channels=cfg.mask_out_channels, start_level=cfg.mask_start_level,
        end_level=cfg.mask_end_level, num_groups=cfg.norm_groups)
    return SOLOv2Head(
        mask_feat=mask_feat, num_classes=cfg.num_classes, in_channels=cfg.in_channels,
        feat_channels=cfg.feat_channels, stacked_convs=cfg.stacked_convs,
        num_grids=cfg.num_grids, num_groups=cfg.norm_groups)


def build_solov2(cfg: ModelConfig, **parts: Any) -> SOLOv2:
    """A SOLOv2 / Light SOLOv2 detector from a config, e.g. a :data:`~solo_fast.config.PRESETS`
    one.

    Raises:
        NotImplementedError: DCN or ResNeXt configs (checked before anything is built).
    """
    return build_detector(cfg, build_solov2_head, SOLOv2, **parts)


# ------------------------------------------------------------------- mmdetection checkpoint names

_HEAD_KEYS = [
    (re.compile(r"^conv_kernel\.(weight|bias)$"), r"kernel_pred.\1"),
    (re.compile(r"^conv_cls\.(weight|bias)$"), r"cls_pred.\1"),
    (re.compile(r"^mask_feature_head\.convs_all_levels\.(\d+)\.conv(\d+)\." + CONV_GN_KEYS),
     r"mask_feat.level_convs.\1.\2.\3"),
    (re.compile(r"^mask_feature_head\.conv_pred\." + CONV_GN_KEYS), r"mask_feat.out_conv.\1"),
    (re.compile(r"^(kernel_convs|cls_convs)\.(\d+)\." + CONV_GN_KEYS), r"\1.\2.\3"),
]


def mmdet_head_key_map(key: str) -> str:
    """The :class:`SOLOv2Head` name of an mmdetection ``SOLOV2Head`` key (no ``mask_head.``
    prefix), e.g. ``"mask_feature_head.conv_pred.conv.weight"`` ->
    ``"mask_feat.out_conv.conv.weight"``; KeyError for other keys (DCN heads included)."""
    return rename_key(key, _HEAD_KEYS, "SOLOV2Head")


def mmdet_model_key_map(key: str) -> str:
    """The :class:`SOLOv2` name of a full mmdetection SOLOv2 detector key; KeyError otherwise."""
    return mmdet_detector_key(key, mmdet_head_key_map)
