"""Building blocks shared by every SOLO-family head.

* :class:`ConvGNReLU`, mmcv's ``ConvModule(norm_cfg=GN)``: conv (no bias) -> GN -> ReLU, with
  the submodule names ``conv`` and ``gn`` so that mmdetection's tower weights load unchanged;
  :func:`conv_tower`, a stack of them.
* :func:`init_output_convs`, mmdetection's initialisation of a head's output convs.
* :func:`upsample2x`, the bilinear x2 of the mask branches.
* :func:`coord_features`, mmdetection's ``generate_coordinate`` (docs/algorithms.md §4.3).
* :func:`resize_feats`, the FPN-to-instance-level resampling of docs/algorithms.md §4.2.
"""

# N=images, C=channels, H, W=spatial size of the tensor at hand, L=levels

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PRIOR_PROB_BIAS",
    "ConvGNReLU",
    "conv_tower",
    "coord_features",
    "init_output_convs",
    "resize_feats",
    "upsample2x",
]

# mmcv's bias_init_with_prob(0.01): a sigmoid output starts at probability 0.01 (-4.59512)
PRIOR_PROB_BIAS = -math.log((1 - 0.01) / 0.01)


class ConvGNReLU(nn.Module):
    """Conv (no bias) -> GroupNorm -> ReLU, as mmcv's ``ConvModule`` with a GN ``norm_cfg``.

    Weights are drawn from Normal(0, 0.01) and the GN affine starts at (1, 0): the initialisation
    mmdetection's SOLO heads give their tower convs (docs/algorithms.md §4.4).

    Args:
        in_channels: Input channels.
        out_channels: Output channels; must be divisible by ``num_groups``.
        kernel_size: Square kernel side; the padding keeps the spatial size (kernel_size // 2).
        num_groups: GroupNorm groups (32 in every mmdetection config).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, *, num_groups: int = 32
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)  # eps 1e-5, mmcv's GN default
        nn.init.normal_(self.conv.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        return F.relu(self.gn(self.conv(x)))


def conv_tower(in_channels: int, feat_channels: int, stacked_convs: int, *,
               num_groups: int) -> nn.Sequential:
    """A head tower: ``stacked_convs`` 3x3 :class:`ConvGNReLU`, the first from ``in_channels``.

    mmdetection's ``mask_convs`` / ``cls_convs`` / ``kernel_convs``; the children are named
    ``0..stacked_convs-1``, as in mmdetection's ``ModuleList``, so checkpoint keys match.

    Args:
        in_channels: Channels of the tower's input.
        feat_channels: Channels of every conv's output.
        stacked_convs: Number of convs.
        num_groups: GroupNorm groups.

    Returns:
        ``(N, in_channels, H, W) -> (N, feat_channels, H, W)``.
    """
    return nn.Sequential(*(
        ConvGNReLU(in_channels if i == 0 else feat_channels, feat_channels, num_groups=num_groups)
        for i in range(stacked_convs)))


def init_output_convs(*convs: nn.Conv2d, bias: float = PRIOR_PROB_BIAS) -> None:
    """Weights from Normal(0, 0.01) and a constant bias, in the order given.

    mmdetection's ``init_cfg`` of the SOLO heads: ``Normal(std=0.01)`` with ``bias_prob=0.01``
    (:data:`PRIOR_PROB_BIAS`) for the class and mask outputs; SOLOv2's kernel output keeps
    bias 0.
    """
    for conv in convs:
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(conv.bias, bias)


def upsample2x(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W), bilinear, align_corners=False.

    Given as ``scale_factor`` (not ``size``), as mmdetection does: the source coordinates are
    computed from the given scale.
    """
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def coord_features(like: Tensor) -> Tensor:
    """CoordConv channels for a feature map: [x, y], each a linspace(-1, 1) ramp
    (docs/algorithms.md §4.3).

    x varies along columns, y along rows, and every image of the batch gets the same values.
    The ramps are computed in float32 (as mmdetection does) and then cast to ``like``'s dtype.

    Args:
        like: (N, C, H, W); only its shape, device and dtype are used.

    Returns:
        (N, 2, H, W): channel 0 is x, channel 1 is y.
    """
    n, _, h, w = like.shape
    if torch.compiler.is_exporting():
        # linspace's step count is an int, not a symbolic size, so torch.export would fix it to
        # the example's size: the same ramps from arange (within an ulp of linspace's values)
        x, y = _ramp(w, like.device), _ramp(h, like.device)
    else:
        x = torch.linspace(-1, 1, w, device=like.device)  # (W,)
        y = torch.linspace(-1, 1, h, device=like.device)  # (H,)
    grid = torch.stack([x.expand(h, w), y[:, None].expand(h, w)])  # (2, H, W)
    return grid.to(like.dtype).expand(n, 2, h, w)


def _ramp(size: Any, device: torch.device) -> Tensor:
    """(size,) float32 ramp from -1 to 1 computed as linspace's scalar path does (size >= 2)."""
    index = torch.arange(size, dtype=torch.float32, device=device)
    step = torch.full((), 2.0, device=device) / (size - 1)
    return torch.where(index < size // 2, -1 + step * index, 1 - step * (size - 1 - index))


def resize_feats(feats: Sequence[Tensor]) -> list[Tensor]:
    """Resample the five FPN maps P2..P6 into the five instance levels (docs/algorithms.md §4.2,
    §3.2).

    Level 0 is P2 bilinearly scaled by 0.5 (source coordinates from the *given* scale, which for
    the even sizes of a 32-padded canvas equals 2x2 average pooling); the last level is P6
    bilinearly resized to P5's size (a non-integer ratio in general); the others pass unchanged.
    All resizes use align_corners=False and no antialiasing.

    Args:
        feats: L >= 2 tensors (N, C, H_l, W_l), finest first.

    Returns:
        L tensors; level 0 is (N, C, H_0 / 2, W_0 / 2) and level L-1 has level L-2's size.
    """
    out = list(feats)
    out[0] = F.interpolate(feats[0], scale_factor=0.5, mode="bilinear", align_corners=False)
    out[-1] = F.interpolate(
        feats[-1], size=feats[-2].shape[-2:], mode="bilinear", align_corners=False)
    return out
