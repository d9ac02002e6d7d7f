"""solo_fast.models.backbone: ResNet C2..C5, FPN P2..P6, frozen stages, frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from solo_fast.config import BackboneConfig, NeckConfig
from solo_fast.models.backbone import (
    FPN,
    ResNet,
    build_backbone,
    build_neck,
    mmdet_backbone_neck_key,
)

# N=images, H, W=input size


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.fixture(scope="module")
def r18() -> tuple[ResNet, FPN]:
    torch.manual_seed(0)
    backbone = ResNet(depth=18)
    return backbone, FPN(in_channels=backbone.out_channels)


@pytest.mark.parametrize("height,width", [(96, 128), (160, 96)])
def test_feature_shapes(r18, height, width):
    # 160 x 96 gives odd maps from C4 on (C5 5 x 3, P6 3 x 2): ceil everywhere
    backbone, neck = r18
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        c_feats = backbone(images)
        p_feats = neck(c_feats)
    assert [tuple(c.shape) for c in c_feats] == [
        (2, ch, height // s, width // s) for ch, s in zip((64, 128, 256, 512), (4, 8, 16, 32))]
    expected = [(2, 256, height // s, width // s) for s in (4, 8, 16, 32)]
    expected.append((2, 256, -(-height // 64), -(-width // 64)))
    assert [tuple(p.shape) for p in p_feats] == expected
    assert torch.equal(p_feats[4], p_feats[3][..., ::2, ::2])


@pytest.mark.parametrize("depth,channels", [
    (18, (64, 128, 256, 512)), (34, (64, 128, 256, 512)),
    (50, (256, 512, 1024, 2048)), (101, (256, 512, 1024, 2048))])
def test_out_channels(depth, channels):
    with torch.device("meta"):
        backbone = ResNet(depth=depth)
    assert backbone.out_channels == channels
    last_block = backbone.layer4[-1]
    last_bn = last_block.bn3 if depth >= 50 else last_block.bn2
    assert last_bn.num_features == channels[-1]
    assert not hasattr(backbone, "fc") and not hasattr(backbone, "avgpool")


def test_frozen_stages_and_norm_eval(r18):
    backbone, _ = r18
    backbone.train()
    frozen = [backbone.conv1, backbone.bn1, backbone.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    for layer in (backbone.layer2, backbone.layer3, backbone.layer4):
        assert all(p.requires_grad for p in layer.parameters())
        assert layer.training  # only the BatchNorm layers are held in eval mode
    assert all(not bn.training for bn in _bn_layers(backbone))
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    backbone(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in stats.items())


def test_nothing_frozen():
    backbone = ResNet(depth=18, frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(bn.training for bn in _bn_layers(backbone))


def test_fpn_init():
    neck = FPN(in_channels=(8, 16, 32, 64), out_channels=16)
    convs = [*neck.lateral_convs, *neck.output_convs]
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    bound = (6 / (16 * 9 + 16 * 9)) ** 0.5  # Xavier-uniform bound of a 3x3 16 -> 16 conv
    assert neck.output_convs[0].weight.abs().max() <= bound


def test_load_pretrained(tmp_path):
    torch.manual_seed(1)
    source = ResNet(depth=18)
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    backbone = build_backbone(BackboneConfig(depth=18, pretrained=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_backbone(BackboneConfig(depth=18, pretrained=str(tmp_path / "missing.pth")))


@pytest.mark.parametrize("cfg", [BackboneConfig(dcn=True), BackboneConfig(depth=101, groups=64,
                                                                         width_per_group=4)])
def test_dcn_and_resnext_not_supported(cfg):
    with pytest.raises(NotImplementedError, match="DCN/ResNeXt is not supported yet"):
        build_backbone(cfg)


def test_build_neck():
    neck = build_neck(NeckConfig(out_channels=32, num_outs=5), (64, 128, 256, 512))
    assert [c.in_channels for c in neck.lateral_convs] == [64, 128, 256, 512]
    assert neck.output_convs[3].out_channels == 32


def test_mmdet_key_map():
    assert mmdet_backbone_neck_key("backbone.layer1.0.downsample.1.running_var") == (
        "backbone.layer1.0.downsample.1.running_var")
    assert mmdet_backbone_neck_key("neck.lateral_convs.3.conv.bias") == "neck.lateral_convs.3.bias"
    assert mmdet_backbone_neck_key("neck.fpn_convs.0.conv.weight") == "neck.output_convs.0.weight"
    assert mmdet_backbone_neck_key("mask_head.conv_cls.bias") is None
    with pytest.raises(KeyError):
        mmdet_backbone_neck_key("neck.fpn_convs.4.bn.weight")


def test_repr(r18):
    backbone, neck = r18
    assert repr(backbone).startswith("ResNet(") and "output_convs" in repr(neck)
