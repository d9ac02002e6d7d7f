"""SOLOv2's candidate scoring as one fused op on every backend: area and maskness sums of the
candidates' masks without storing the masks (or, on request, storing them as bits).

At inference SOLOv2 (SPEC §9 steps 3-6) turns each candidate's dynamic kernel into a soft mask
s = sigmoid(kernel . mask_feats) over the image's H x W mask map, binarises it (s > mask_thr) and
needs only two numbers per candidate before the top-k: the binary mask's area and the sum of s
inside it (maskness = soft_sum / area). mmdetection materialises all K soft masks first (K x H x W
floats, 218 MB per 1,000 candidates at 800 x 1088, SPEC §15.4). The fused backends compute the
logits tile by tile (a GEMM per tile of pixels) and reduce them while the tile is in cache.

The compiled kernel (``torch.ops.solo_fast.dynamic_mask_scores``, C++ on CPU, CUDA on GPU) and the
Triton kernel (``torch.ops.solo_fast.dynamic_mask_scores_triton``) share one contract:

* kernels (K, E), mask_feats (N, E, P) contiguous, one floating dtype; image (K,) int64 in
  [0, N); threshold a float; pack_masks a bool;
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

import math

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import dynamic_mask_scores_reference

__all__ = ["dynamic_mask_scores"]

_FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dynamic_mask_scores(kernels: Tensor, mask_feats: Tensor, image: Tensor, *,
                        threshold: float, backend: str | None = None, pack_masks: bool = False
                        ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
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

    Returns:
        ``(area, soft_sum)`` on mask_feats' device: area (K,) int64, the number of mask pixels;
        soft_sum (K,) float64, the sum of the soft mask over them. maskness = soft_sum / area.
        With ``pack_masks=True``, ``(area, soft_sum, packed)``: packed (K, Wd) int64,
        Wd = ceil(H * W / 64), candidate k's mask in row k in ``matrix_nms_pack``'s layout (bit b
        of word w is pixel 64 w + b of the row-major H x W mask; tail bits zero), with exactly
        area[k] bits set; ``PackedMasks(packed, H, W)`` passes them to matrix NMS.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an image index is out of range.
    """
    _check_inputs(kernels, mask_feats, image, threshold, pack_masks)
    threshold = float(threshold)
    chosen = choose_backend("dynamic_mask_scores", mask_feats.device, backend)
    if chosen == "reference":
        return dynamic_mask_scores_reference(kernels, mask_feats, image, threshold=threshold,
                                             pack_masks=pack_masks)
    n, e, h, w = mask_feats.shape
    feats3d = mask_feats.reshape(n, e, h * w).contiguous()  # (N, E, P)
    op = (torch.ops.solo_fast.dynamic_mask_scores_triton if chosen == "triton"
          else torch.ops.solo_fast.dynamic_mask_scores)
    area, soft_sum, packed = op(kernels.contiguous(), feats3d, image.contiguous(), threshold,
                                pack_masks)
    return (area, soft_sum, packed) if pack_masks else (area, soft_sum)


def _check_threshold(op: str, threshold: object) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold):
        raise ValueError(f"{op}: threshold must be a finite number, got {threshold!r}")


def _check_inputs(kernels: object, mask_feats: object, image: object, threshold: object,
                  pack_masks: object) -> None:
    op = "dynamic_mask_scores"
    if not isinstance(pack_masks, bool):
        raise TypeError(f"{op}: pack_masks must be a bool, got {type(pack_masks).__name__}")
    named = {"kernels": kernels, "mask_feats": mask_feats, "image": image}
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if mask_feats.dim() != 4:
        raise ValueError(f"{op}: mask_feats must be (N, E, H, W), got shape "
                         f"{tuple(mask_feats.shape)} ({mask_feats.dim()}-D)")
    if mask_feats.dtype not in _FEATURE_DTYPES:
        raise TypeError(f"{op}: mask_feats must be float16, bfloat16, float32 or float64, "
                        f"got {mask_feats.dtype}")
    channels = mask_feats.shape[1]
    if kernels.dim() != 2 or kernels.shape[1] != channels:
        raise ValueError(f"{op}: kernels must be (K, E) with E = {channels} as mask_feats, got "
                         f"shape {tuple(kernels.shape)}")
    if kernels.dtype != mask_feats.dtype:
        raise TypeError(f"{op}: kernels must have mask_feats' dtype {mask_feats.dtype}, "
                        f"got {kernels.dtype}")
    num = kernels.shape[0]
    if image.shape != (num,):
        raise ValueError(f"{op}: image must have shape (K,) = ({num},), one entry per kernel, "
                         f"got {tuple(image.shape)}")
    if image.dtype != torch.int64:
        raise TypeError(f"{op}: image must be int64, got {image.dtype}")
    for name, value in named.items():
        if value.device != mask_feats.device:
            raise ValueError(f"{op}: {name} is on {value.device} but mask_feats is on "
                             f"{mask_feats.device}; all must be on the same device")
    _check_threshold(op, threshold)
    # The range is data: checked eagerly (one device-to-host copy), not while torch.compile
    # traces (the kernels check it again), nor on meta tensors, which hold no values.
    if num == 0 or mask_feats.device.type == "meta" or torch.compiler.is_compiling():
        return
    low, high = torch.stack([image.min(), image.max()]).tolist()
    images = mask_feats.shape[0]
    if low < 0 or high >= images:
        raise ValueError(f"{op}: image must lie in [0, N) = [0, {images}), got values in "
                         f"[{low}, {high}]")


# ----------------------------------------------------------------------------------------------
# Registration: fake kernels (shapes only, for torch.compile and meta tensors), the same for the
# compiled op and the Triton op. No autograd: the outputs are counts and thresholded sums.

def _fake(kernels: Tensor, mask_feats: Tensor, image: Tensor, threshold: float,
          pack_masks: bool):
    num = kernels.shape[0]
    words = (mask_feats.shape[2] + 63) // 64
    return (mask_feats.new_empty((num,), dtype=torch.int64),
            mask_feats.new_empty((num,), dtype=torch.float64),
            mask_feats.new_empty((num if pack_masks else 0, words), dtype=torch.int64))


@torch.library.custom_op("solo_fast::dynamic_mask_scores_triton", mutates_args=())
def _dynamic_mask_scores_triton(kernels: Tensor, mask_feats: Tensor, image: Tensor,
                                threshold: float, pack_masks: bool
                                ) -> tuple[Tensor, Tensor, Tensor]:
    from solo_fast.kernels import dynamic_mask_scores as triton_kernels

    return triton_kernels.dynamic_mask_scores(kernels, mask_feats, image, threshold, pack_masks)


_dynamic_mask_scores_triton.register_fake(_fake)

if has_ops():
    torch.library.register_fake("solo_fast::dynamic_mask_scores", _fake)
