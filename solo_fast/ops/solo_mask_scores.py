"""Vanilla SOLO's candidate scoring as one fused op on every backend: area and maskness sums of the
candidates' masks without storing the masks.

At inference SOLO (SPEC §9 steps 3-6) gives candidate k, grid cell q of level l in image n, the
soft mask s = bilinear_resize(sigmoid(mask_preds_l[n, q]), (H, W)) at the level-0 mask-map size,
binarises it (s > mask_thr) and needs only its area and the sum of s inside it before the top-k.
mmdetection resizes every channel of every level first (3872 x H x W floats, 842 MB at
800 x 1088, SPEC §15.2). The fused backends read each candidate's small source map once and keep
nothing of size K x H x W.

The compiled kernel (``torch.ops.solo_fast.solo_mask_scores``, C++ on CPU, CUDA on GPU) and the
Triton kernel (``torch.ops.solo_fast.solo_mask_scores_triton``) share one contract:

* mask_preds (N, Q, h, w) contiguous, one floating dtype, one level; image, channel (K,) int64;
  out_height, out_width; threshold a float; logits a bool;
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
from solo_fast.ops._extension import has_ops
from solo_fast.ops.dynamic_mask_scores import _check_threshold
from solo_fast.ops.reference import solo_mask_scores_reference

__all__ = ["solo_mask_scores"]

_PROB_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_MAX = 2**31 - 1  # the kernels index the maps with int


def solo_mask_scores(mask_preds: Tensor, image: Tensor, channel: Tensor, *,
                     size: tuple[int, int], threshold: float, logits: bool = True,
                     backend: str | None = None) -> tuple[Tensor, Tensor]:
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

    Returns:
        ``(area, soft_sum)`` on mask_preds' device: area (K,) int64, the number of mask pixels;
        soft_sum (K,) float64, the sum of the soft mask over them.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an index is out of range.
    """
    height, width = _check_inputs(mask_preds, image, channel, size, threshold, logits)
    threshold = float(threshold)
    chosen = choose_backend("solo_mask_scores", mask_preds.device, backend)
    if chosen == "reference":
        return solo_mask_scores_reference(mask_preds, image, channel, size=(height, width),
                                          threshold=threshold, logits=logits)
    op = (torch.ops.solo_fast.solo_mask_scores_triton if chosen == "triton"
          else torch.ops.solo_fast.solo_mask_scores)
    return op(mask_preds.contiguous(), image.contiguous(), channel.contiguous(), height, width,
              threshold, logits)


def _check_inputs(mask_preds: object, image: object, channel: object, size: object,
                  threshold: object, logits: object) -> tuple[int, int]:
    op = "solo_mask_scores"
    named = {"mask_preds": mask_preds, "image": image, "channel": channel}
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if mask_preds.dim() != 4:
        raise ValueError(f"{op}: mask_preds must be (N, Q, h, w), got shape "
                         f"{tuple(mask_preds.shape)} ({mask_preds.dim()}-D)")
    if mask_preds.dtype not in _PROB_DTYPES:
        raise TypeError(f"{op}: mask_preds must be float16, bfloat16, float32 or float64, "
                        f"got {mask_preds.dtype}")
    if not (1 <= min(mask_preds.shape[2:]) and max(mask_preds.shape[2:]) <= _INT_MAX):
        raise ValueError(f"{op}: mask_preds' maps (h, w) must be at least 1 x 1 (and below "
                         f"2^31 a side), got shape {tuple(mask_preds.shape)}")
    if image.dim() != 1:
        raise ValueError(f"{op}: image must be 1-D (K,), got shape {tuple(image.shape)}")
    num = image.shape[0]
    for name in ("image", "channel"):
        index = named[name]
        if index.shape != (num,):
            raise ValueError(f"{op}: {name} must have shape (K,) = ({num},) as image, "
                             f"got {tuple(index.shape)}")
        if index.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {index.dtype}")
        if index.device != mask_preds.device:
            raise ValueError(f"{op}: {name} is on {index.device} but mask_preds is on "
                             f"{mask_preds.device}; all must be on the same device")
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
            or not all(1 <= v <= _INT_MAX for v in size)):
        raise ValueError(f"{op}: size must be a pair of positive ints (H, W), got {size!r}")
    if not isinstance(logits, bool):
        raise TypeError(f"{op}: logits must be a bool, got {type(logits).__name__}")
    _check_threshold(op, threshold)
    # The ranges are data: checked eagerly (one device-to-host copy), not while torch.compile
    # traces (the kernels check them again), nor on meta tensors, which hold no values.
    if num > 0 and mask_preds.device.type != "meta" and not torch.compiler.is_compiling():
        n, q = mask_preds.shape[:2]
        bounds = torch.stack([image.min(), image.max(), channel.min(), channel.max()]).tolist()
        for (name, limit, letter), low, high in zip((("image", n, "N"), ("channel", q, "Q")),
                                                    bounds[0::2], bounds[1::2]):
            if low < 0 or high >= limit:
                raise ValueError(f"{op}: {name} must lie in [0, {letter}) = [0, {limit}), got "
                                 f"values in [{low}, {high}]")
    return int(size[0]), int(size[1])


# ----------------------------------------------------------------------------------------------
# Registration: fake kernels (shapes only, for torch.compile and meta tensors), the same for the
# compiled op and the Triton op. No autograd.

def _fake(mask_preds: Tensor, image: Tensor, channel: Tensor, out_height: int, out_width: int,
          threshold: float, logits: bool):
    num = image.shape[0]
    return (mask_preds.new_empty((num,), dtype=torch.int64),
            mask_preds.new_empty((num,), dtype=torch.float64))


@torch.library.custom_op("solo_fast::solo_mask_scores_triton", mutates_args=())
def _solo_mask_scores_triton(mask_preds: Tensor, image: Tensor, channel: Tensor,
                             out_height: int, out_width: int, threshold: float,
                             logits: bool) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import solo_mask_scores as triton_kernels

    return triton_kernels.solo_mask_scores(mask_preds, image, channel, out_height, out_width,
                                           threshold, logits)


_solo_mask_scores_triton.register_fake(_fake)

if has_ops():
    torch.library.register_fake("solo_fast::solo_mask_scores", _fake)
