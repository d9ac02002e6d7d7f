"""The dice loss of SOLO as one fused op on every backend.

``dice_loss`` computes, per mask, p = sigmoid(pred) (or pred itself), the three sums
a = sum p*t, b = sum p^2, c = sum t^2 and L = 1 - 2a / ((b + eps) + (c + eps)) in one pass over the
pixels; the backward is a second pass that recomputes p instead of storing it. The compiled kernels
(``torch.ops.solo_fast.dice_loss_forward/backward``, C++ on CPU, CUDA on GPU) and the Triton kernels
(``torch.ops.solo_fast.dice_loss_triton_forward/backward``) share one contract:

* pred (N, P) float16/bfloat16/float32/float64, target (N, P) uint8 or pred's dtype;
* forward -> (loss (N,) in pred's dtype, sums (N, 3) float64 = [a, b, c] without eps);
* backward(grad_loss (N,), pred, target, sums, logits, eps) -> grad_pred (N, P).

Accumulation is float32 (float64 for float64 inputs), with float64 across chunks of pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import dice_loss_reference

__all__ = ["dice_loss"]

_PRED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dice_loss(pred: Tensor, target: Tensor, *, logits: bool = True, eps: float = 1e-3,
              backend: str | None = None) -> Tensor:
    """Per-mask dice loss of SOLO, fused: no full-size temporary beyond the gradient.

    Args:
        pred: (N, H, W) or (N, P) logits (``logits=True``: SOLO, SOLOv2) or probabilities
            (``logits=False``: Decoupled SOLO); float16, bfloat16, float32 or float64.
        target: pred's shape; bool, uint8 (0/1) or floating. Bool and uint8 are read in place;
            a floating target of another dtype than pred is converted (one copy).
        logits: apply a sigmoid to ``pred`` inside the op.
        eps: added to each of the two squared sums (mmdetection: 1e-3).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None takes
            ``SOLO_FAST_BACKEND`` or the fastest tested backend for pred's device.

    Returns:
        (N,) loss per mask in pred's dtype, ``1 - 2a / ((b + eps) + (c + eps))``; differentiable
        with respect to ``pred`` (targets get no gradient).

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device.
    """
    _check_inputs(pred, target, eps)
    eps = float(eps)
    chosen = choose_backend("dice_loss", pred.device, backend)
    if chosen == "reference":
        return dice_loss_reference(pred, target, logits=logits, eps=eps)
    pixels = math.prod(pred.shape[1:])
    pred2d = pred.reshape(pred.shape[0], pixels)  # (N, P)
    target2d = target.reshape(target.shape[0], pixels)  # (N, P)
    if target2d.dtype == torch.bool:
        target2d = target2d.view(torch.uint8)  # same bytes, 0/1
    elif target2d.dtype != torch.uint8 and target2d.dtype != pred2d.dtype:
        target2d = target2d.to(pred2d.dtype)
    if chosen == "triton":
        loss, _ = torch.ops.solo_fast.dice_loss_triton_forward(pred2d, target2d, logits, eps)
    else:
        loss, _ = torch.ops.solo_fast.dice_loss_forward(pred2d, target2d, logits, eps)
    return loss


def _check_inputs(pred: object, target: object, eps: object) -> None:
    if not isinstance(pred, Tensor):
        raise TypeError(f"dice_loss: pred must be a torch.Tensor, got {type(pred).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"dice_loss: target must be a torch.Tensor, got {type(target).__name__}")
    if pred.dim() not in (2, 3):
        raise ValueError(f"dice_loss: pred must be (N, H, W) or (N, P), got shape "
                         f"{tuple(pred.shape)} ({pred.dim()}-D)")
    if pred.dtype not in _PRED_DTYPES:
        raise TypeError(f"dice_loss: pred must be float16, bfloat16, float32 or float64, "
                        f"got {pred.dtype}")
    if target.shape != pred.shape:
        raise ValueError(f"dice_loss: target must have pred's shape {tuple(pred.shape)}, "
                         f"got {tuple(target.shape)}")
    if not (target.dtype in (torch.bool, torch.uint8) or target.dtype.is_floating_point):
        raise TypeError(f"dice_loss: target must be bool, uint8 or floating, got {target.dtype}")
    if target.device != pred.device:
        raise ValueError(f"dice_loss: target is on {target.device} but pred is on "
                         f"{pred.device}; both must be on the same device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"dice_loss: eps must be a finite number >= 0, got {eps!r}")


# ----------------------------------------------------------------------------------------------
# Registration: fake kernels (shapes only, for torch.compile and meta tensors) and autograd, the
# same for the compiled ops and for the Triton ops.

def _fake_forward(pred: Tensor, target: Tensor, logits: bool, eps: float):
    return pred.new_empty(pred.shape[:1]), pred.new_empty((pred.shape[0], 3), dtype=torch.float64)


def _fake_backward(grad_loss: Tensor, pred: Tensor, target: Tensor, sums: Tensor, logits: bool,
                   eps: float) -> Tensor:
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output) -> None:
    pred, target, logits, eps = inputs
    _, sums = output
    ctx.save_for_backward(pred, target, sums)
    ctx.logits = logits
    ctx.eps = eps


def _make_backward(backward_op):
    def backward(ctx, grad_loss, grad_sums):
        pred, target, sums = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None
        grad_pred = backward_op(grad_loss.contiguous(), pred, target, sums, ctx.logits, ctx.eps)
        return grad_pred, None, None, None

    return backward


@torch.library.custom_op("solo_fast::dice_loss_triton_forward", mutates_args=())
def _dice_loss_triton_forward(pred: Tensor, target: Tensor, logits: bool,
                              eps: float) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import dice_loss as triton_dice_loss

    return triton_dice_loss.dice_loss_forward(pred, target, logits, eps)


@torch.library.custom_op("solo_fast::dice_loss_triton_backward", mutates_args=())
def _dice_loss_triton_backward(grad_loss: Tensor, pred: Tensor, target: Tensor, sums: Tensor,
                               logits: bool, eps: float) -> Tensor:
    from solo_fast.kernels import dice_loss as triton_dice_loss

    return triton_dice_loss.dice_loss_backward(grad_loss, pred, target, sums, logits, eps)


_dice_loss_triton_forward.register_fake(_fake_forward)
_dice_loss_triton_backward.register_fake(_fake_backward)
_dice_loss_triton_forward.register_autograd(
    _make_backward(torch.ops.solo_fast.dice_loss_triton_backward), setup_context=_setup_context)

if has_ops():
    torch.library.register_fake("solo_fast::dice_loss_forward", _fake_forward)
    torch.library.register_fake("solo_fast::dice_loss_backward", _fake_backward)
    torch.library.register_autograd(
        "solo_fast::dice_loss_forward", _make_backward(torch.ops.solo_fast.dice_loss_backward),
        setup_context=_setup_context)
