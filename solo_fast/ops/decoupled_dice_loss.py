"""Decoupled SOLO's dice loss as one fused op on every backend.

Positive k of image n in grid row i and column j has the soft mask
p_k = sigmoid(Y[n, i]) * sigmoid(X[n, j]) (docs/algorithms.md §6.2) and the dice loss of
docs/algorithms.md §9.1 against its target. mmdetection materialises every p_k (K x H x W, several
times over in the backward); the fused backends never store p_k nor the sigmoids: the forward
recomputes them from the logits while it reduces a = sum p*t, b = sum p^2, c = sum t^2, and the
backward recomputes them again while it accumulates each positive's terms into the gradient rows of
X and Y that it shares with other positives, without races and in a fixed order (see
``csrc/cpu/decoupled_dice_loss.cpp``).

The compiled kernels (``torch.ops.solo_fast.decoupled_dice_loss_forward/backward``, C++ on CPU,
CUDA on GPU) and the Triton kernels (``torch.ops.solo_fast.decoupled_dice_loss_triton_forward/
backward``) share one contract:

* x_logits, y_logits (N, S, P) of one floating dtype; pos_image, pos_row, pos_col (K,) int64;
  target (K, P) uint8, bool or x_logits' dtype; check_index (default True): check the index
  ranges (one device-to-host copy) before any kernel reads them;
* forward -> (loss (K,) in x_logits' dtype, sums (K, 3) float64 = [a, b, c] without eps);
* backward(grad_loss (K,), x_logits, y_logits, pos_image, pos_row, pos_col, target, sums, eps,
  check_index) -> (grad_x_logits, grad_y_logits), both (N, S, P); autograd passes
  check_index=False (the forward checked the same indices).

Accumulation is float32 (float64 for float64 inputs), with float64 across chunks of pixels.
"""

# N=images, S=grid side, K=positives, H, W=mask-map size, P=H*W pixels

from __future__ import annotations

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._checks import FLOATING, INDEX, MASK, Arg, Contract
from solo_fast.ops._common import check_number, op_target, register_dice_op
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import decoupled_dice_loss_reference

__all__ = ["decoupled_dice_loss"]

_INDICES = (
    Arg("pos_image", "K", INDEX, below="N"),
    Arg("pos_row", "K", INDEX, below="S"),
    Arg("pos_col", "K", INDEX, below="S"),
)
_CONTRACT = Contract("decoupled_dice_loss", (
    Arg("x_logits", "N S H W", FLOATING),
    Arg("y_logits", like="x_logits", dtypes=("x_logits",)),
    *_INDICES,
    Arg("target", "K H W", MASK),
))
# The ops' contract (the compiled ops check the same in csrc/op_checks.h).
_OP_CONTRACT = Contract("decoupled_dice_loss_triton", (
    Arg("x_logits", "N S P", FLOATING),
    Arg("y_logits", like="x_logits", dtypes=("x_logits",)),
    *_INDICES,
    Arg("target", "K P", (torch.uint8, torch.bool, "x_logits")),
))
_BACKWARD_CONTRACT = Contract("decoupled_dice_loss_triton_backward", _OP_CONTRACT.args + (
    Arg("grad_loss", "K", ("floating",)),
    Arg("sums", "K 3", ("floating",)),
))


def decoupled_dice_loss(x_logits: Tensor, y_logits: Tensor, pos_image: Tensor, pos_row: Tensor,
                        pos_col: Tensor, target: Tensor, *, eps: float = 1e-3,
                        backend: str | None = None, check_index: bool = True) -> Tensor:
    """Dice loss of every positive of a Decoupled SOLO level, fused: no (K, H, W) temporary.

    Args:
        x_logits: (N, S, H, W) logits of the X branch; channel j belongs to grid column j.
            float16, bfloat16 (both accumulated in float32), float32 or float64.
        y_logits: (N, S, H, W) logits of the Y branch, channel i = grid row i; x_logits' dtype
            and device.
        pos_image: (K,) int64 in [0, N), the image of each positive.
        pos_row: (K,) int64 in [0, S), the grid row (Y channel) of each positive.
        pos_col: (K,) int64 in [0, S), the grid column (X channel) of each positive. Positives may
            share rows, columns and whole cells.
        target: (K, H, W) bool, uint8 (0/1) or floating; the GT mask of each positive. Bool and
            uint8 are read in place; a floating target of another dtype than x_logits is
            converted (one copy).
        eps: added to each of the two squared sums (mmdetection: 1e-3).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None takes
            ``SOLO_FAST_BACKEND`` or the fastest tested backend for x_logits' device.
        check_index: check that the indices lie in their ranges. The check reads the indices'
            minimum and maximum (one device-to-host copy, a synchronisation on a GPU, for the
            forward and backward together); it runs in the backend that reads the indices (this
            function for the reference, the compiled or Triton op otherwise). Pass False only
            for indices built in range (as the target assignment builds them): out-of-range
            indices then read out of bounds.

    Returns:
        (K,) in x_logits' dtype: ``1 - 2a / ((b + eps) + (c + eps))`` of
        ``p_k = sigmoid(y_logits[n, i]) * sigmoid(x_logits[n, j])`` against ``target[k]``;
        differentiable with respect to x_logits and y_logits (the indices and targets get no
        gradient).

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an index is out of range.
    """
    tensors = {"x_logits": x_logits, "y_logits": y_logits, "pos_image": pos_image,
               "pos_row": pos_row, "pos_col": pos_col, "target": target}
    sizes = _CONTRACT.check(**tensors)
    eps = check_number("decoupled_dice_loss", "eps", eps, minimum=0)
    chosen = choose_backend("decoupled_dice_loss", x_logits.device, backend)
    if chosen == "reference":
        if check_index:
            _CONTRACT.check_ranges(sizes, **tensors)
        return decoupled_dice_loss_reference(x_logits, y_logits, pos_image, pos_row, pos_col,
                                             target, eps=eps)
    n, s, h, w = x_logits.shape
    x3d = x_logits.reshape(n, s, h * w)  # (N, S, P)
    y3d = y_logits.reshape(n, s, h * w)  # (N, S, P)
    target2d = op_target(target.reshape(target.shape[0], h * w), x3d.dtype)  # (K, P)
    op = (torch.ops.solo_fast.decoupled_dice_loss_triton_forward if chosen == "triton"
          else torch.ops.solo_fast.decoupled_dice_loss_forward)
    loss, _ = op(x3d, y3d, pos_image, pos_row, pos_col, target2d, eps, bool(check_index))
    return loss


# ----------------------------------------------------------------------------------------------
# Registration: the Triton ops (the compiled ones are declared in csrc/solo_fast.cpp), and the
# fake kernels and autograd of both pairs.

@torch.library.custom_op("solo_fast::decoupled_dice_loss_triton_forward", mutates_args=())
def _decoupled_dice_loss_triton_forward(x_logits: Tensor, y_logits: Tensor, pos_image: Tensor,
                                        pos_row: Tensor, pos_col: Tensor, target: Tensor,
                                        eps: float, check_index: bool = True
                                        ) -> tuple[Tensor, Tensor]:
    # Lazy: Triton is optional, and imported only when its backend runs.
    from solo_fast.kernels import decoupled_dice_loss as triton_kernels

    _OP_CONTRACT.check(ranges=check_index, x_logits=x_logits, y_logits=y_logits,
                       pos_image=pos_image, pos_row=pos_row, pos_col=pos_col, target=target)
    return triton_kernels.decoupled_dice_loss_forward(
        x_logits, y_logits, pos_image, pos_row, pos_col, op_target(target, x_logits.dtype), eps)


@torch.library.custom_op("solo_fast::decoupled_dice_loss_triton_backward", mutates_args=())
def _decoupled_dice_loss_triton_backward(grad_loss: Tensor, x_logits: Tensor, y_logits: Tensor,
                                         pos_image: Tensor, pos_row: Tensor, pos_col: Tensor,
                                         target: Tensor, sums: Tensor, eps: float,
                                         check_index: bool = True) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import decoupled_dice_loss as triton_kernels  # lazy, as above

    _BACKWARD_CONTRACT.check(ranges=check_index, x_logits=x_logits, y_logits=y_logits,
                             pos_image=pos_image, pos_row=pos_row, pos_col=pos_col, target=target,
                             grad_loss=grad_loss, sums=sums)
    return triton_kernels.decoupled_dice_loss_backward(
        grad_loss, x_logits, y_logits, pos_image, pos_row, pos_col,
        op_target(target, x_logits.dtype), sums, eps)


register_dice_op("decoupled_dice_loss_triton_forward",
                 torch.ops.solo_fast.decoupled_dice_loss_triton_backward, num_grads=2,
                 check_index=True)
if has_ops():
    register_dice_op("decoupled_dice_loss_forward",
                     torch.ops.solo_fast.decoupled_dice_loss_backward, num_grads=2,
                     check_index=True)
