"""Decoupled SOLO's candidate scoring as one fused op on every backend: area and maskness sums of
the candidates' masks without storing the masks.

At inference Decoupled SOLO (docs/algorithms.md §10.3-10.6) gives candidate k of image n in grid row
i and column j the soft mask s = y_probs[n, i] * x_probs[n, j] (the eval forward's upsampled sigmoid
maps of all levels, concatenated along channels), binarises it (s > mask_thr) and needs only its
area and the sum of s inside it before the top-k. mmdetection materialises every product first (K x
H x W floats, 218 MB per 1,000 candidates at 800 x 1088, docs/algorithms.md §12.9). The fused
backends stream the two rows of each candidate once and keep nothing.

The compiled kernel (``torch.ops.solo_fast.decoupled_mask_scores``, C++ on CPU, CUDA on GPU) and
the Triton kernel (``torch.ops.solo_fast.decoupled_mask_scores_triton``) share one contract:

* x_probs, y_probs (N, C, P) contiguous, one floating dtype; image, row, col (K,) int64;
  threshold a float; check_index (default True): check the index ranges (one device-to-host
  copy) before any kernel reads them;
* -> (area (K,) int64, soft_sum (K,) float64).

Float16 / bfloat16 inputs are multiplied and accumulated in float32; soft_sum is accumulated in
float64 and the chunks of pixels are added in a fixed order. No autograd: inference only.
"""

# N=images, C=channels of the concatenated levels, K=candidates, H, W=mask-map size, P=H*W

from __future__ import annotations

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._checks import FLOATING, INDEX, Arg, Contract
from solo_fast.ops._common import MaskScores, check_number
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import decoupled_mask_scores_reference

__all__ = ["decoupled_mask_scores"]

_INDICES = (
    Arg("image", "K", INDEX, below="N"),
    Arg("row", "K", INDEX, below="C"),
    Arg("col", "K", INDEX, below="C"),
)
_CONTRACT = Contract("decoupled_mask_scores", (
    Arg("x_probs", "N C H W", FLOATING),
    Arg("y_probs", like="x_probs", dtypes=("x_probs",)),
    *_INDICES,
))
# The ops' contract (the compiled op checks the same in csrc/op_checks.h).
_OP_CONTRACT = Contract("decoupled_mask_scores_triton", (
    Arg("x_probs", "N C P", FLOATING),
    Arg("y_probs", like="x_probs", dtypes=("x_probs",)),
    *_INDICES,
))


def decoupled_mask_scores(x_probs: Tensor, y_probs: Tensor, image: Tensor, row: Tensor,
                          col: Tensor, *, threshold: float, backend: str | None = None,
                          check_index: bool = True) -> MaskScores:
    """Area and soft sum of every Decoupled SOLO candidate's mask, fused: no (K, H, W) temporary.

    Args:
        x_probs: (N, C, H, W) probabilities of the X branch (sigmoid, upsampled to the level-0
            mask map, levels concatenated along C); float16, bfloat16 (both multiplied in
            float32), float32 or float64.
        y_probs: (N, C, H, W) probabilities of the Y branch; x_probs' dtype and device.
        image: (K,) int64 in [0, N), the image of each candidate, in any order.
        row: (K,) int64 in [0, C), the Y channel of each candidate (level offset + grid row).
        col: (K,) int64 in [0, C), the X channel of each candidate (level offset + grid column).
            Candidates may share channels and whole cells.
        threshold: the mask threshold (``mask_thr``, 0.5): a pixel belongs to candidate k's mask
            when ``y_probs[n, i] * x_probs[n, j] > threshold``, compared in the inputs' dtype.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None takes
            ``SOLO_FAST_BACKEND`` or the fastest tested backend for x_probs' device.
        check_index: check that image lies in [0, N) and row, col in [0, C): one device-to-host
            copy of the six bounds (a synchronisation on a GPU), by whichever reads the indices
            (here for the reference, else the compiled or Triton op). False: the caller built
            them in range (the post-processing does); out-of-range indices read out of bounds.

    Returns:
        A :class:`~solo_fast.ops.MaskScores` on x_probs' device: area (K,) int64, the number of
        mask pixels; soft_sum (K,) float64, the sum of the soft mask over them; packed None.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an index is out of range.
    """
    tensors = {"x_probs": x_probs, "y_probs": y_probs, "image": image, "row": row, "col": col}
    sizes = _CONTRACT.check(**tensors)
    threshold = check_number("decoupled_mask_scores", "threshold", threshold)
    chosen = choose_backend("decoupled_mask_scores", x_probs.device, backend)
    if chosen == "reference":
        if check_index:
            _CONTRACT.check_ranges(sizes, **tensors)
        return MaskScores(*decoupled_mask_scores_reference(x_probs, y_probs, image, row, col,
                                                           threshold=threshold))
    n, c, h, w = x_probs.shape
    x3d = x_probs.reshape(n, c, h * w).contiguous()  # (N, C, P)
    y3d = y_probs.reshape(n, c, h * w).contiguous()  # (N, C, P)
    scores = (torch.ops.solo_fast.decoupled_mask_scores_triton if chosen == "triton"
              else torch.ops.solo_fast.decoupled_mask_scores)
    return MaskScores(*scores(x3d, y3d, image.contiguous(), row.contiguous(), col.contiguous(),
                              threshold, bool(check_index)))


# ----------------------------------------------------------------------------------------------
# Registration: the Triton op (the compiled one is declared in csrc/solo_fast.cpp) and the fake
# kernels of both. No autograd: inference only.

def _fake(x_probs: Tensor, y_probs: Tensor, image: Tensor, row: Tensor, col: Tensor,
          threshold: float, check_index: bool = True):
    num = image.shape[0]
    return (x_probs.new_empty((num,), dtype=torch.int64),
            x_probs.new_empty((num,), dtype=torch.float64))


@torch.library.custom_op("solo_fast::decoupled_mask_scores_triton", mutates_args=())
def _decoupled_mask_scores_triton(x_probs: Tensor, y_probs: Tensor, image: Tensor, row: Tensor,
                                  col: Tensor, threshold: float, check_index: bool = True
                                  ) -> tuple[Tensor, Tensor]:
    # Lazy: Triton is optional, and imported only when its backend runs.
    from solo_fast.kernels import decoupled_mask_scores as triton_kernels

    _OP_CONTRACT.check(ranges=check_index, x_probs=x_probs, y_probs=y_probs, image=image, row=row,
                       col=col)
    return triton_kernels.decoupled_mask_scores_triton(x_probs, y_probs, image, row, col,
                                                       threshold)


_decoupled_mask_scores_triton.register_fake(_fake)

if has_ops():
    torch.library.register_fake("solo_fast::decoupled_mask_scores", _fake)
