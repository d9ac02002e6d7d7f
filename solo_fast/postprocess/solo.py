"""SOLO's post-processing: one mask channel per grid cell (docs/algorithms.md §10).

A candidate's soft mask is the sigmoid of its cell's channel, resized bilinearly to the level-0
mask size (sigmoid first, as mmdetection's eval forward does); only the candidates' channels are
gathered, activated and resized, and the fused path scores them with
:func:`~solo_fast.ops.solo_mask_scores` without resizing any into memory.
"""

# N=images, L=levels, S=grid side of a level, K=candidates, K_l=candidates of level l,
# Q=mask channels of a level (S^2), h, w=size of one level's mask map, H4, W4=level 0's map

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from solo_fast import ops
from solo_fast.postprocess.common import (
    CandidateMasks,
    Candidates,
    check_levels,
    prepare_mask_probs,
)
from solo_fast.postprocess.processor import PostProcessor

__all__ = ["SOLOMasks", "SOLOPostProcessor"]


class SOLOMasks(CandidateMasks):
    """The candidates' soft masks from SOLO's per-level mask maps.

    Args:
        levels: L tensors (N, Q_l, h_l, w_l) of mask logits (``activate``) or probabilities
            already resized to level 0's size (mmdetection's eval-mode outputs).
        candidates: The batch's candidates.
        activate: The maps are logits: sigmoid and resize first.
    """

    def __init__(self, levels: Sequence[Tensor], candidates: Candidates, *,
                 activate: bool) -> None:
        super().__init__(size=levels[0].shape[-2:], num=len(candidates.image),
                         device=levels[0].device)
        self.levels = levels
        self.candidates = candidates
        self.activate = activate

    def scores(self, threshold: float, backend: str | None) -> ops.MaskScores:
        image, level, local = self.candidates.image, self.candidates.level, self.candidates.local
        area = torch.zeros(self.num, dtype=torch.int64, device=image.device)
        soft_sum = torch.zeros(self.num, dtype=torch.float64, device=image.device)
        for index_level, maps in enumerate(self.levels):  # one op call per level
            index = (level == index_level).nonzero().squeeze(1)  # (K_l,)
            if index.numel() == 0:
                continue
            # the candidates' indices come from select_candidates: in range by construction
            scored = ops.solo_mask_scores(maps, image[index], local[index], size=self.size,
                                          threshold=threshold, logits=self.activate,
                                          backend=backend, check_index=False)
            area[index], soft_sum[index] = scored.area, scored.soft_sum
        return ops.MaskScores(area, soft_sum, None)

    def soft(self, index: Tensor) -> Tensor:
        image, level = self.candidates.image[index], self.candidates.level[index]
        local = self.candidates.local[index]
        soft = self.levels[0].new_empty((len(index), *self.size))  # (k, H4, W4)
        for index_level, maps in enumerate(self.levels):
            members = (level == index_level).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            chosen = maps[image[members], local[members]]  # (k_l, h, w)
            soft[members] = (prepare_mask_probs(chosen[None], self.size)[0] if self.activate
                             else chosen)
        return soft


class SOLOPostProcessor(PostProcessor):
    """Instances from SOLO outputs (:class:`~solo_fast.models.solo.SOLOOutput`: ``mask_preds``,
    L tensors (N, S_l^2, h_l, w_l) of mask logits, level 0 at stride 4, and ``cls_preds``).

    :meth:`process_prepared` takes ``mask_probs``: L tensors (N, S_l^2, H4, W4) of probabilities.
    Constructor arguments and the call: :class:`~.processor.PostProcessor`.
    """

    def candidate_masks(self, outputs: Any, candidates: Candidates) -> SOLOMasks:
        check_levels(outputs.mask_preds, "mask_preds", self.num_grids, "cells")
        return SOLOMasks(outputs.mask_preds, candidates, activate=True)

    def prepared_masks(self, candidates: Candidates, *,
                       mask_probs: Sequence[Tensor]) -> SOLOMasks:
        check_levels(mask_probs, "mask_probs", self.num_grids, "cells")
        return SOLOMasks(mask_probs, candidates, activate=False)
