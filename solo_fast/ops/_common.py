"""What the op wrappers share: the scoring ops' result type, scalar-argument checks, the target
layout the fused dice kernels read, and the registration of the dice ops' fake kernels and
autograd (one pattern for the compiled and the Triton ops of all three dice losses)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MaskScores", "check_bool", "check_number", "op_target", "register_dice_op"]


class MaskScores(NamedTuple):
    """What the candidate-scoring ops return (K=candidates, Wd=ceil(H * W / 64)).

    Attributes:
        area: (K,) int64, the number of pixels of each candidate's binary mask.
        soft_sum: (K,) float64, the sum of the soft mask over those pixels
            (maskness = soft_sum / area).
        packed: (K, Wd) int64, the binary masks bit-packed in ``matrix_nms_pack``'s layout, when
            ``dynamic_mask_scores`` was asked for them (``pack_masks=True``); else None.
    """

    area: Tensor
    soft_sum: Tensor
    packed: Tensor | None = None


def check_number(op: str, name: str, value: object, *, minimum: float | None = None) -> float:
    """``value`` as a float; it must be a finite int or float (not a bool), >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{op}: {name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def op_target(target: Tensor, dtype: torch.dtype) -> Tensor:
    """The target as the fused dice kernels read it: bool and uint8 as bytes (in place), another
    floating dtype converted to ``dtype`` (one copy)."""
    if target.dtype == torch.bool:
        return target.view(torch.uint8)  # same bytes, 0/1
    if target.dtype != torch.uint8 and target.dtype != dtype:
        return target.to(dtype)
    return target


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    return [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]


def register_dice_op(forward: str, backward_op: Callable, *, num_grads: int,
                     check_index: bool) -> None:
    """Fake kernels and autograd of a fused dice loss op pair ``solo_fast::<forward>``.

    The pair's contract: forward(*tensors, *scalars) -> (loss (K,) in the first tensor's dtype,
    sums (K, 3) float64), K the first size of the last tensor (the target);
    backward(grad_loss, *tensors, sums, *scalars) -> the gradients of the first ``num_grads``
    tensors. With ``check_index`` the last scalar is the ops' check_index flag, which the
    backward gets as False: the forward checked the same index tensors.
    """

    def fake_forward(*args, **kwargs):
        tensors = _tensors(args, kwargs)
        items = tensors[-1].shape[0]
        return (tensors[0].new_empty((items,)),
                tensors[0].new_empty((items, 3), dtype=torch.float64))

    def fake_backward(*args, **kwargs):
        tensors = _tensors(args, kwargs)[1:]  # without grad_loss
        grads = tuple(torch.empty_like(tensor) for tensor in tensors[:num_grads])
        return grads if num_grads > 1 else grads[0]

    def setup_context(ctx, inputs, output) -> None:
        scalars = [value for value in inputs if not isinstance(value, Tensor)]
        ctx.num_inputs = len(inputs)
        ctx.scalars = scalars[:-1] if check_index else scalars
        ctx.save_for_backward(*[value for value in inputs if isinstance(value, Tensor)],
                              output[1])

    def backward(ctx, grad_loss, grad_sums):
        *tensors, sums = ctx.saved_tensors
        nones = (None,) * ctx.num_inputs
        if grad_loss is None:
            return nones
        extra = {"check_index": False} if check_index else {}
        grads = backward_op(grad_loss.contiguous(), *tensors, sums, *ctx.scalars, **extra)
        grads = grads if isinstance(grads, tuple) else (grads,)
        return (*grads, *nones[len(grads):])

    name = f"solo_fast::{forward}"
    torch.library.register_fake(name, fake_forward)
    torch.library.register_fake(name.replace("_forward", "_backward"), fake_backward)
    torch.library.register_autograd(name, backward, setup_context=setup_context)
