"""Decoupled SOLO's candidate scoring as one fused op on every backend: area and maskness sums of
the candidates' masks without storing the masks.

At inference Decoupled SOLO (SPEC §9 steps 3-6) gives candidate k of image n in grid row i and
column j the soft mask s = y_probs[n, i] * x_probs[n, j] (the eval forward's upsampled sigmoid
maps of all levels, concatenated along channels), binarises it (s > mask_thr) and needs only its
area and the sum of s inside it before the top-k. mmdetection materialises every product first
(K x H x W floats, 218 MB per 1,000 candidates at 800 x 1088, SPEC §15.3). The fused backends
stream the two rows of each candidate once and keep nothing.

The compiled kernel (``torch.ops.solo_fast.decoupled_mask_scores``, C++ on CPU, CUDA on GPU) and
the Triton kernel (``torch.ops.solo_fast.decoupled_mask_scores_triton``) share one contract:

* x_probs, y_probs (N, C, P) contiguous, one floating dtype; image, row, col (K,) int64;
  threshold a float;
* -> (area (K,) int64, soft_sum (K,) float64).

Float16 / bfloat16 inputs are multiplied and accumulated in float32; soft_sum is accumulated in
float64 and the chunks of pixels are added in a fixed order. No autograd: inference only.
"""

# N=images, C=channels of the concatenated levels, K=candidates, H, W=mask-map size, P=H*W

from __future__ import annotations

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._extension import has_ops
from solo_fast.ops.dynamic_mask_scores import _check_threshold
from solo_fast.ops.reference import decoupled_mask_scores_reference

__all__ = ["decoupled_mask_scores"]

_PROB_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def decoupled_mask_scores(x_probs: Tensor, y_probs: Tensor, image: Tensor, row: Tensor,
                          col: Tensor, *, threshold: float,
                          backend: str | None = None) -> tuple[Tensor, Tensor]:
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

    Returns:
        ``(area, soft_sum)`` on x_probs' device: area (K,) int64, the number of mask pixels;
        soft_sum (K,) float64, the sum of the soft mask over them.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an index is out of range.
    """
    _check_inputs(x_probs, y_probs, image, row, col, threshold)
    threshold = float(threshold)
    chosen = choose_backend("decoupled_mask_scores", x_probs.device, backend)
    if chosen == "reference":
        return decoupled_mask_scores_reference(x_probs, y_probs, image, row, col,
                                               threshold=threshold)
    n, c, h, w = x_probs.shape
    x3d = x_probs.reshape(n, c, h * w).contiguous()  # (N, C, P)
    y3d = y_probs.reshape(n, c, h * w).contiguous()  # (N, C, P)
    op = (torch.ops.solo_fast.decoupled_mask_scores_triton if chosen == "triton"
          else torch.ops.solo_fast.decoupled_mask_scores)
    return op(x3d, y3d, image.contiguous(), row.contiguous(), col.contiguous(), threshold)


def _check_inputs(x_probs: object, y_probs: object, image: object, row: object, col: object,
                  threshold: object) -> None:
    op = "decoupled_mask_scores"
    named = {"x_probs": x_probs, "y_probs": y_probs, "image": image, "row": row, "col": col}
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x_probs.dim() != 4:
        raise ValueError(f"{op}: x_probs must be (N, C, H, W), got shape "
                         f"{tuple(x_probs.shape)} ({x_probs.dim()}-D)")
    if x_probs.dtype not in _PROB_DTYPES:
        raise TypeError(f"{op}: x_probs must be float16, bfloat16, float32 or float64, "
                        f"got {x_probs.dtype}")
    if y_probs.shape != x_probs.shape:
        raise ValueError(f"{op}: y_probs must have x_probs' shape (N, C, H, W) = "
                         f"{tuple(x_probs.shape)}, got {tuple(y_probs.shape)}")
    if y_probs.dtype != x_probs.dtype:
        raise TypeError(f"{op}: y_probs must have x_probs' dtype {x_probs.dtype}, "
                        f"got {y_probs.dtype}")
    if image.dim() != 1:
        raise ValueError(f"{op}: image must be 1-D (K,), got shape {tuple(image.shape)}")
    num = image.shape[0]
    for name in ("image", "row", "col"):
        index = named[name]
        if index.shape != (num,):
            raise ValueError(f"{op}: {name} must have shape (K,) = ({num},) as image, "
                             f"got {tuple(index.shape)}")
        if index.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {index.dtype}")
    for name, value in named.items():
        if value.device != x_probs.device:
            raise ValueError(f"{op}: {name} is on {value.device} but x_probs is on "
                             f"{x_probs.device}; all must be on the same device")
    _check_threshold(op, threshold)
    # The ranges are data: checked eagerly (one device-to-host copy), not while torch.compile
    # traces (the kernels check them again), nor on meta tensors, which hold no values.
    if num == 0 or x_probs.device.type == "meta" or torch.compiler.is_compiling():
        return
    n, c = x_probs.shape[:2]
    bounds = torch.stack([image.min(), image.max(), row.min(), row.max(), col.min(),
                          col.max()]).tolist()
    limits = (("image", n, "N"), ("row", c, "C"), ("col", c, "C"))
    for (name, limit, letter), low, high in zip(limits, bounds[0::2], bounds[1::2]):
        if low < 0 or high >= limit:
            raise ValueError(f"{op}: {name} must lie in [0, {letter}) = [0, {limit}), got values "
                             f"in [{low}, {high}]")


# ----------------------------------------------------------------------------------------------
# Registration: fake kernels (shapes only, for torch.compile and meta tensors), the same for the
# compiled op and the Triton op. No autograd.

def _fake(x_probs: Tensor, y_probs: Tensor, image: Tensor, row: Tensor, col: Tensor,
          threshold: float):
    num = image.shape[0]
    return (x_probs.new_empty((num,), dtype=torch.int64),
            x_probs.new_empty((num,), dtype=torch.float64))


@torch.library.custom_op("solo_fast::decoupled_mask_scores_triton", mutates_args=())
def _decoupled_mask_scores_triton(x_probs: Tensor, y_probs: Tensor, image: Tensor, row: Tensor,
                                  col: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import decoupled_mask_scores as triton_kernels

    return triton_kernels.decoupled_mask_scores(x_probs, y_probs, image, row, col, threshold)


_decoupled_mask_scores_triton.register_fake(_fake)

if has_ops():
    torch.library.register_fake("solo_fast::decoupled_mask_scores", _fake)
