"""SOLOv2's post-processing: dynamic 1x1 kernels applied to the mask features
(docs/algorithms.md §10).

A candidate's soft mask is sigmoid(kernel . mask_feats), computed for the candidates' kernels
only: on the reference path as one 1x1 convolution per image (mmdetection's operation), on the
fused path scored by :func:`~solo_fast.ops.dynamic_mask_scores` (which also packs the binary
masks for matrix NMS) and built as GEMMs for the kept few.
"""

# N=images, L=levels, S=grid side of a level, K=candidates, K_l=candidates of level l,
# E=mask-feature channels, H4, W4=the mask features' size

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from solo_fast import ops
from solo_fast.postprocess.common import CandidateMasks, Candidates, check_levels
from solo_fast.postprocess.processor import PostProcessor

__all__ = ["DynamicMasks", "SOLOv2PostProcessor"]


class DynamicMasks(CandidateMasks):
    """The candidates' soft masks sigmoid(kernels[k] . mask_feats[image[k]]).

    Args:
        kernel_preds: L tensors (N, E, S_l, S_l), the dynamic kernels of every cell.
        mask_feats: (N, E, H4, W4).
        candidates: The batch's candidates.
    """

    def __init__(self, kernel_preds: Sequence[Tensor], mask_feats: Tensor,
                 candidates: Candidates) -> None:
        super().__init__(size=mask_feats.shape[-2:], num=len(candidates.image),
                         device=mask_feats.device)
        self.mask_feats = mask_feats
        self.image = candidates.image
        self.kernels = mask_feats.new_empty((self.num, mask_feats.shape[1]))  # (K, E)
        for level, level_kernels in enumerate(kernel_preds):
            index = (candidates.level == level).nonzero().squeeze(1)  # (K_l,)
            flat = level_kernels.flatten(2)  # (N, E, S*S)
            self.kernels[index] = flat[candidates.image[index], :, candidates.local[index]]

    def scores(self, threshold: float, backend: str | None) -> ops.MaskScores:
        # the binary masks come with the scores: matrix NMS takes them packed as they are; the
        # candidates' images come from select_candidates, in range by construction
        return ops.dynamic_mask_scores(self.kernels, self.mask_feats, self.image,
                                       threshold=threshold, backend=backend, pack_masks=True,
                                       check_index=False)

    def soft(self, index: Tensor) -> Tensor:
        out = self.mask_feats.new_empty((len(index), *self.size))  # (k, H4, W4)
        images = self.image[index]
        for n in torch.unique(images).tolist():  # the images of a chunk: usually one
            members = (images == n).nonzero().squeeze(1)
            # a GEMM, not the reference's 1x1 convolution: oneDNN builds a convolution per
            # output-channel count, ~0.1 s each, and chunks have many counts
            logits = self.kernels[index[members]] @ self.mask_feats[n].flatten(1)  # (k_n, H4*W4)
            out[members] = logits.sigmoid().view(-1, *self.size)
        return out

    def reference_soft(self) -> Tensor:
        soft = self.mask_feats.new_empty((self.num, *self.size))  # (K, H4, W4)
        counts = torch.bincount(self.image, minlength=self.mask_feats.shape[0]).tolist()
        start = 0
        for image, count in enumerate(counts):
            if count:
                weight = self.kernels[start:start + count, :, None, None]  # (K_b, E, 1, 1)
                logits = F.conv2d(self.mask_feats[image:image + 1], weight)  # (1, K_b, H4, W4)
                soft[start:start + count] = logits[0].sigmoid()
            start += count
        return soft


class SOLOv2PostProcessor(PostProcessor):
    """Instances from SOLOv2 outputs (:class:`~solo_fast.models.solov2.SOLOv2Output`:
    ``kernel_preds``, L tensors (N, E, S_l, S_l); ``cls_preds``; ``mask_feats``, (N, E, H4, W4)).

    Constructor arguments and the call: :class:`~.processor.PostProcessor`.
    """

    def candidate_masks(self, outputs: Any, candidates: Candidates) -> DynamicMasks:
        # Only 1x1 dynamic kernels (dynamic_conv_size = 1, every config): E values per cell
        check_levels(outputs.kernel_preds, "kernel_preds", self.num_grids,
                     outputs.mask_feats.shape[1])
        return DynamicMasks(outputs.kernel_preds, outputs.mask_feats, candidates)
