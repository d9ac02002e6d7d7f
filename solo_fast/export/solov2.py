"""SOLOv2's candidate masks for the export graphs: sigmoid(kernel . mask_feats) of each candidate's
cell, as a batched matrix product (docs/algorithms.md §10; mmdetection applies the kernels as a
1x1 convolution per image, the same sums in another order).
"""

# N=images, L=levels, S=grid side of a level, G=cells of all levels, Q=candidate columns,
# E=mask-feature channels, H4, W4=the mask features' size

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from solo_fast.export.common import GraphMasks
from solo_fast.models.solov2 import SOLOv2Output

__all__ = ["SOLOv2GraphMasks"]


class SOLOv2GraphMasks(GraphMasks):
    """Soft masks from :class:`~solo_fast.models.solov2.SOLOv2Output` (``kernel_preds``, L tensors
    (N, E, S_l, S_l); ``mask_feats``, (N, E, H4, W4)).

    Constructor arguments: those of :class:`~.common.GraphMasks`.
    """

    output_type = SOLOv2Output

    def mask_size(self, outputs: Any) -> tuple[Any, Any]:
        return outputs.mask_feats.shape[-2], outputs.mask_feats.shape[-1]

    def soft(self, outputs: Any, level: Tensor, local: Tensor, cell: Tensor) -> Tensor:
        feats = outputs.mask_feats
        num, channels = feats.shape[:2]
        kernels = torch.cat([k.flatten(2) for k in outputs.kernel_preds], 2)  # (N, E, G)
        kernels = kernels.transpose(1, 2).reshape(-1, channels)  # (N * G, E)
        cells = kernels.shape[0] // num
        offset = torch.arange(num, device=cell.device)[:, None] * cells
        chosen = kernels[cell + offset]  # (N, Q, E)
        logits = chosen @ feats.flatten(2)  # (N, Q, H4 * W4)
        return logits.sigmoid().reshape(num, -1, feats.shape[2], feats.shape[3])
