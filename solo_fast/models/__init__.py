"""SOLO-family models: backbone + FPN + one head per family, each returning raw per-level tensors.

:func:`build_model` builds the detector of any :class:`~solo_fast.config.ModelConfig`. SOLOv2
lives in :mod:`solo_fast.models.solov2`; SOLO and the Decoupled heads in their own modules
(``solo.py`` with ``build_solo``, ``decoupled_solo.py`` with ``build_decoupled_solo``), which
are imported only when such a config is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from solo_fast.config import ModelConfig, apply_overrides, get_preset
from solo_fast.models.backbone import FPN, ResNet, build_backbone, build_neck
from solo_fast.models.common import ConvGNReLU, coord_features, points_nms, resize_feats
from solo_fast.models.solov2 import (
    MaskFeatModule,
    SOLOv2,
    SOLOv2Head,
    SOLOv2Output,
    build_solov2,
    build_solov2_head,
)

__all__ = [
    "ConvGNReLU",
    "FPN",
    "MaskFeatModule",
    "ResNet",
    "SOLOv2",
    "SOLOv2Head",
    "SOLOv2Output",
    "build_backbone",
    "build_model",
    "build_neck",
    "build_solov2",
    "build_solov2_head",
    "coord_features",
    "points_nms",
    "resize_feats",
]

# family -> (module under solo_fast.models, builder taking a ModelConfig)
_BUILDERS = {
    "solo": ("solo", "build_solo"),
    "decoupled_solo": ("decoupled_solo", "build_decoupled_solo"),
    "decoupled_solo_light": ("decoupled_solo", "build_decoupled_solo"),
}


def build_model(preset: str | ModelConfig, /, **overrides: Any) -> nn.Module:
    """The detector of a preset or config.

    Examples::

        build_model("solov2_r50_fpn_1x_coco", num_classes=3)
        build_model(get_preset("solo_r50_fpn_3x_coco"))

    Args:
        preset: A name of :data:`~solo_fast.config.PRESETS` or a :class:`ModelConfig`.
        **overrides: Config fields to change (:func:`~solo_fast.config.get_preset`).

    Raises:
        ValueError: an unknown preset or override.
        NotImplementedError: DCN / ResNeXt configs, or a family whose module is not available.
    """
    cfg = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    if cfg.head.family == "solov2":
        return build_solov2(cfg)
    module_name, builder = _BUILDERS[cfg.head.family]
    try:
        module = importlib.import_module(f"solo_fast.models.{module_name}")
    except ModuleNotFoundError as err:
        if err.name != f"solo_fast.models.{module_name}":
            raise
        raise NotImplementedError(
            f"family {cfg.head.family!r} needs solo_fast.models.{module_name}, which is not "
            f"available") from err
    return getattr(module, builder)(cfg)
