"""SOLOv2's dynamic mask convolution and dice loss as one fused op on every backend.

Positive k of image n has the mask logits z_k = kernels[k] . mask_feats[n] (a 1x1 convolution,
SPEC §6.3) and the dice loss of sigmoid(z_k) against its target (SPEC §8.1). mmdetection stores
every z_k (K x H x W) and several full-size temporaries of the dice loss; the fused backends never
store them: the forward runs the GEMM tile by tile with the sigmoid and the three reductions
a = sum p*t, b = sum p^2, c = sum t^2 on each tile while it is in cache, and the backward
recomputes each tile's logits, turns them into dL/dz and runs the two gradient GEMMs on it
(``csrc/cpu/dynamic_mask_dice_loss.cpp``). One call covers every image and level of a batch:
positives come in any order.

The compiled kernels (``torch.ops.solo_fast.dynamic_mask_dice_loss_forward/backward``, C++ on
CPU, CUDA on GPU) and the Triton kernels (``torch.ops.solo_fast.dynamic_mask_dice_loss_triton_
forward/backward``) share one contract:

* kernels (K, E) and mask_feats (N, E, P) of one floating dtype, contiguous; pos_image (K,)
  int64; target (K, P) uint8 (bool also for the compiled kernels) or kernels' dtype;
* forward -> (loss (K,) in kernels' dtype, sums (K, 3) float64 = [a, b, c] without eps);
* backward(grad_loss (K,), kernels, mask_feats, pos_image, target, sums, eps)
  -> (grad_kernels (K, E), grad_mask_feats (N, E, P)).

Accumulation is float32 (float64 for float64 inputs), with float64 across tiles of pixels. The C++
CPU kernels run float16 and bfloat16 inputs in float32 (one upcast copy of the inputs: MKL has no
fast half GEMM on CPU) and return results in the inputs' dtype.
"""

# N=images, E=mask-feature channels, K=positives, H, W=mask-map size, P=H*W pixels

from __future__ import annotations

import math

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import dynamic_mask_dice_loss_reference

__all__ = ["dynamic_mask_dice_loss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dynamic_mask_dice_loss(kernels: Tensor, mask_feats: Tensor, pos_image: Tensor,
                           target: Tensor, *, eps: float = 1e-3,
                           backend: str | None = None) -> Tensor:
    """Dice loss of SOLOv2's dynamic masks, fused: no (K, H, W) logits are stored.

    Args:
        kernels: (K, E) dynamic kernels, one per positive. float16, bfloat16 (both accumulated in
            float32), float32 or float64.
        mask_feats: (N, E, H, W) mask features; kernels' dtype and device.
        pos_image: (K,) int64 in [0, N), the image of each positive. Any order; an image may
            have no positive and a kernel may repeat.
        target: (K, H, W) bool, uint8 (0/1) or floating; the GT mask of each positive at the
            mask-feature size. Bool and uint8 are read in place; a floating target of another
            dtype than kernels is converted (one copy).
        eps: added to each of the two squared sums (mmdetection: 1e-3).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None takes
            ``SOLO_FAST_BACKEND`` or the fastest tested backend for kernels' device.

    Returns:
        (K,) in kernels' dtype: ``1 - 2a / ((b + eps) + (c + eps))`` of
        ``p_k = sigmoid(kernels[k] . mask_feats[pos_image[k]])`` against ``target[k]``;
        differentiable with respect to kernels and mask_feats (the indices and targets get no
        gradient).

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an index is out of range.
    """
    _check_inputs(kernels, mask_feats, pos_image, target, eps)
    eps = float(eps)
    chosen = choose_backend("dynamic_mask_dice_loss", kernels.device, backend)
    if chosen == "reference":
        return dynamic_mask_dice_loss_reference(kernels, mask_feats, pos_image, target, eps=eps)
    n, e, h, w = mask_feats.shape
    feats3d = mask_feats.reshape(n, e, h * w).contiguous()  # (N, E, P)
    target2d = target.reshape(target.shape[0], h * w).contiguous()  # (K, P)
    if target2d.dtype == torch.bool:
        target2d = target2d.view(torch.uint8)  # same bytes, 0/1
    elif target2d.dtype != torch.uint8 and target2d.dtype != kernels.dtype:
        target2d = target2d.to(kernels.dtype)
    op = (torch.ops.solo_fast.dynamic_mask_dice_loss_triton_forward if chosen == "triton"
          else torch.ops.solo_fast.dynamic_mask_dice_loss_forward)
    loss, _ = op(kernels.contiguous(), feats3d, pos_image.contiguous(), target2d, eps)
    return loss


def _check_inputs(kernels: object, mask_feats: object, pos_image: object, target: object,
                  eps: object) -> None:
    op = "dynamic_mask_dice_loss"
    named = {"kernels": kernels, "mask_feats": mask_feats, "pos_image": pos_image,
             "target": target}
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if kernels.dim() != 2:
        raise ValueError(f"{op}: kernels must be (K, E), got shape {tuple(kernels.shape)} "
                         f"({kernels.dim()}-D)")
    if kernels.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: kernels must be float16, bfloat16, float32 or float64, "
                        f"got {kernels.dtype}")
    num_positives, channels = kernels.shape
    if mask_feats.dim() != 4 or mask_feats.shape[1] != channels:
        raise ValueError(f"{op}: mask_feats must be (N, E, H, W) with E = {channels} (kernels' "
                         f"width), got shape {tuple(mask_feats.shape)}")
    if mask_feats.dtype != kernels.dtype:
        raise TypeError(f"{op}: mask_feats must have kernels' dtype {kernels.dtype}, "
                        f"got {mask_feats.dtype}")
    if pos_image.shape != (num_positives,):
        raise ValueError(f"{op}: pos_image must have shape (K,) = ({num_positives},), one entry "
                         f"per kernel, got {tuple(pos_image.shape)}")
    if pos_image.dtype != torch.int64:
        raise TypeError(f"{op}: pos_image must be int64, got {pos_image.dtype}")
    n, _, h, w = mask_feats.shape
    if target.shape != (num_positives, h, w):
        raise ValueError(f"{op}: target must have shape (K, H, W) = ({num_positives}, {h}, {w}), "
                         f"got {tuple(target.shape)}")
    if not (target.dtype in (torch.bool, torch.uint8) or target.dtype.is_floating_point):
        raise TypeError(f"{op}: target must be bool, uint8 or floating, got {target.dtype}")
    for name, value in named.items():
        if value.device != kernels.device:
            raise ValueError(f"{op}: {name} is on {value.device} but kernels is on "
                             f"{kernels.device}; all must be on the same device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    # The range is data: checked eagerly (one device-to-host copy), not while torch.compile
    # traces (the kernels check it again), nor on meta tensors, which hold no values.
    if num_positives == 0 or kernels.device.type == "meta" or torch.compiler.is_compiling():
        return
    low, high = torch.stack([pos_image.min(), pos_image.max()]).tolist()
    if low < 0 or high >= n:
        raise ValueError(f"{op}: pos_image must lie in [0, N) = [0, {n}), got values in "
                         f"[{low}, {high}]")


# ----------------------------------------------------------------------------------------------
# Registration: fake kernels (shapes only, for torch.compile and meta tensors) and autograd, the
# same for the compiled ops and for the Triton ops.

def _fake_forward(kernels: Tensor, mask_feats: Tensor, pos_image: Tensor, target: Tensor,
                  eps: float):
    num_positives = kernels.shape[0]
    return (kernels.new_empty((num_positives,)),
            kernels.new_empty((num_positives, 3), dtype=torch.float64))


def _fake_backward(grad_loss: Tensor, kernels: Tensor, mask_feats: Tensor, pos_image: Tensor,
                   target: Tensor, sums: Tensor, eps: float):
    return torch.empty_like(kernels), torch.empty_like(mask_feats)


def _setup_context(ctx, inputs, output) -> None:
    kernels, mask_feats, pos_image, target, eps = inputs
    _, sums = output
    ctx.save_for_backward(kernels, mask_feats, pos_image, target, sums)
    ctx.eps = eps


def _make_backward(backward_op):
    def backward(ctx, grad_loss, grad_sums):
        kernels, mask_feats, pos_image, target, sums = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None
        grad_kernels, grad_feats = backward_op(grad_loss.contiguous(), kernels, mask_feats,
                                               pos_image, target, sums, ctx.eps)
        return grad_kernels, grad_feats, None, None, None

    return backward


@torch.library.custom_op("solo_fast::dynamic_mask_dice_loss_triton_forward", mutates_args=())
def _dynamic_mask_dice_loss_triton_forward(kernels: Tensor, mask_feats: Tensor, pos_image: Tensor,
                                           target: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import dynamic_mask_dice_loss as triton_kernels

    return triton_kernels.dynamic_mask_dice_loss_forward(kernels, mask_feats, pos_image, target,
                                                         eps)


@torch.library.custom_op("solo_fast::dynamic_mask_dice_loss_triton_backward", mutates_args=())
def _dynamic_mask_dice_loss_triton_backward(grad_loss: Tensor, kernels: Tensor,
                                            mask_feats: Tensor, pos_image: Tensor,
                                            target: Tensor, sums: Tensor,
                                            eps: float) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import dynamic_mask_dice_loss as triton_kernels

    return triton_kernels.dynamic_mask_dice_loss_backward(grad_loss, kernels, mask_feats,
                                                          pos_image, target, sums, eps)


_dynamic_mask_dice_loss_triton_forward.register_fake(_fake_forward)
_dynamic_mask_dice_loss_triton_backward.register_fake(_fake_backward)
_dynamic_mask_dice_loss_triton_forward.register_autograd(
    _make_backward(torch.ops.solo_fast.dynamic_mask_dice_loss_triton_backward),
    setup_context=_setup_context)

if has_ops():
    torch.library.register_fake("solo_fast::dynamic_mask_dice_loss_forward", _fake_forward)
    torch.library.register_fake("solo_fast::dynamic_mask_dice_loss_backward", _fake_backward)
    torch.library.register_autograd(
        "solo_fast::dynamic_mask_dice_loss_forward",
        _make_backward(torch.ops.solo_fast.dynamic_mask_dice_loss_backward),
        setup_context=_setup_context)
