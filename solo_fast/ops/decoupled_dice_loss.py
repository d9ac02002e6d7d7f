"""Decoupled SOLO's dice loss as one fused op on every backend.

Positive k of image n in grid row i and column j has the soft mask
p_k = sigmoid(Y[n, i]) * sigmoid(X[n, j]) (SPEC §4.2) and the dice loss of SPEC §8.1 against its
target. mmdetection materialises every p_k (K x H x W, several times over in the backward); the
fused backends never store p_k nor the sigmoids: the forward recomputes them from the logits while
it reduces a = sum p*t, b = sum p^2, c = sum t^2, and the backward recomputes them again while it
accumulates each positive's terms into the gradient rows of X and Y that it shares with other
positives, without races and in a fixed order (see ``csrc/cpu/decoupled_dice_loss.cpp``).

The compiled kernels (``torch.ops.solo_fast.decoupled_dice_loss_forward/backward``, C++ on CPU,
CUDA on GPU) and the Triton kernels (``torch.ops.solo_fast.decoupled_dice_loss_triton_forward/
backward``) share one contract:

* x_logits, y_logits (N, S, P) of one floating dtype; pos_image, pos_row, pos_col (K,) int64;
  target (K, P) uint8 (bool also for the compiled kernels) or x_logits' dtype;
* forward -> (loss (K,) in x_logits' dtype, sums (K, 3) float64 = [a, b, c] without eps);
* backward(grad_loss (K,), x_logits, y_logits, pos_image, pos_row, pos_col, target, sums, eps)
  -> (grad_x_logits, grad_y_logits), both (N, S, P).

Accumulation is float32 (float64 for float64 inputs), with float64 across chunks of pixels.
"""

# N=images, S=grid side, K=positives, H, W=mask-map size, P=H*W pixels

from __future__ import annotations

import math

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import decoupled_dice_loss_reference

__all__ = ["decoupled_dice_loss"]

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def decoupled_dice_loss(x_logits: Tensor, y_logits: Tensor, pos_image: Tensor, pos_row: Tensor,
                        pos_col: Tensor, target: Tensor, *, eps: float = 1e-3,
                        backend: str | None = None) -> Tensor:
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

    Returns:
        (K,) in x_logits' dtype: ``1 - 2a / ((b + eps) + (c + eps))`` of
        ``p_k = sigmoid(y_logits[n, i]) * sigmoid(x_logits[n, j])`` against ``target[k]``;
        differentiable with respect to x_logits and y_logits (the indices and targets get no
        gradient).

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an index is out of range.
    """
    _check_inputs(x_logits, y_logits, pos_image, pos_row, pos_col, target, eps)
    eps = float(eps)
    chosen = choose_backend("decoupled_dice_loss", x_logits.device, backend)
    if chosen == "reference":
        return decoupled_dice_loss_reference(x_logits, y_logits, pos_image, pos_row, pos_col,
                                             target, eps=eps)
    n, s, h, w = x_logits.shape
    x3d = x_logits.reshape(n, s, h * w)  # (N, S, P)
    y3d = y_logits.reshape(n, s, h * w)  # (N, S, P)
    target2d = target.reshape(target.shape[0], h * w)  # (K, P)
    if target2d.dtype == torch.bool:
        target2d = target2d.view(torch.uint8)  # same bytes, 0/1
    elif target2d.dtype != torch.uint8 and target2d.dtype != x3d.dtype:
        target2d = target2d.to(x3d.dtype)
    op = (torch.ops.solo_fast.decoupled_dice_loss_triton_forward if chosen == "triton"
          else torch.ops.solo_fast.decoupled_dice_loss_forward)
    loss, _ = op(x3d, y3d, pos_image, pos_row, pos_col, target2d, eps)
    return loss


def _check_inputs(x_logits: object, y_logits: object, pos_image: object, pos_row: object,
                  pos_col: object, target: object, eps: object) -> None:
    op = "decoupled_dice_loss"
    named = {"x_logits": x_logits, "y_logits": y_logits, "pos_image": pos_image,
             "pos_row": pos_row, "pos_col": pos_col, "target": target}
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x_logits.dim() != 4:
        raise ValueError(f"{op}: x_logits must be (N, S, H, W), got shape "
                         f"{tuple(x_logits.shape)} ({x_logits.dim()}-D)")
    if x_logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{op}: x_logits must be float16, bfloat16, float32 or float64, "
                        f"got {x_logits.dtype}")
    if y_logits.shape != x_logits.shape:
        raise ValueError(f"{op}: y_logits must have x_logits' shape (N, S, H, W) = "
                         f"{tuple(x_logits.shape)}, got {tuple(y_logits.shape)}")
    if y_logits.dtype != x_logits.dtype:
        raise TypeError(f"{op}: y_logits must have x_logits' dtype {x_logits.dtype}, "
                        f"got {y_logits.dtype}")
    if pos_image.dim() != 1:
        raise ValueError(f"{op}: pos_image must be 1-D (K,), got shape {tuple(pos_image.shape)}")
    num_positives = pos_image.shape[0]
    for name in ("pos_image", "pos_row", "pos_col"):
        index = named[name]
        if index.shape != (num_positives,):
            raise ValueError(f"{op}: {name} must have shape (K,) = ({num_positives},) as "
                             f"pos_image, got {tuple(index.shape)}")
        if index.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {index.dtype}")
    n, s, h, w = x_logits.shape
    if target.shape != (num_positives, h, w):
        raise ValueError(f"{op}: target must have shape (K, H, W) = ({num_positives}, {h}, {w}), "
                         f"got {tuple(target.shape)}")
    if not (target.dtype in (torch.bool, torch.uint8) or target.dtype.is_floating_point):
        raise TypeError(f"{op}: target must be bool, uint8 or floating, got {target.dtype}")
    for name, value in named.items():
        if value.device != x_logits.device:
            raise ValueError(f"{op}: {name} is on {value.device} but x_logits is on "
                             f"{x_logits.device}; all must be on the same device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    # The ranges are data: checked eagerly (one device-to-host copy), not while torch.compile
    # traces (the kernels check them again), nor on meta tensors, which hold no values.
    if num_positives == 0 or x_logits.device.type == "meta" or torch.compiler.is_compiling():
        return
    bounds = torch.stack([pos_image.min(), pos_image.max(), pos_row.min(), pos_row.max(),
                          pos_col.min(), pos_col.max()]).tolist()
    limits = (("pos_image", n, "N"), ("pos_row", s, "S"), ("pos_col", s, "S"))
    for (name, limit, letter), low, high in zip(limits, bounds[0::2], bounds[1::2]):
        if low < 0 or high >= limit:
            raise ValueError(f"{op}: {name} must lie in [0, {letter}) = [0, {limit}), got values "
                             f"in [{low}, {high}]")


# ----------------------------------------------------------------------------------------------
# Registration: fake kernels (shapes only, for torch.compile and meta tensors) and autograd, the
# same for the compiled ops and for the Triton ops.

def _fake_forward(x_logits: Tensor, y_logits: Tensor, pos_image: Tensor, pos_row: Tensor,
                  pos_col: Tensor, target: Tensor, eps: float):
    num_positives = pos_image.shape[0]
    return (x_logits.new_empty((num_positives,)),
            x_logits.new_empty((num_positives, 3), dtype=torch.float64))


def _fake_backward(grad_loss: Tensor, x_logits: Tensor, y_logits: Tensor, pos_image: Tensor,
                   pos_row: Tensor, pos_col: Tensor, target: Tensor, sums: Tensor, eps: float):
    return torch.empty_like(x_logits), torch.empty_like(y_logits)


def _setup_context(ctx, inputs, output) -> None:
    x_logits, y_logits, pos_image, pos_row, pos_col, target, eps = inputs
    _, sums = output
    ctx.save_for_backward(x_logits, y_logits, pos_image, pos_row, pos_col, target, sums)
    ctx.eps = eps


def _make_backward(backward_op):
    def backward(ctx, grad_loss, grad_sums):
        x_logits, y_logits, pos_image, pos_row, pos_col, target, sums = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None
        grad_x, grad_y = backward_op(grad_loss.contiguous(), x_logits, y_logits, pos_image,
                                     pos_row, pos_col, target, sums, ctx.eps)
        return grad_x, grad_y, None, None, None, None, None

    return backward


@torch.library.custom_op("solo_fast::decoupled_dice_loss_triton_forward", mutates_args=())
def _decoupled_dice_loss_triton_forward(x_logits: Tensor, y_logits: Tensor, pos_image: Tensor,
                                        pos_row: Tensor, pos_col: Tensor, target: Tensor,
                                        eps: float) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import decoupled_dice_loss as triton_kernels

    return triton_kernels.decoupled_dice_loss_forward(x_logits, y_logits, pos_image, pos_row,
                                                      pos_col, target, eps)


@torch.library.custom_op("solo_fast::decoupled_dice_loss_triton_backward", mutates_args=())
def _decoupled_dice_loss_triton_backward(grad_loss: Tensor, x_logits: Tensor, y_logits: Tensor,
                                         pos_image: Tensor, pos_row: Tensor, pos_col: Tensor,
                                         target: Tensor, sums: Tensor,
                                         eps: float) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import decoupled_dice_loss as triton_kernels

    return triton_kernels.decoupled_dice_loss_backward(grad_loss, x_logits, y_logits, pos_image,
                                                       pos_row, pos_col, target, sums, eps)


_decoupled_dice_loss_triton_forward.register_fake(_fake_forward)
_decoupled_dice_loss_triton_backward.register_fake(_fake_backward)
_decoupled_dice_loss_triton_forward.register_autograd(
    _make_backward(torch.ops.solo_fast.decoupled_dice_loss_triton_backward),
    setup_context=_setup_context)

if has_ops():
    torch.library.register_fake("solo_fast::decoupled_dice_loss_forward", _fake_forward)
    torch.library.register_fake("solo_fast::decoupled_dice_loss_backward", _fake_backward)
    torch.library.register_autograd(
        "solo_fast::decoupled_dice_loss_forward",
        _make_backward(torch.ops.solo_fast.decoupled_dice_loss_backward),
        setup_context=_setup_context)
