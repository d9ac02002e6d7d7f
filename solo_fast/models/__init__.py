"""SOLO-family models: backbone + FPN + one head per family, each returning raw per-level tensors.

:func:`build_network` builds the network of any :class:`~solo_fast.config.ModelConfig` (the
whole detector with its criterion and post-processing is ``solo_fast.build_model``); each
family has its module (``solo.py``, ``decoupled_solo.py``, ``solov2.py``: heads, builder and
mmdetection key map), and :data:`FAMILIES` maps a config's family to its builder and key map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from solo_fast.config import ModelConfig, resolve_config
from solo_fast.models import decoupled_solo, solo, solov2
from solo_fast.models.backbone import FPN, ResNet, build_backbone, build_neck
from solo_fast.models.common import ConvGNReLU, coord_features, resize_feats
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
    "FAMILIES",
    "FPN",
    "ConvGNReLU",
    "MaskFeatModule",
    "ResNet",
    "SOLODetector",
    "SOLOv2",
    "SOLOv2Head",
    "SOLOv2Output",
    "build_backbone",
    "build_neck",
    "build_network",
    "build_solov2",
    "build_solov2_head",
    "coord_features",
    "mmdet_key_map",
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


def build_network(preset: str | ModelConfig, /, **parts: Any) -> SOLODetector:
    """The detector network (backbone, FPN, head) of a preset or config, without a criterion or a
    post-processing unless ``parts`` passes them (``solo_fast.build_model`` builds both).

    Args:
        preset: A name of :data:`~solo_fast.config.PRESETS` or a :class:`ModelConfig`.
        **parts: Constructor arguments of the detector (``criterion``, ``postprocess``, ...).

    Raises:
        ValueError: an unknown preset.
        NotImplementedError: DCN / ResNeXt configs.
    """
    cfg = resolve_config(preset)
    build, _ = FAMILIES[cfg.head.family]
    return build(cfg, **parts)


def mmdet_key_map(family: str) -> Callable[[str], str]:
    """The map of a family's mmdetection detector keys (``backbone.*``, ``neck.*``,
    ``mask_head.*``) to solo_fast's; it raises KeyError for keys the family does not have."""
    _, key_map = FAMILIES[family]
    return key_map
