"""The detector every family shares: backbone -> FPN -> head, its criterion and post-processing.

``model(images)`` returns the head's raw per-level tensors (the same in train and eval mode);
``model.loss(outputs, targets)`` and ``model.predict(outputs, image_sizes, original_sizes)``
hand them to the two separate objects that turn them into losses and into instances. The family
modules (``solo.py``, ``decoupled_solo.py``, ``solov2.py``) hold the heads, the builders and the
mmdetection key maps; what they have in common lives here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn

from solo_fast.config import HeadConfig, ModelConfig
from solo_fast.models.backbone import build_backbone, build_neck, mmdet_backbone_neck_key

__all__ = ["SOLODetector", "build_detector", "check_supported", "mmdet_detector_key",
           "rename_key", "CONV_GN_KEYS"]

# The parameters of a bias-free ConvModule with GN (a ConvGNReLU). Whole keys only: DCN heads have
# extra ones (conv_offset) that must not slip through a conversion.
CONV_GN_KEYS = r"(conv\.weight|gn\.weight|gn\.bias)$"


class SOLODetector(nn.Module):
    """Backbone -> FPN -> head, with the criterion and the post-processing of its family.

    Args:
        backbone: Images (N, 3, H, W) -> C2..C5.
        neck: C2..C5 -> P2..P6.
        head: P2..P6 -> the family's raw outputs (a NamedTuple of per-level tensors).
        criterion: (outputs, targets) -> dict of named losses
            (``solo_fast.losses.build_criterion``); None: :meth:`loss` raises.
        postprocess: (outputs, image_sizes, original_sizes, *, mask_format) -> instances per
            image (``solo_fast.postprocess.build_postprocessor``); None: :meth:`predict` raises.
    """

    def __init__(self, *, backbone: nn.Module, neck: nn.Module, head: nn.Module,
                 criterion: nn.Module | None = None, postprocess: Callable | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.criterion = criterion
        self.postprocess = postprocess

    def forward(self, images: Tensor):
        """Raw head outputs.

        Args:
            images: (N, 3, H, W) normalised images, zero-padded to multiples of 32.

        Returns:
            The head's output NamedTuple (logits; no sigmoid, no resizing).
        """
        return self.head(self.neck(self.backbone(images)))

    def loss(self, outputs, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The training losses of a batch.

        Args:
            outputs: ``self(images)``.
            targets: Per image ``{"masks": bool (M, H, W), "labels": int64 (M,),
                "boxes": float (M, 4) xyxy}`` on the padded canvas.

        Returns:
            ``{"loss_mask": 0-d, "loss_cls": 0-d}``.
        """
        if self.criterion is None:
            raise RuntimeError(f"{type(self).__name__} was built without a criterion")
        return self.criterion(outputs, targets)

    def predict(self, outputs, image_sizes: Sequence[tuple[int, int]],
                original_sizes: Sequence[tuple[int, int]], *,
                mask_format: str = "bool") -> list[dict[str, Any]]:
        """Instances per image.

        The post-processing runs its fused path unless built with ``backend="reference"``
        (``solo_fast.postprocess.build_postprocessor``); switch an existing model with
        ``model.postprocess.backend = "reference"`` (or an op backend name, or None).

        Args:
            outputs: ``self(images)``, in eval mode.
            image_sizes: (h, w) of each image inside the padded canvas (resized, before padding).
            original_sizes: (h, w) to return the masks at (the images before resizing).
            mask_format: ``"bool"``: masks as a bool tensor per image; ``"rle"``: as a list of
                COCO RLE dicts (``{"size": [H0, W0], "counts": str}``, ``json``-ready), encoded
                a few masks at a time so the full-size bool masks never all exist at once.

        Returns:
            Per image ``{"masks": bool (K, H0, W0) or K RLE dicts, "labels": int64 (K,),
            "scores": float (K,), "boxes": float (K, 4)}``, boxes being the tight boxes of the
            masks.
        """
        if self.postprocess is None:
            raise RuntimeError(f"{type(self).__name__} was built without a post-processing")
        return self.postprocess(outputs, image_sizes, original_sizes, mask_format=mask_format)


def check_supported(cfg: ModelConfig) -> None:
    """Fail before anything is built for what solo_fast cannot build yet (DCN, ResNeXt)."""
    if cfg.backbone.dcn or cfg.backbone.groups != 1 or cfg.head.dcn or cfg.head.mask_feat_dcn:
        raise NotImplementedError(
            f"DCN/ResNeXt is not supported yet, so {cfg.name!r} cannot be built: solo_fast has "
            f"no deformable convolution and no ResNeXt backbone")


D = TypeVar("D", bound=SOLODetector)


def build_detector(cfg: ModelConfig, build_head: Callable[[HeadConfig], nn.Module],
                   detector_type: type[D], **parts: Any) -> D:
    """A detector of ``detector_type`` with ``build_head(cfg.head)`` on a ResNet + FPN.

    The backbone's ImageNet weights are loaded when ``cfg.backbone.pretrained`` is set. The
    criterion and the post-processing are not built here (the models do not depend on them):
    ``parts`` passes them, and may replace any other constructor argument;
    ``solo_fast.build_model`` assembles the whole detector.
    """
    check_supported(cfg)
    head = build_head(cfg.head)
    backbone = build_backbone(cfg.backbone)
    neck = build_neck(cfg.neck, backbone.out_channels)
    arguments = dict(backbone=backbone, neck=neck, head=head)
    arguments.update(parts)
    return detector_type(**arguments)


def rename_key(key: str, patterns: Sequence[tuple[re.Pattern, str]], what: str) -> str:
    """``key`` renamed by the first pattern that matches it; KeyError naming ``what`` if none."""
    for pattern, replacement in patterns:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    raise KeyError(f"not a key of an mmdetection {what} (without DCN): {key!r}")


def mmdet_detector_key(key: str, head_key_map: Callable[[str], str]) -> str:
    """The solo_fast name of a full mmdetection detector key.

    Args:
        key: ``backbone.*``, ``neck.*`` or ``mask_head.*``, as in released checkpoints.
        head_key_map: The family's map of head keys (without the ``mask_head.`` prefix).

    Returns:
        The solo_fast key (``backbone.*``, ``neck.*`` or ``head.*``).

    Raises:
        KeyError: a key that no part of the detector has.
    """
    if key.startswith("mask_head."):
        return "head." + head_key_map(key[len("mask_head."):])
    mapped = mmdet_backbone_neck_key(key)
    if mapped is None:
        raise KeyError(f"not a key of an mmdetection SOLO-family detector: {key!r}")
    return mapped
