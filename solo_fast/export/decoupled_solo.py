"""Decoupled SOLO's (and Decoupled SOLO Light's) candidate masks for the export graphs: the Y map
of the cell's row times the X map of its column, each the sigmoid of its logits resized
bilinearly to the level-0 mask size first, as in mmdetection (docs/algorithms.md §10).
"""

# N=images, L=levels, S=grid side of a level, T=sum of S_l (maps of one branch), Q=candidate
# columns, h, w=size of one level's mask map, H4, W4=level 0's map

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from solo_fast.export.common import GraphMasks
from solo_fast.models.decoupled_solo import DecoupledSOLOOutput

__all__ = ["DecoupledGraphMasks"]


class DecoupledGraphMasks(GraphMasks):
    """Soft masks from :class:`~solo_fast.models.decoupled_solo.DecoupledSOLOOutput`
    (``mask_preds_x`` / ``mask_preds_y``, L tensors (N, S_l, h_l, w_l) of logits: channel j of X
    belongs to grid column j, channel i of Y to grid row i; level 0 at stride 4).

    Every map of both branches is prepared once (T = sum of S_l maps per branch, 128 for the
    presets), then each candidate's pair gathered.

    Constructor arguments: those of :class:`~.common.GraphMasks`.
    """

    output_type = DecoupledSOLOOutput

    def soft(self, outputs: Any, level: Tensor, local: Tensor, cell: Tensor) -> Tensor:
        size = self.mask_size(outputs)

        def prepare(levels: list[Tensor]) -> Tensor:  # (N * T, H4, W4) probabilities
            probs = torch.cat([F.interpolate(m.sigmoid(), size=size, mode="bilinear",
                                             align_corners=False) for m in levels], 1)
            return probs.flatten(0, 1)

        grids = torch.tensor(self.num_grids, device=level.device)
        start = grids.cumsum(0) - grids  # (L,) first map of each level in a branch
        grid, first = grids[level], start[level]  # (N, Q)
        image = torch.arange(level.shape[0], device=level.device)[:, None] * sum(self.num_grids)
        column = first + local % grid + image  # (N, Q) into (N * T, .)
        row = first + local // grid + image
        # Y times X, mmdetection's order (the product commutes exactly anyway)
        return prepare(outputs.mask_preds_y)[row] * prepare(outputs.mask_preds_x)[column]
