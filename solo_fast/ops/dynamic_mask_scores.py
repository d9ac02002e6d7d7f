"""SOLOv2's candidate scoring as one fused op on every backend: area and maskness sums of the
candidates' masks without storing the masks (or, on request, storing them as bits).

At inference SOLOv2 (docs/algorithms.md §10.3-10.6) turns each candidate's dynamic kernel into a
soft mask s = sigmoid(kernel . mask_feats) over the image's H x W mask map, binarises it
(s > mask_thr) and needs only two numbers per candidate before the top-k: the binary mask's area and
the sum of s inside it (maskness = soft_sum / area). mmdetection materialises all K soft masks first
(K x H x W floats, 218 MB per 1,000 candidates at 800 x 1088, docs/algorithms.md §12.9). The fused
backends compute the logits tile by tile (a GEMM per tile of pixels) and reduce them while the tile
is in cache.

The compiled kernel (``torch.ops.solo_fast.dynamic_mask_scores``, C++ on CPU, CUDA on GPU) and the
Triton kernel (``torch.ops.solo_fast.dynamic_mask_scores_triton``) share one contract:

* kernels (K, E), mask_feats (N, E, P) contiguous, one floating dtype; image (K,) int64 in
  [0, N); threshold a float; pack_masks a bool; check_index (default True): check image's range
  (one device-to-host copy) before any kernel reads it;
* -> (area (K,) int64, soft_sum (K,) float64, packed): with pack_masks, packed is (K, Wd) int64,
  the binary masks in the layout of ``matrix_nms_pack`` (bit b of word w is pixel 64 w + b of the
  row-major flattened mask, tail bits zero), row k for candidate k in the input order, a bit set
  exactly where the pixel counts into area, so popcount(packed[k]) == area[k]; without it an
  empty (0, Wd) int64 tensor, and nothing is written.

The packed masks are what matrix NMS needs (:class:`~solo_fast.ops.PackedMasks`): the epilogue
writes them while the logits are in cache (P / 8 bytes a candidate, 6.8 MB for 1,000 candidates at
200 x 272), so the candidates that reach matrix NMS need no second GEMM for their binary masks.

Float16 / bfloat16 inputs are multiplied and accumulated in float32; soft_sum is accumulated in
float64 per tile of pixels and the tiles are added in a fixed order, so results do not depend on
the thread count. There is no autograd: scoring is inference only.
"""

# N=images, E=mask-feature channels, K=candidates, H, W=mask-map size, P=H*W pixels,
# Wd=ceil(P / 64) words of a packed mask

from __future__ import annotations

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._checks import FLOATING, INDEX, Arg, Contract
from solo_fast.ops._common import MaskScores, check_bool, check_number
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import dynamic_mask_scores_reference

__all__ = ["dynamic_mask_scores"]

_CONTRACT = Contract("dynamic_mask_scores", (
    Arg("mask_feats", "N E H W", FLOATING),
    Arg("kernels", "K E", ("mask_feats",)),
    Arg("image", "K", INDEX, below="N"),
))
# The ops' contract (the compiled op checks the same in csrc/op_checks.h).
_OP_CONTRACT = Contract("dynamic_mask_scores_triton", (
    Arg("mask_feats", "N E P", FLOATING),
    Arg("kernels", "K E", ("mask_feats",)),
    Arg("image", "K", INDEX, below="N"),
))


def dynamic_mask_scores(kernels: Tensor, mask_feats: Tensor, image: Tensor, *,
                        threshold: float, backend: str | None = None, pack_masks: bool = False,
                        check_index: bool = True) -> MaskScores:
    """Area and soft sum of every SOLOv2 candidate's mask, fused: no (K, H, W) temporary.

    Args:
        kernels: (K, E) dynamic kernels of the candidates (rows of the kernel branch's output);
            float16, bfloat16 (both accumulated in float32), float32 or float64.
        mask_feats: (N, E, H, W) the mask-feature maps of the N images; kernels' dtype and device.
        image: (K,) int64 in [0, N), the image of each candidate, in any order; images may have
            no candidate.
        threshold: the mask threshold (``mask_thr``, 0.5 in every config): a pixel belongs to
            candidate k's mask when ``sigmoid(kernels[k] . mask_feats[image[k]]) > threshold``,
            compared in the inputs' dtype as torch compares.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None takes
            ``SOLO_FAST_BACKEND`` or the fastest tested backend for mask_feats' device.
        pack_masks: Also return every candidate's binary mask, bit-packed.
        check_index: check that image lies in [0, N). The check reads its minimum and maximum
            (one device-to-host copy, which the CUDA kernel shares with its grid size); it runs
            in the backend that reads the indices (this function for the reference, the compiled
            or Triton op otherwise). Pass False only for indices built in range (as the
            post-processing builds them): out-of-range indices then read out of bounds.

    Returns:
        A :class:`~solo_fast.ops.MaskScores` on mask_feats' device: area (K,) int64, the number of
        mask pixels; soft_sum (K,) float64, the sum of the soft mask over them (maskness =
        soft_sum / area); packed: with ``pack_masks=True``, (K, Wd) int64, Wd = ceil(H * W / 64),
        candidate k's mask in row k in ``matrix_nms_pack``'s layout (bit b of word w is pixel
        64 w + b of the row-major H x W mask; tail bits zero), with exactly area[k] bits set
        (``PackedMasks(packed, H, W)`` passes them to matrix NMS); else None.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an image index is out of range.
    """
    op = "dynamic_mask_scores"
    check_bool(op, "pack_masks", pack_masks)
    tensors = {"kernels": kernels, "mask_feats": mask_feats, "image": image}
    sizes = _CONTRACT.check(**tensors)
    threshold = check_number(op, "threshold", threshold)
    chosen = choose_backend(op, mask_feats.device, backend)
    if chosen == "reference":
        if check_index:
            _CONTRACT.check_ranges(sizes, **tensors)
        area, soft_sum, *packed = dynamic_mask_scores_reference(
            kernels, mask_feats, image, threshold=threshold, pack_masks=pack_masks)
        return MaskScores(area, soft_sum, packed[0] if pack_masks else None)
    n, e, h, w = mask_feats.shape
    feats3d = mask_feats.reshape(n, e, h * w).contiguous()  # (N, E, P)
    scores = (torch.ops.solo_fast.dynamic_mask_scores_triton if chosen == "triton"
              else torch.ops.solo_fast.dynamic_mask_scores)
    area, soft_sum, packed = scores(kernels.contiguous(), feats3d, image.contiguous(), threshold,
                                    pack_masks, bool(check_index))
    return MaskScores(area, soft_sum, packed if pack_masks else None)


# ----------------------------------------------------------------------------------------------
# Registration: the Triton op (the compiled one is declared in csrc/solo_fast.cpp) and the fake
# kernels of both. No autograd: the outputs are counts and thresholded sums.

def _fake(kernels: Tensor, mask_feats: Tensor, image: Tensor, threshold: float,
          pack_masks: bool, check_index: bool = True):
    num = kernels.shape[0]
    words = (mask_feats.shape[2] + 63) // 64
    return (mask_feats.new_empty((num,), dtype=torch.int64),
            mask_feats.new_empty((num,), dtype=torch.float64),
            mask_feats.new_empty((num if pack_masks else 0, words), dtype=torch.int64))


@torch.library.custom_op("solo_fast::dynamic_mask_scores_triton", mutates_args=())
def _dynamic_mask_scores_triton(kernels: Tensor, mask_feats: Tensor, image: Tensor,
                                threshold: float, pack_masks: bool, check_index: bool = True
                                ) -> tuple[Tensor, Tensor, Tensor]:
    # Lazy: Triton is optional, and imported only when its backend runs.
    from solo_fast.kernels import dynamic_mask_scores as triton_kernels

    _OP_CONTRACT.check(kernels=kernels, mask_feats=mask_feats, image=image)
    # The launcher checks image's range itself, in the copy that reads its grid size.
    return triton_kernels.dynamic_mask_scores_triton(kernels, mask_feats, image, threshold,
                                                     pack_masks, check_index=check_index)


_dynamic_mask_scores_triton.register_fake(_fake)

if has_ops():
    torch.library.register_fake("solo_fast::dynamic_mask_scores", _fake)
