"""solo_fast.config: every mmdetection preset, type-checked overrides and their error messages."""

from __future__ import annotations

import dataclasses

import pytest

from solo_fast import build_model
from solo_fast.config import (
    PRESETS,
    BackboneConfig,
    HeadConfig,
    ModelConfig,
    TestConfig,
    TrainConfig,
    apply_overrides,
    get_preset,
    parse_overrides,
)

MMDET_CONFIGS = {
    "solo_r50_fpn_1x_coco", "solo_r50_fpn_3x_coco",
    "decoupled-solo_r50_fpn_1x_coco", "decoupled-solo_r50_fpn_3x_coco",
    "decoupled-solo-light_r50_fpn_3x_coco",
    "solov2_r50_fpn_1x_coco", "solov2_r50_fpn_ms-3x_coco", "solov2_r101_fpn_ms-3x_coco",
    "solov2_r101-dcn_fpn_ms-3x_coco", "solov2_x101-dcn_fpn_ms-3x_coco",
    "solov2-light_r18_fpn_ms-3x_coco", "solov2-light_r34_fpn_ms-3x_coco",
    "solov2-light_r50_fpn_ms-3x_coco", "solov2-light_r50-dcn_fpn_ms-3x_coco",
}
DCN_CONFIGS = {name for name in MMDET_CONFIGS if "dcn" in name}
R50_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
LIGHT_RANGES = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
MS_800 = tuple((1333, s) for s in (800, 768, 736, 704, 672, 640))

# docs/algorithms.md §13.1 / §13.2: (family, depth, stacked_convs, feat_channels, E, scale_ranges,
# epochs, warmup_ratio, lr_steps, grad_clip, train_scales, test_scale)
EXPECTED = {
    "solo_r50_fpn_1x_coco": ("solo", 50, 7, 256, None, R50_RANGES, 12, 0.001, (8, 11), None,
                             ((1333, 800),), (1333, 800)),
    "solo_r50_fpn_3x_coco": ("solo", 50, 7, 256, None, R50_RANGES, 36, 1 / 3, (27, 33), None,
                             MS_800, (1333, 800)),
    "decoupled-solo_r50_fpn_1x_coco": ("decoupled_solo", 50, 7, 256, None, R50_RANGES, 12, 0.001,
                                       (8, 11), None, ((1333, 800),), (1333, 800)),
    "decoupled-solo-light_r50_fpn_3x_coco": (
        "decoupled_solo_light", 50, 4, 256, None, LIGHT_RANGES, 36, 1 / 3, (27, 33), None,
        tuple((852, s) for s in (512, 480, 448, 416, 384, 352)), (852, 512)),
    "solov2_r50_fpn_1x_coco": ("solov2", 50, 4, 512, 256, R50_RANGES, 12, 0.001, (8, 11), 35.0,
                               ((1333, 800),), (1333, 800)),
    "solov2_r101_fpn_ms-3x_coco": ("solov2", 101, 4, 512, 256, R50_RANGES, 36, 1 / 3, (27, 33),
                                   35.0, MS_800, (1333, 800)),
    "solov2-light_r18_fpn_ms-3x_coco": (
        "solov2", 18, 2, 256, 128, ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896)), 36,
        1 / 3, (27, 33), 35.0, tuple((768, s) for s in (512, 480, 448, 416, 384, 352)),
        (768, 448)),
    "solov2-light_r50-dcn_fpn_ms-3x_coco": (
        "solov2", 50, 3, 256, 128, LIGHT_RANGES, 36, 1 / 3, (27, 33), 35.0,
        tuple((768, s) for s in (512, 480, 448, 416, 384, 352)), (768, 448)),
}


def test_every_mmdet_config_has_a_preset():
    assert set(PRESETS) == MMDET_CONFIGS


@pytest.mark.parametrize("name", sorted(MMDET_CONFIGS))
def test_preset_builds(name):
    cfg = get_preset(name)
    assert isinstance(cfg, ModelConfig) and cfg.name == name
    head = cfg.head
    assert (head.num_classes, head.in_channels, head.norm_groups, head.pos_scale) == (80, 256, 32,
                                                                                     0.2)
    assert head.num_grids == (40, 36, 24, 16, 12) and head.strides == (8, 8, 16, 32, 32)
    assert cfg.test == TestConfig(nms_pre=500, score_thr=0.1, mask_thr=0.5, filter_thr=0.05,
                                  kernel="gaussian", sigma=2.0, max_per_img=100)
    train = cfg.train
    assert (train.lr, train.momentum, train.weight_decay) == (0.01, 0.9, 1e-4)
    assert train.warmup_iters == 500
    assert (cfg.backbone.frozen_stages, cfg.backbone.norm_eval) == (1, True)
    assert (head.dcn or cfg.backbone.dcn) == (name in DCN_CONFIGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.head.num_classes = 3


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_values(name):
    cfg = PRESETS[name]
    head, train = cfg.head, cfg.train
    actual = (head.family, cfg.backbone.depth, head.stacked_convs, head.feat_channels,
              head.mask_out_channels if head.family == "solov2" else None, head.scale_ranges,
              train.epochs, train.warmup_ratio, train.lr_steps, train.grad_clip,
              train.train_scales, train.test_scale)
    assert actual == EXPECTED[name]


def test_dcn_flags():
    full = PRESETS["solov2_r101-dcn_fpn_ms-3x_coco"]
    assert full.backbone.dcn and full.head.dcn and full.head.dcn_on_all_convs
    assert full.head.mask_feat_dcn
    light = PRESETS["solov2-light_r50-dcn_fpn_ms-3x_coco"]
    assert light.head.dcn and not light.head.dcn_on_all_convs and not light.head.mask_feat_dcn
    resnext = PRESETS["solov2_x101-dcn_fpn_ms-3x_coco"].backbone
    assert (resnext.depth, resnext.groups, resnext.width_per_group) == (101, 64, 4)


@pytest.mark.parametrize("name", sorted(DCN_CONFIGS))
def test_dcn_presets_do_not_build(name):
    with pytest.raises(NotImplementedError, match="DCN/ResNeXt is not supported yet"):
        build_model(get_preset(name))


def test_overrides():
    cfg = get_preset("solov2_r50_fpn_1x_coco", num_classes=3, lr=1, depth=101,
                     train_scales=[[1000, 600], (800, 500)], grad_clip=None,
                     **{"test.kernel": "linear", "backbone.pretrained": "/tmp/r101.pth"})
    assert cfg.head.num_classes == 3 and cfg.backbone.depth == 101
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.train_scales == ((1000, 600), (800, 500)) and cfg.train.grad_clip is None
    assert cfg.test.kernel == "linear" and cfg.backbone.pretrained == "/tmp/r101.pth"
    assert PRESETS["solov2_r50_fpn_1x_coco"].head.num_classes == 80  # presets stay untouched
    cfg = get_preset("solo_r50_fpn_1x_coco", head=HeadConfig(family="solo", num_classes=5),
                     name="mine")
    assert cfg.head.num_classes == 5 and cfg.name == "mine"


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown config field 'num_clases'.*num_classes"):
        get_preset("solov2_r50_fpn_1x_coco", num_clases=3)
    with pytest.raises(ValueError, match="unknown preset 'solov2_r50_fpn_1x'.*_1x_coco"):
        get_preset("solov2_r50_fpn_1x")
    with pytest.raises(ValueError, match="ambiguous.*backbone.dcn.*head.dcn"):
        get_preset("solov2_r50_fpn_1x_coco", dcn=True)
    assert get_preset("solov2_r50_fpn_1x_coco", **{"head.dcn": True}).head.dcn
    # the batch is a run setting (solo-fast train --batch-size): --set batch_size=8 must fail
    # rather than be accepted and ignored
    with pytest.raises(ValueError, match="unknown config field 'batch_size'"):
        get_preset("solov2_r50_fpn_1x_coco", batch_size=8)


@pytest.mark.parametrize("overrides,error,match", [
    ({"num_classes": "3"}, TypeError, "HeadConfig.num_classes must be int"),
    ({"num_classes": 3.0}, TypeError, "HeadConfig.num_classes must be int"),
    ({"norm_eval": 1}, TypeError, "BackboneConfig.norm_eval must be bool"),
    ({"lr": True}, TypeError, "TrainConfig.lr must be float"),
    ({"pretrained": 3}, TypeError, "BackboneConfig.pretrained must be"),
    ({"test_scale": (1333, 800, 3)}, TypeError, "TrainConfig.test_scale must be"),
    ({"scale_ranges": ((1, "a"),) * 5}, TypeError, r"scale_ranges\[0\]\[1\] must be float"),
    ({"kernel": "box"}, ValueError, "kernel must be one of"),
    ({"family": "solov3"}, ValueError, "family must be one of"),
    ({"depth": 152}, ValueError, "depth must be 18, 34, 50 or 101"),
    ({"num_grids": (40, 36, 24, 16)}, ValueError, "one entry per level"),
    ({"out_channels": 128}, ValueError, "must equal neck.out_channels"),
    ({"lr_steps": (11, 8)}, ValueError, "ascending"),
    ({"feat_channels": 500}, ValueError, "divisible by head.norm_groups"),
])
def test_bad_overrides(overrides, error, match):
    with pytest.raises(error, match=match):
        get_preset("solov2_r50_fpn_1x_coco", **overrides)


def test_parse_overrides():
    parsed = parse_overrides(["num_classes=3", "kernel=linear", "test_scale=(800, 500)",
                              "grad_clip=None", " lr = 0.02 "])
    assert parsed == {"num_classes": 3, "kernel": "linear", "test_scale": (800, 500),
                      "grad_clip": None, "lr": 0.02}
    cfg = apply_overrides(PRESETS["solov2_r50_fpn_1x_coco"], parsed)
    assert cfg.test.kernel == "linear" and cfg.train.lr == 0.02
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["num_classes"])


def test_direct_construction_is_checked():
    with pytest.raises(TypeError, match="BackboneConfig.depth must be int"):
        BackboneConfig(depth="50")
    assert TrainConfig(train_scales=[[1, 2]]).train_scales == ((1, 2),)
    assert repr(PRESETS["solo_r50_fpn_1x_coco"]).startswith("ModelConfig(name='solo_r50_fpn")
