"""The whole detector: a family's network with its criterion and its post-processing.

The three are separate objects (docs/algorithms.md §1.1): the network lives in
:mod:`solo_fast.models`, the criterion in :mod:`solo_fast.losses`, the post-processing in
:mod:`solo_fast.postprocess`; this module, one level above all three, puts them together.
"""

from __future__ import annotations

from typing import Any

from solo_fast.config import ModelConfig, resolve_config
from solo_fast.losses import build_criterion
from solo_fast.models import SOLODetector, build_network
from solo_fast.postprocess import build_postprocessor

__all__ = ["build_model"]


def build_model(preset: str | ModelConfig, /, **overrides: Any) -> SOLODetector:
    """The detector of a preset or config, with its family's criterion and post-processing.

    Examples::

        build_model("solov2_r50_fpn_1x_coco", num_classes=3)
        build_model(get_preset("solo_r50_fpn_3x_coco"))

    Args:
        preset: A name of :data:`~solo_fast.config.PRESETS` or a :class:`ModelConfig`.
        **overrides: Config fields to change (:func:`~solo_fast.config.get_preset`).

    Returns:
        The detector: ``model(images)`` gives raw outputs, ``model.loss`` the criterion's losses,
        ``model.predict`` the post-processing's instances (fused path; switch with
        ``model.postprocess.backend``).

    Raises:
        ValueError: an unknown preset or override.
        NotImplementedError: DCN / ResNeXt configs.
    """
    cfg = resolve_config(preset, **overrides)
    return build_network(cfg, criterion=build_criterion(cfg.head),
                         postprocess=build_postprocessor(cfg))
