"""SOLO-family models: backbone + FPN + one head per family, each returning raw per-level tensors.

:func:`build_model` builds the detector of any :class:`~solo_fast.config.ModelConfig`; each
family has its module (``solo.py``, ``decoupled_solo.py``, ``solov2.py``: heads, builder and
mmdetection key map), and :data:`FAMILIES` maps a config's family to its builder and key map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from solo_fast.config import ModelConfig, apply_overrides, get_preset
from solo_fast.models import decoupled_solo, solo, solov2
from solo_fast.models.backbone import FPN, ResNet, build_backbone, build_neck
from solo_fast.models.common import ConvGNReLU, coord_features, points_nms, resize_feats
from solo_fast.models.detector import SOLODetector
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
    "FAMILIES",
    "SOLODetector",
    "build_model",
    "mmdet_key_map",
    "build_neck",
    "build_solov2",
    "build_solov2_head",
    "coord_features",
    "points_nms",
    "resize_feats",
]

# family -> (builder taking a ModelConfig, map of mmdetection detector keys to solo_fast's)
FAMILIES: dict[str, tuple[Callable[[ModelConfig], SOLODetector], Callable[[str], str]]] = {
    "solo": (solo.build_solo, solo.mmdet_model_key_map),
    "decoupled_solo": (decoupled_solo.build_decoupled_solo, decoupled_solo.mmdet_model_key_map),
    "decoupled_solo_light": (decoupled_solo.build_decoupled_solo,
                             decoupled_solo.mmdet_model_key_map),
    "solov2": (solov2.build_solov2, solov2.mmdet_model_key_map),
}


def build_model(preset: str | ModelConfig, /, **overrides: Any) -> SOLODetector:
    """The detector of a preset or config.

    Examples::

        build_model("solov2_r50_fpn_1x_coco", num_classes=3)
        build_model(get_preset("solo_r50_fpn_3x_coco"))

    Args:
        preset: A name of :data:`~solo_fast.config.PRESETS` or a :class:`ModelConfig`.
        **overrides: Config fields to change (:func:`~solo_fast.config.get_preset`).

    Raises:
        ValueError: an unknown preset or override.
        NotImplementedError: DCN / ResNeXt configs.
    """
    cfg = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    build, _ = FAMILIES[cfg.head.family]
    return build(cfg)


def mmdet_key_map(family: str) -> Callable[[str], str]:
    """The map of a family's mmdetection detector keys (``backbone.*``, ``neck.*``,
    ``mask_head.*``) to solo_fast's; it raises KeyError for keys the family does not have."""
    _, key_map = FAMILIES[family]
    return key_map
