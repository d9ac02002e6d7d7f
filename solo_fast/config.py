"""Model, test and training configuration: frozen dataclasses and mmdetection-named presets.

Every mmdetection 3.3 SOLO / SOLOv2 config has a preset of the same name in :data:`PRESETS`
(docs/algorithms.md §13.1, §13.2). :func:`get_preset` returns one with type-checked overrides::

    cfg = get_preset("solov2_r50_fpn_1x_coco", num_classes=3, lr=0.005)
    cfg = get_preset("solov2_r50_fpn_1x_coco", **{"backbone.dcn": False})

A field may be named on its own where only one section has it (``num_classes`` is
``head.num_classes``) or as ``section.field``. Configs validate themselves on construction, so
an override that breaks an invariant (five grids but four strides, ...) fails right away.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

__all__ = [
    "BackboneConfig",
    "Family",
    "HeadConfig",
    "ModelConfig",
    "NeckConfig",
    "PRESETS",
    "TestConfig",
    "TrainConfig",
    "apply_overrides",
    "get_preset",
    "parse_overrides",
]

Family = Literal["solo", "decoupled_solo", "decoupled_solo_light", "solov2"]


class _Checked:
    """Type-checks (and normalises: list -> tuple, int -> float) every field after __init__."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}")
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class BackboneConfig(_Checked):
    """ResNet backbone: mmdetection's ``ResNet(style='pytorch', out_indices=(0, 1, 2, 3))``."""

    depth: int = 50  # 18, 34, 50 or 101
    # -1: nothing frozen; 0: the stem; k: the stem and stages 1..k (requires_grad off, BN in eval)
    frozen_stages: int = 1
    norm_eval: bool = True  # every BatchNorm stays in eval mode (frozen statistics) in training
    # ImageNet weights: a local torchvision ResNet state-dict file, "torchvision" for the file in
    # torch's hub cache (never downloaded), or None for mmdetection's random init
    pretrained: str | None = None
    groups: int = 1  # ResNeXt cardinality (64 for X-101 64x4d); not supported yet
    width_per_group: int = 64  # ResNeXt base width (4 for X-101 64x4d); not supported yet
    dcn: bool = False  # DCNv2 in the 3x3 convs of stages 2-4; not supported yet

    def _validate(self) -> None:
        if self.depth not in (18, 34, 50, 101):
            raise ValueError(f"backbone.depth must be 18, 34, 50 or 101, got {self.depth}")
        if not -1 <= self.frozen_stages <= 4:
            raise ValueError(f"backbone.frozen_stages must be in [-1, 4], got {self.frozen_stages}")


@dataclass(frozen=True, kw_only=True)
class NeckConfig(_Checked):
    """FPN on C2..C5 (``start_level=0``, ``add_extra_convs=False``): P2..P5, P6 = P5[::2, ::2]."""

    out_channels: int = 256
    num_outs: int = 5  # P2..P6; the heads need exactly one map per grid level

    def _validate(self) -> None:
        if self.num_outs < 4:
            raise ValueError(f"neck.num_outs must be >= 4 (P2..P5), got {self.num_outs}")


@dataclass(frozen=True, kw_only=True)
class HeadConfig(_Checked):
    """Mask head hyper-parameters; the defaults are those of ``solo_r50_fpn_1x_coco``."""

    family: Family
    num_classes: int = 80
    in_channels: int = 256  # = neck.out_channels
    feat_channels: int = 256  # width of the towers
    stacked_convs: int = 7  # convs per tower
    norm_groups: int = 32  # GroupNorm groups of every tower conv
    num_grids: tuple[int, ...] = (40, 36, 24, 16, 12)  # grid side S per level
    strides: tuple[int, ...] = (8, 8, 16, 32, 32)  # GT rescale / inference area filter
    # a GT belongs to level l iff lo <= sqrt(box w * box h) <= hi
    scale_ranges: tuple[tuple[float, float], ...] = (
        (1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    pos_scale: float = 0.2  # centre region = pos_scale x the box, around the mass centre
    cls_down_index: int = 0  # the class branch is resized to S x S before this tower conv
    # SOLOv2 mask-feature branch (MaskFeatModule), unused by the other families
    mask_feat_channels: int = 128
    mask_out_channels: int = 256  # E, the channels of the mask features and dynamic kernels
    mask_start_level: int = 0  # first FPN level fused (P2)
    mask_end_level: int = 3  # last FPN level fused (P5); it gets the coordinate channels
    mask_stride: int = 4  # stride of the mask features
    # DCN (recorded from the mmdetection configs; building a model with it is not supported yet)
    dcn: bool = False  # DCNv2 in the tower convs
    dcn_on_all_convs: bool = True  # every tower conv (True) or only the last one (light heads)
    mask_feat_dcn: bool = False  # DCNv2 in every MaskFeatModule conv, the 1x1 one included
    # losses
    mask_loss_weight: float = 3.0  # dice
    cls_loss_weight: float = 1.0  # focal
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25

    def _validate(self) -> None:
        levels = len(self.num_grids)
        if len(self.strides) != levels or len(self.scale_ranges) != levels:
            raise ValueError(
                f"head.num_grids, head.strides and head.scale_ranges need one entry per level; "
                f"got {levels}, {len(self.strides)} and {len(self.scale_ranges)}")
        if self.num_classes < 1:
            raise ValueError(f"head.num_classes must be >= 1, got {self.num_classes}")
        if not 0 <= self.cls_down_index < self.stacked_convs:
            raise ValueError(f"head.cls_down_index must be in [0, stacked_convs), "
                             f"got {self.cls_down_index} with {self.stacked_convs} convs")
        for name in ("feat_channels", "mask_feat_channels", "mask_out_channels"):
            if getattr(self, name) % self.norm_groups:
                raise ValueError(f"head.{name} ({getattr(self, name)}) must be divisible by "
                                 f"head.norm_groups ({self.norm_groups})")
        if not 0 <= self.mask_start_level < self.mask_end_level < levels:
            raise ValueError(f"need 0 <= head.mask_start_level < head.mask_end_level < {levels}, "
                             f"got {self.mask_start_level} and {self.mask_end_level}")


@dataclass(frozen=True, kw_only=True)
class TestConfig(_Checked):
    """Inference settings (mmdetection ``test_cfg``; identical in every SOLO config)."""

    __test__ = False  # not a pytest test class

    nms_pre: int = 500  # matrix NMS keeps the top nms_pre candidates (all when <= 0)
    score_thr: float = 0.1  # candidates need class score > score_thr
    mask_thr: float = 0.5  # soft mask > mask_thr binarises
    filter_thr: float = 0.05  # decayed score >= filter_thr survives (no filter when <= 0)
    kernel: Literal["gaussian", "linear"] = "gaussian"  # matrix NMS decay kernel
    sigma: float = 2.0  # gaussian decay exp(-sigma * iou^2)
    max_per_img: int = 100  # detections kept per image (all when <= 0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Checked):
    """Optimiser, schedule and data scales; the defaults are mmdetection's 1x schedule."""

    optimizer: Literal["sgd", "adamw"] = "sgd"  # every mmdetection SOLO config uses SGD
    # for 16 images per iteration (mmdetection: 8 GPUs x 2); the batch itself is a run setting
    # (`solo-fast train --batch-size`, images per process), not part of the model config
    lr: float = 0.01
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    epochs: int = 12
    warmup_iters: int = 500  # linear warmup from warmup_ratio * lr, by iteration
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)  # epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    grad_clip: float | None = None  # max L2 norm of all gradients; None = no clipping
    # exponential moving average of the weights (what is evaluated and predicted with): the
    # average keeps ema_decay of itself per step (less in the first steps); None = no average
    ema_decay: float | None = None
    # keep-ratio resize targets (long edge, short edge); one is drawn per image
    # (RandomChoiceResize); a single entry is a fixed scale
    train_scales: tuple[tuple[int, int], ...] = ((1333, 800),)
    test_scale: tuple[int, int] = (1333, 800)  # (long edge, short edge)
    flip_prob: float = 0.5  # horizontal flip

    def _validate(self) -> None:
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ValueError(f"train.lr_steps must be ascending, got {self.lr_steps}")
        if not self.train_scales:
            raise ValueError("train.train_scales needs at least one scale")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or None, got {self.ema_decay}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Checked):
    """A whole detector: backbone, FPN, head, inference and training settings."""

    name: str = "custom"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig
    test: TestConfig = field(default_factory=TestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def _validate(self) -> None:
        if self.head.in_channels != self.neck.out_channels:
            raise ValueError(f"head.in_channels ({self.head.in_channels}) must equal "
                             f"neck.out_channels ({self.neck.out_channels})")
        if self.neck.num_outs != len(self.head.num_grids):
            raise ValueError(f"neck.num_outs ({self.neck.num_outs}) must equal the number of "
                             f"grid levels ({len(self.head.num_grids)})")


# ------------------------------------------------------------------------------------- overrides

_SECTIONS = ("backbone", "neck", "head", "test", "train")


def get_preset(name: str, /, **overrides: Any) -> ModelConfig:
    """A preset by its mmdetection config name, with keyword overrides applied.

    Args:
        name: A key of :data:`PRESETS`, e.g. ``"solov2_r50_fpn_1x_coco"``.
        **overrides: ``field=value``; see :func:`apply_overrides`.

    Returns:
        The (frozen) config.

    Raises:
        ValueError: unknown preset or field name (with close matches), an ambiguous field name,
            or a value that breaks a config invariant.
        TypeError: a value of the wrong type.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; close matches: "
                         f"{difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.3)}; "
                         f"all presets: {sorted(PRESETS)}")
    return apply_overrides(PRESETS[name], overrides)


def resolve_config(preset: str | ModelConfig, /, **overrides: Any) -> ModelConfig:
    """The config of a preset name or a config, with keyword overrides applied.

    Raises:
        As :func:`get_preset` and :func:`apply_overrides`.
    """
    if isinstance(preset, ModelConfig):
        return apply_overrides(preset, overrides) if overrides else preset
    return get_preset(preset, **overrides)


def apply_overrides(config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """A copy of ``config`` with fields replaced.

    Keys are ``section.field`` (``"head.num_classes"``), a field name that only one section has
    (``"num_classes"``), or a top-level field (``"name"``, ``"head"``). Values are type-checked:
    lists become tuples and ints are accepted for floats.

    Args:
        config: The config to start from.
        overrides: Field names to new values.

    Returns:
        The new config, validated.

    Raises:
        ValueError: unknown or ambiguous names, or a value that breaks a config invariant.
        TypeError: a value of the wrong type.
    """
    sections = {s: getattr(config, s) for s in _SECTIONS}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        path = _resolve(config, key)
        if len(path) == 1:
            top[path[0]] = value
        else:
            section, name = path
            sections[section] = dataclasses.replace(sections[section], **{name: value})
    sections.update((k, v) for k, v in top.items() if k in _SECTIONS)
    rest = {k: v for k, v in top.items() if k not in _SECTIONS}
    return dataclasses.replace(config, **sections, **rest)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse command-line ``key=value`` strings (``--set``) into an overrides mapping.

    Values are Python literals (``3``, ``0.5``, ``None``, ``(1333, 800)``, ``'linear'``); anything
    that is not a literal is kept as a string, so ``kernel=linear`` works too.

    Args:
        items: Strings ``"key=value"``.

    Returns:
        ``{key: value}``, ready for :func:`apply_overrides` or :func:`get_preset`.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"an override must look like key=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = text.strip()
    return out


def _resolve(config: ModelConfig, key: str) -> tuple[str, ...]:
    top = {f.name for f in dataclasses.fields(config)}
    nested = {f"{s}.{f.name}" for s in _SECTIONS for f in dataclasses.fields(getattr(config, s))}
    if key in top or key in nested:
        return tuple(key.split("."))
    matches = sorted(p for p in nested if p.split(".")[1] == key)
    if len(matches) == 1:
        return tuple(matches[0].split("."))
    if matches:
        raise ValueError(f"{key!r} is ambiguous: write one of {matches}")
    short = {p.split(".")[1] for p in nested}
    close = difflib.get_close_matches(key, sorted(top | nested | short), n=5, cutoff=0.6)
    raise ValueError(f"unknown config field {key!r}; close matches: {close}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp``; lists become tuples, ints floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (tuple, list)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(v, a, f"{where}[{i}]")
                             for i, (v, a) in enumerate(zip(value, args)))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - an annotation this checker does not know
        raise TypeError(f"{where}: cannot check values against {tp!r}")
    raise TypeError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# --------------------------------------------------------------------------------------- presets

_R50_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
_LIGHT_RANGES = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
_SOLOV2_LIGHT_RANGES = ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))


def _schedule_1x(**kwargs: Any) -> TrainConfig:
    return TrainConfig(epochs=12, warmup_ratio=0.001, lr_steps=(8, 11), **kwargs)


def _schedule_3x(short_edges: tuple[int, ...] = (800, 768, 736, 704, 672, 640),
                 long_edge: int = 1333, **kwargs: Any) -> TrainConfig:
    return TrainConfig(epochs=36, warmup_ratio=1 / 3, lr_steps=(27, 33),
                       train_scales=tuple((long_edge, s) for s in short_edges), **kwargs)


def _solo_head(family: Family, **kwargs: Any) -> HeadConfig:
    return HeadConfig(family=family, stacked_convs=7, feat_channels=256,
                      scale_ranges=_R50_RANGES, **kwargs)


def _solov2_head(**kwargs: Any) -> HeadConfig:
    return HeadConfig(family="solov2", **{
        "stacked_convs": 4, "feat_channels": 512, "scale_ranges": _R50_RANGES,
        "mask_feat_channels": 128, "mask_out_channels": 256, **kwargs})


def _solov2_light_head(**kwargs: Any) -> HeadConfig:
    return _solov2_head(**{"stacked_convs": 2, "feat_channels": 256,
                           "scale_ranges": _SOLOV2_LIGHT_RANGES, "mask_out_channels": 128,
                           **kwargs})


_CLIP = 35.0  # every SOLOv2 config clips gradients at L2 norm 35; SOLO / Decoupled do not clip
_LIGHT_SHORT_EDGES = (512, 480, 448, 416, 384, 352)
_DCN_HEAD = {"dcn": True, "dcn_on_all_convs": True, "mask_feat_dcn": True}

PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        ModelConfig(name="solo_r50_fpn_1x_coco", head=_solo_head("solo"), train=_schedule_1x()),
        ModelConfig(name="solo_r50_fpn_3x_coco", head=_solo_head("solo"), train=_schedule_3x()),
        ModelConfig(name="decoupled-solo_r50_fpn_1x_coco", head=_solo_head("decoupled_solo"),
                    train=_schedule_1x()),
        ModelConfig(name="decoupled-solo_r50_fpn_3x_coco", head=_solo_head("decoupled_solo"),
                    train=_schedule_3x()),
        ModelConfig(
            name="decoupled-solo-light_r50_fpn_3x_coco",
            head=HeadConfig(family="decoupled_solo_light", stacked_convs=4, feat_channels=256,
                            scale_ranges=_LIGHT_RANGES),
            train=_schedule_3x(_LIGHT_SHORT_EDGES, long_edge=852, test_scale=(852, 512))),
        ModelConfig(name="solov2_r50_fpn_1x_coco", head=_solov2_head(),
                    train=_schedule_1x(grad_clip=_CLIP)),
        ModelConfig(name="solov2_r50_fpn_ms-3x_coco", head=_solov2_head(),
                    train=_schedule_3x(grad_clip=_CLIP)),
        ModelConfig(name="solov2_r101_fpn_ms-3x_coco", backbone=BackboneConfig(depth=101),
                    head=_solov2_head(), train=_schedule_3x(grad_clip=_CLIP)),
        ModelConfig(name="solov2_r101-dcn_fpn_ms-3x_coco",
                    backbone=BackboneConfig(depth=101, dcn=True),
                    head=_solov2_head(**_DCN_HEAD), train=_schedule_3x(grad_clip=_CLIP)),
        # mmdetection initialises it from open-mmlab://resnext101_64x4d, not torchvision
        ModelConfig(name="solov2_x101-dcn_fpn_ms-3x_coco",
                    backbone=BackboneConfig(depth=101, groups=64, width_per_group=4, dcn=True),
                    head=_solov2_head(**_DCN_HEAD), train=_schedule_3x(grad_clip=_CLIP)),
        # the light test scale is written (448, 768) in mmdetection; keep_ratio makes it (768, 448)
        *(ModelConfig(name=f"solov2-light_r{depth}_fpn_ms-3x_coco",
                      backbone=BackboneConfig(depth=depth), head=_solov2_light_head(),
                      train=_schedule_3x(_LIGHT_SHORT_EDGES, long_edge=768, test_scale=(768, 448),
                                         grad_clip=_CLIP))
          for depth in (18, 34, 50)),
        ModelConfig(name="solov2-light_r50-dcn_fpn_ms-3x_coco",
                    backbone=BackboneConfig(depth=50, dcn=True),
                    head=_solov2_light_head(stacked_convs=3, scale_ranges=_LIGHT_RANGES, dcn=True,
                                            dcn_on_all_convs=False),
                    train=_schedule_3x(_LIGHT_SHORT_EDGES, long_edge=768, test_scale=(768, 448),
                                       grad_clip=_CLIP)),
    )
}
