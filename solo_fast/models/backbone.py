"""Backbone and neck: torchvision ResNet-18/34/50/101 (C2..C5) and the FPN (P2..P6) of
docs/algorithms.md §4.1.

Parameter names follow mmdetection's where they can: mmdetection's ``ResNet`` uses torchvision's
names, so ``backbone.*`` keys are identical. The FPN convs are plain ``nn.Conv2d`` here,
``lateral_convs.{i}`` and ``output_convs.{i}`` (mmdetection: ``lateral_convs.{i}.conv``,
``fpn_convs.{i}.conv``); :func:`mmdet_backbone_neck_key` maps the names.
"""

# N=images, C=channels, H, W=input size; C_k / P_k have stride 2^k

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import resnet

from solo_fast.config import BackboneConfig, NeckConfig

__all__ = ["FPN", "ResNet", "build_backbone", "build_neck", "mmdet_backbone_neck_key"]

_ARCHS: dict[int, tuple[type[nn.Module], list[int]]] = {
    18: (resnet.BasicBlock, [2, 2, 2, 2]),
    34: (resnet.BasicBlock, [3, 4, 6, 3]),
    50: (resnet.Bottleneck, [3, 4, 6, 3]),
    101: (resnet.Bottleneck, [3, 4, 23, 3]),
}


class ResNet(resnet.ResNet):
    """torchvision's ResNet as mmdetection's ``ResNet(style='pytorch', out_indices=(0, 1, 2, 3))``.

    The classifier is removed. ``frozen_stages`` freezes the stem and the first stages
    (requires_grad off, eval mode); ``norm_eval`` keeps every BatchNorm in eval mode in training,
    so running statistics never change while the affine parameters of unfrozen stages still
    train. Random init is mmdetection's: Kaiming-normal (fan_out) convs, BN (1, 0), and the last
    BN of each residual block zeroed.

    Args:
        depth: 18, 34, 50 or 101.
        frozen_stages: -1 (none), 0 (stem) or k in 1..4 (stem and stages 1..k).
        norm_eval: Keep BatchNorm layers in eval mode whenever the module is in training mode.
    """

    def __init__(self, *, depth: int = 50, frozen_stages: int = 1, norm_eval: bool = True) -> None:
        if depth not in _ARCHS:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCHS)}, got {depth}")
        block, layers = _ARCHS[depth]
        super().__init__(block, layers, zero_init_residual=True)
        del self.avgpool, self.fc
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        # channels of C2..C5
        self.out_channels = tuple(64 * block.expansion * 2**i for i in range(4))
        self._freeze_stages()

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps C2..C5.

        Args:
            x: (N, 3, H, W) normalised images.

        Returns:
            Four tensors (N, out_channels[k], ceil(H / 2^(k+2)), ceil(W / 2^(k+2))), k = 0..3.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _freeze_stages(self) -> None:
        frozen: list[nn.Module] = [self.conv1, self.bn1] if self.frozen_stages >= 0 else []
        frozen += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def load_pretrained(self, source: str) -> None:
        """Load ImageNet weights from a torchvision ResNet state-dict file; never downloads.

        Args:
            source: A file path, or ``"torchvision"`` for the IMAGENET1K_V1 file in torch's hub
                cache (the weights mmdetection's ``torchvision://resnet{depth}`` loads).

        Raises:
            FileNotFoundError: the file does not exist (no download is attempted).
        """
        path = Path(_torchvision_cache_file(self.depth) if source == "torchvision" else source)
        if not path.is_file():
            raise FileNotFoundError(
                f"no ImageNet weights at {path}; download torchvision's resnet{self.depth} "
                f"IMAGENET1K_V1 weights yourself and pass their path (solo_fast never downloads)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        self.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})


def _torchvision_cache_file(depth: int) -> Path:
    weights = torchvision.models.get_model_weights(f"resnet{depth}").IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


class FPN(nn.Module):
    """mmdetection's ``FPN(start_level=0, add_extra_convs=False)``.

    P_k = 3x3 conv of (1x1 lateral conv of C_k + nearest-upsampled top-down sum), k = 2..5; each
    extra output subsamples the previous one, ``max_pool2d(kernel 1, stride 2)``, i.e.
    ``P[:, :, ::2, ::2]`` (P6 has ceil(H5 / 2) rows). Convs have biases and mmdetection's
    Xavier-uniform init.

    Args:
        in_channels: Channels of C2..C5.
        out_channels: Channels of every output.
        num_outs: Number of outputs, >= len(in_channels).
    """

    def __init__(
        self, *, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5
    ) -> None:
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) < number of inputs ({len(in_channels)})")
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """P2..P(num_outs + 1).

        Args:
            feats: C2..C5, (N, in_channels[k], H_k, W_k).

        Returns:
            ``num_outs`` tensors (N, out_channels, H_k, W_k), the extra ones each subsampling the
            previous by 2 (rounding up).
        """
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(outs[-1][:, :, ::2, ::2])  # = max_pool2d(kernel 1, stride 2)
        return outs


def build_backbone(cfg: BackboneConfig) -> ResNet:
    """The ResNet of a :class:`~solo_fast.config.BackboneConfig`, pretrained weights loaded.

    Raises:
        NotImplementedError: DCN or ResNeXt backbones.
    """
    if cfg.dcn or cfg.groups != 1 or cfg.width_per_group != 64:
        raise NotImplementedError(
            "DCN/ResNeXt is not supported yet: solo_fast has no deformable convolution and no "
            "ResNeXt backbone (presets *-dcn_* and x101-*)")
    backbone = ResNet(depth=cfg.depth, frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval)
    if cfg.pretrained is not None:
        backbone.load_pretrained(cfg.pretrained)
    return backbone


def build_neck(cfg: NeckConfig, in_channels: Sequence[int]) -> FPN:
    """The FPN of a :class:`~solo_fast.config.NeckConfig` on a backbone's ``out_channels``."""
    return FPN(in_channels=in_channels, out_channels=cfg.out_channels, num_outs=cfg.num_outs)


_NECK_KEYS = [
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$"), r"neck.lateral_convs.\1.\2"),
    (re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$"), r"neck.output_convs.\1.\2"),
]


def mmdet_backbone_neck_key(key: str) -> str | None:
    """The solo_fast name of an mmdetection detector's ``backbone.*`` / ``neck.*`` key.

    Args:
        key: A full detector key, e.g. ``"neck.fpn_convs.0.conv.weight"``.

    Returns:
        The key in a solo_fast detector (``"neck.output_convs.0.weight"``), or None for a key
        outside the backbone and neck.
    """
    if key.startswith("backbone."):
        return key  # mmdetection's ResNet uses torchvision's parameter names
    for pattern, replacement in _NECK_KEYS:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    if key.startswith("neck."):
        raise KeyError(f"unexpected mmdetection FPN key {key!r}")
    return None
