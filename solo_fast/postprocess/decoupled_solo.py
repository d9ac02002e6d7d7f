"""Decoupled SOLO's (and Decoupled SOLO Light's) post-processing (docs/algorithms.md
§10).

The soft mask of cell (i, j) is sigmoid(X[j]) * sigmoid(Y[i]), each branch's probabilities
resized bilinearly to the level-0 mask size first, as in mmdetection. Only the X columns and Y
rows that candidates use are activated and resized, once each; the fused path scores every
candidate's product with :func:`~solo_fast.ops.decoupled_mask_scores` without forming it.
"""

# N=images, L=levels, S=grid side of a level, K=candidates, K_l=candidates of level l,
# U=distinct X/Y maps used, h, w=size of one level's mask map, H4, W4=level 0's map

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

__all__ = ["DecoupledMasks", "DecoupledSOLOPostProcessor"]


class DecoupledMasks(CandidateMasks):
    """The candidates' soft masks probs[row[k]] * probs[col[k]] (Y map times X map), from the
    distinct X and Y maps they use, each prepared once into one (U, H4, W4) tensor.

    Args:
        levels_x, levels_y: L tensors (N, S_l, h_l, w_l) of the X and Y branches: logits
            (``activate``) or probabilities already resized to level 0's size.
        candidates: The batch's candidates.
        num_grids: S_l per level.
        activate: The maps are logits: sigmoid and resize first.
    """

    def __init__(self, levels_x: Sequence[Tensor], levels_y: Sequence[Tensor],
                 candidates: Candidates, *, num_grids: Sequence[int], activate: bool) -> None:
        super().__init__(size=levels_x[0].shape[-2:], num=len(candidates.image),
                         device=levels_x[0].device)
        local = candidates.local
        self.row, self.col = torch.zeros_like(local), torch.zeros_like(local)  # (K,) into probs
        pairs = []  # per level and branch: (maps, image, channel, the candidates' map index)
        for level, grid in enumerate(num_grids):
            index = (candidates.level == level).nonzero().squeeze(1)  # (K_l,)
            if index.numel() == 0:
                continue
            image = candidates.image[index]
            pairs += [(levels_x[level], image, local[index] % grid, self.col, index),
                      (levels_y[level], image, local[index] // grid, self.row, index)]
        # each level's maps written into one preallocated tensor (a cat would copy them all)
        distinct = [torch.unique(image * maps.shape[1] + channel, return_inverse=True)
                    for maps, image, channel, _, _ in pairs]
        self.probs = levels_x[0].new_empty(
            (sum(len(d[0]) for d in distinct), *self.size))  # (U, H4, W4)
        offset = 0
        for (maps, image, channel, which, index), (unique, inverse) in zip(pairs, distinct):
            chosen = maps[unique // maps.shape[1], unique % maps.shape[1]]  # (U_l, h, w)
            self.probs[offset:offset + len(unique)] = (
                prepare_mask_probs(chosen[None], self.size)[0] if activate else chosen)
            which[index] = inverse + offset
            offset += len(unique)

    def scores(self, threshold: float, backend: str | None) -> ops.MaskScores:
        maps = self.probs[None]  # (1, U, H4, W4): one "image" holding every map of the batch
        # row and col index the maps built above: in range by construction
        return ops.decoupled_mask_scores(maps, maps, torch.zeros_like(self.row), self.row,
                                         self.col, threshold=threshold, backend=backend,
                                         check_index=False)

    def soft(self, index: Tensor) -> Tensor:
        # in place: one gathered chunk fewer (multiplication commutes exactly, so these are
        # mmdetection's X * Y values)
        return self.probs[self.row[index]].mul_(self.probs[self.col[index]])  # (k, H4, W4)


class DecoupledSOLOPostProcessor(PostProcessor):
    """Instances from Decoupled SOLO / Decoupled SOLO Light outputs
    (:class:`~solo_fast.models.decoupled_solo.DecoupledSOLOOutput`: ``mask_preds_x`` and
    ``mask_preds_y``, L tensors (N, S_l, h_l, w_l) of logits, channel j of X belonging to grid
    column j and channel i of Y to grid row i, level 0 at stride 4; and ``cls_preds``).

    :meth:`process_prepared` takes ``mask_probs_x`` and ``mask_probs_y``: L tensors
    (N, S_l, H4, W4) of probabilities. Constructor arguments and the call:
    :class:`~.processor.PostProcessor`.
    """

    def candidate_masks(self, outputs: Any, candidates: Candidates) -> DecoupledMasks:
        return self._masks(outputs.mask_preds_x, outputs.mask_preds_y, candidates, activate=True)

    def prepared_masks(self, candidates: Candidates, *, mask_probs_x: Sequence[Tensor],
                       mask_probs_y: Sequence[Tensor]) -> DecoupledMasks:
        return self._masks(mask_probs_x, mask_probs_y, candidates, activate=False)

    def _masks(self, levels_x: Sequence[Tensor], levels_y: Sequence[Tensor],
               candidates: Candidates, *, activate: bool) -> DecoupledMasks:
        kind = "preds" if activate else "probs"
        check_levels(levels_x, f"mask_{kind}_x", self.num_grids, "grid")
        check_levels(levels_y, f"mask_{kind}_y", self.num_grids, "grid")
        return DecoupledMasks(levels_x, levels_y, candidates, num_grids=self.num_grids,
                              activate=activate)
