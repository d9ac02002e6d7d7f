"""SOLO's candidate masks for the export graphs: the sigmoid of the candidate's cell channel,
resized bilinearly to the level-0 mask size (docs/algorithms.md §10; mmdetection's eval forward
takes the sigmoid first, then resizes every channel, which per channel is the same arithmetic).
"""

# N=images, L=levels, S=grid side of a level, Q=candidate columns, h, w=size of one level's mask
# map, H4, W4=level 0's map

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from solo_fast.export.common import GraphMasks
from solo_fast.models.solo import SOLOOutput

__all__ = ["SOLOGraphMasks"]


class SOLOGraphMasks(GraphMasks):
    """Soft masks from :class:`~solo_fast.models.solo.SOLOOutput` (``mask_preds``, L tensors
    (N, S_l^2, h_l, w_l) of logits, level 0 at stride 4).

    Every level's channel of every column is gathered and resized, then the candidate's level
    picked: L resizes of Q maps, a price of batching a varying number of candidates per level.

    Constructor arguments: those of :class:`~.common.GraphMasks`.
    """

    output_type = SOLOOutput

    def soft(self, outputs: Any, level: Tensor, local: Tensor, cell: Tensor) -> Tensor:
        size = self.mask_size(outputs)
        image = torch.arange(level.shape[0], device=level.device)[:, None]  # (N, 1)
        soft = None
        for index, maps in enumerate(outputs.mask_preds):
            channels = maps.shape[1]
            rows = local.clamp(0, channels - 1) + image * channels  # (N, Q) into (N * S^2, .)
            chosen = maps.flatten(0, 1)[rows]  # (N, Q, h, w)
            probs = F.interpolate(chosen.sigmoid(), size=size, mode="bilinear",
                                  align_corners=False)  # (N, Q, H4, W4)
            soft = probs if soft is None else torch.where(
                (level == index)[:, :, None, None], probs, soft)
        return soft
