"""Vanilla SOLO's candidate scoring as one fused op on every backend: area and maskness sums of the
candidates' masks without storing the masks.

At inference SOLO (docs/algorithms.md §10.3-10.6) gives candidate k, grid cell q of level l in image
n, the soft mask s = bilinear_resize(sigmoid(mask_preds_l[n, q]), (H, W)) at the level-0 mask-map
size, binarises it (s > mask_thr) and needs only its area and the sum of s inside it before the
top-k. mmdetection resizes every channel of every level first (3872 x H x W floats, 842 MB at 800 x
1088, docs/algorithms.md §12.9). The fused backends read each candidate's small source map once and
keep nothing of size K x H x W.

The compiled kernel (``torch.ops.solo_fast.solo_mask_scores``, C++ on CPU, CUDA on GPU) and the
Triton kernel (``torch.ops.solo_fast.solo_mask_scores_triton``) share one contract:

* mask_preds (N, Q, h, w) contiguous, one floating dtype, one level; image, channel (K,) int64;
  out_height, out_width; threshold a float; logits a bool; check_index (default True): check
  the index ranges (one device-to-host copy) before any kernel reads them;
* -> (area (K,) int64, soft_sum (K,) float64).

The resize reproduces torch's CPU arithmetic bit for bit (``csrc/solo_mask_scores.h``), except
where torch itself switches kernels (H + W <= 128: an ulp apart). Float16 / bfloat16 inputs are
interpolated in float32 and rounded back; soft_sum is accumulated in float64, row by row in a
fixed order. No autograd: inference only.
"""

# N=images, Q=channels (grid cells) of the level, K=candidates, h, w=source maps, H, W=output size

from __future__ import annotations

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._checks import FLOATING, INDEX, Arg, Contract
from solo_fast.ops._common import MaskScores, check_bool, check_number
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import solo_mask_scores_reference

__all__ = ["solo_mask_scores"]

_INT_MAX = 2**31 - 1  # the kernels index the maps with int
# The public function's contract and the ops' (the compiled op checks the same in
# csrc/op_checks.h): the same tensors.
_CONTRACT = Contract("solo_mask_scores", (
    Arg("mask_preds", "N Q h w", FLOATING),
    Arg("image", "K", INDEX, below="N"),
    Arg("channel", "K", INDEX, below="Q"),
))
_OP_CONTRACT = Contract("solo_mask_scores_triton", _CONTRACT.args)


def solo_mask_scores(mask_preds: Tensor, image: Tensor, channel: Tensor, *,
                     size: tuple[int, int], threshold: float, logits: bool = True,
                     backend: str | None = None, check_index: bool = True) -> MaskScores:
    """Area and soft sum of every SOLO candidate's mask, fused: no (K, H, W) temporary.

    Args:
        mask_preds: (N, Q, h, w) mask logits (or probabilities, ``logits=False``) of one level;
            float16, bfloat16 (both interpolated in float32), float32 or float64.
        image: (K,) int64 in [0, N), the image of each candidate, in any order.
        channel: (K,) int64 in [0, Q), the channel (grid cell) of each candidate. Candidates may
            share channels (one cell scored for several classes).
        size: (H, W), the mask-map size the soft masks are resized to (the level-0 size); larger
            or smaller than (h, w), or equal (no resize).
        threshold: the mask threshold (``mask_thr``, 0.5): a pixel belongs to candidate k's mask
            when its resized probability ``> threshold``, compared in the inputs' dtype.
        logits: mask_preds are logits (sigmoid first, rounded to their dtype, as
            ``mask_preds.sigmoid()``); False: probabilities, resized as given.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None takes
            ``SOLO_FAST_BACKEND`` or the fastest tested backend for mask_preds' device.
        check_index: check that image lies in [0, N) and channel in [0, Q), reading their
            bounds in one device-to-host copy (a synchronisation on a GPU) where they are read:
            in this function for the reference backend, in the compiled or Triton op otherwise.
            Pass False for indices built in range (as the post-processing builds them) to skip
            the copy; out-of-range indices would then read out of bounds.

    Returns:
        A :class:`~solo_fast.ops.MaskScores` on mask_preds' device: area (K,) int64, the number
        of mask pixels; soft_sum (K,) float64, the sum of the soft mask over them; packed None.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an index is out of range.
    """
    op = "solo_mask_scores"
    tensors = {"mask_preds": mask_preds, "image": image, "channel": channel}
    sizes = _CONTRACT.check(**tensors)
    if not (1 <= min(mask_preds.shape[2:]) and max(mask_preds.shape[2:]) <= _INT_MAX):
        raise ValueError(f"{op}: mask_preds' maps (h, w) must be at least 1 x 1 (and below "
                         f"2^31 a side), got shape {tuple(mask_preds.shape)}")
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
            or not all(1 <= v <= _INT_MAX for v in size)):
        raise ValueError(f"{op}: size must be a pair of positive ints (H, W), got {size!r}")
    check_bool(op, "logits", logits)
    threshold = check_number(op, "threshold", threshold)
    height, width = int(size[0]), int(size[1])
    chosen = choose_backend(op, mask_preds.device, backend)
    if chosen == "reference":
        if check_index:
            _CONTRACT.check_ranges(sizes, **tensors)
        return MaskScores(*solo_mask_scores_reference(mask_preds, image, channel,
                                                      size=(height, width), threshold=threshold,
                                                      logits=logits))
    scores = (torch.ops.solo_fast.solo_mask_scores_triton if chosen == "triton"
              else torch.ops.solo_fast.solo_mask_scores)
    return MaskScores(*scores(mask_preds.contiguous(), image.contiguous(), channel.contiguous(),
                              height, width, threshold, logits, bool(check_index)))


# ----------------------------------------------------------------------------------------------
# Registration: the Triton op (the compiled one is declared in csrc/solo_fast.cpp) and the fake
# kernels of both. No autograd: inference only.

def _fake(mask_preds: Tensor, image: Tensor, channel: Tensor, out_height: int, out_width: int,
          threshold: float, logits: bool, check_index: bool = True):
    num = image.shape[0]
    return (mask_preds.new_empty((num,), dtype=torch.int64),
            mask_preds.new_empty((num,), dtype=torch.float64))


@torch.library.custom_op("solo_fast::solo_mask_scores_triton", mutates_args=())
def _solo_mask_scores_triton(mask_preds: Tensor, image: Tensor, channel: Tensor,
                             out_height: int, out_width: int, threshold: float,
                             logits: bool, check_index: bool = True) -> tuple[Tensor, Tensor]:
    # Lazy: Triton is optional, and imported only when its backend runs.
    from solo_fast.kernels import solo_mask_scores as triton_kernels

    _OP_CONTRACT.check(ranges=check_index, mask_preds=mask_preds, image=image, channel=channel)
    return triton_kernels.solo_mask_scores_triton(mask_preds, image, channel, out_height,
                                                  out_width, threshold, logits)


_solo_mask_scores_triton.register_fake(_fake)

if has_ops():
    torch.library.register_fake("solo_fast::solo_mask_scores", _fake)
