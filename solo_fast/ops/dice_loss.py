"""The dice loss of SOLO as one fused op on every backend.

``dice_loss`` computes, per mask, p = sigmoid(pred) (or pred itself), the three sums
a = sum p*t, b = sum p^2, c = sum t^2 and L = 1 - 2a / ((b + eps) + (c + eps)) in one pass over the
pixels; the backward is a second pass that recomputes p instead of storing it. The compiled kernels
(``torch.ops.solo_fast.dice_loss_forward/backward``, C++ on CPU, CUDA on GPU) and the Triton kernels
(``torch.ops.solo_fast.dice_loss_triton_forward/backward``) share one contract:

* pred (N, P) float16/bfloat16/float32/float64, target (N, P) uint8, bool or pred's dtype;
* forward -> (loss (N,) in pred's dtype, sums (N, 3) float64 = [a, b, c] without eps);
* backward(grad_loss (N,), pred, target, sums, logits, eps) -> grad_pred (N, P).

Accumulation is float32 (float64 for float64 inputs), with float64 across chunks of pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._checks import FLOATING, MASK, Arg, Contract
from solo_fast.ops._common import check_number, op_target, register_dice_op
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import dice_loss_reference

__all__ = ["dice_loss"]

_CONTRACT = Contract("dice_loss", (
    Arg("pred", "N H W|N P", FLOATING),
    Arg("target", like="pred", dtypes=MASK),
))
# The ops' contract (the compiled ops check the same in csrc/op_checks.h).
_OP_CONTRACT = Contract("dice_loss_triton", (
    Arg("pred", "N P", FLOATING),
    Arg("target", like="pred", dtypes=(torch.uint8, torch.bool, "pred")),
))
_BACKWARD_CONTRACT = Contract("dice_loss_triton_backward", _OP_CONTRACT.args + (
    Arg("grad_loss", "N", ("floating",)),
    Arg("sums", "N 3", ("floating",)),
))


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
    _CONTRACT.check(pred=pred, target=target)
    eps = check_number("dice_loss", "eps", eps, minimum=0)
    chosen = choose_backend("dice_loss", pred.device, backend)
    if chosen == "reference":
        return dice_loss_reference(pred, target, logits=logits, eps=eps)
    pixels = math.prod(pred.shape[1:])
    pred2d = pred.reshape(pred.shape[0], pixels)  # (N, P)
    target2d = op_target(target.reshape(target.shape[0], pixels), pred2d.dtype)  # (N, P)
    op = (torch.ops.solo_fast.dice_loss_triton_forward if chosen == "triton"
          else torch.ops.solo_fast.dice_loss_forward)
    loss, _ = op(pred2d, target2d, logits, eps)
    return loss


# ----------------------------------------------------------------------------------------------
# Registration: the Triton ops (the compiled ones are declared in csrc/solo_fast.cpp), and the
# fake kernels and autograd of both pairs.

@torch.library.custom_op("solo_fast::dice_loss_triton_forward", mutates_args=())
def _dice_loss_triton_forward(pred: Tensor, target: Tensor, logits: bool,
                              eps: float) -> tuple[Tensor, Tensor]:
    # Lazy: Triton is optional, and imported only when its backend runs.
    from solo_fast.kernels import dice_loss as triton_kernels

    _OP_CONTRACT.check(pred=pred, target=target)
    return triton_kernels.dice_loss_forward(pred, op_target(target, pred.dtype), logits, eps)


@torch.library.custom_op("solo_fast::dice_loss_triton_backward", mutates_args=())
def _dice_loss_triton_backward(grad_loss: Tensor, pred: Tensor, target: Tensor, sums: Tensor,
                               logits: bool, eps: float) -> Tensor:
    from solo_fast.kernels import dice_loss as triton_kernels  # lazy, as above

    _BACKWARD_CONTRACT.check(pred=pred, target=target, grad_loss=grad_loss, sums=sums)
    return triton_kernels.dice_loss_backward(grad_loss, pred, op_target(target, pred.dtype),
                                             sums, logits, eps)


register_dice_op("dice_loss_triton_forward", torch.ops.solo_fast.dice_loss_triton_backward,
                 num_grads=1, check_index=False)
if has_ops():
    register_dice_op("dice_loss_forward", torch.ops.solo_fast.dice_loss_backward, num_grads=1,
                     check_index=False)
