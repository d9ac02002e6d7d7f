"""SOLOv2's dynamic mask convolution and dice loss as one fused op on every backend.

Positive k of image n has the mask logits z_k = kernels[k] . mask_feats[n] (a 1x1 convolution,
docs/algorithms.md §7.3) and the dice loss of sigmoid(z_k) against its target
(docs/algorithms.md §9.1). mmdetection stores every z_k (K x H x W) and several full-size
temporaries of the dice loss; the fused backends never store them: the forward runs the GEMM tile by
tile with the sigmoid and the three reductions a = sum p*t, b = sum p^2, c = sum t^2 on each tile
while it is in cache, and the backward recomputes each tile's logits, turns them into dL/dz and runs
the two gradient GEMMs on it (``csrc/cpu/dynamic_mask_dice_loss.cpp``). One call covers every image
and level of a batch: positives come in any order.

The compiled kernels (``torch.ops.solo_fast.dynamic_mask_dice_loss_forward/backward``, C++ on
CPU, CUDA on GPU) and the Triton kernels (``torch.ops.solo_fast.dynamic_mask_dice_loss_triton_
forward/backward``) share one contract:

* kernels (K, E) and mask_feats (N, E, P) of one floating dtype, contiguous; pos_image (K,)
  int64; target (K, P) uint8, bool or kernels' dtype; check_index (default True): check
  pos_image's range (one device-to-host copy) before any kernel reads it;
* forward -> (loss (K,) in kernels' dtype, sums (K, 3) float64 = [a, b, c] without eps);
* backward(grad_loss (K,), kernels, mask_feats, pos_image, target, sums, eps, check_index)
  -> (grad_kernels (K, E), grad_mask_feats (N, E, P)); autograd passes check_index=False (the
  forward checked the same indices).

Accumulation is float32 (float64 for float64 inputs), with float64 across tiles of pixels. The C++
CPU kernels run float16 and bfloat16 inputs in float32 (one upcast copy of the inputs: MKL has no
fast half GEMM on CPU) and return results in the inputs' dtype.
"""

# N=images, E=mask-feature channels, K=positives, H, W=mask-map size, P=H*W pixels

from __future__ import annotations

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._checks import FLOATING, INDEX, MASK, Arg, Contract
from solo_fast.ops._common import check_number, op_target, register_dice_op
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import dynamic_mask_dice_loss_reference

__all__ = ["dynamic_mask_dice_loss"]

_CONTRACT = Contract("dynamic_mask_dice_loss", (
    Arg("kernels", "K E", FLOATING),
    Arg("mask_feats", "N E H W", ("kernels",)),
    Arg("pos_image", "K", INDEX, below="N"),
    Arg("target", "K H W", MASK),
))
# The ops' contract (the compiled ops check the same in csrc/op_checks.h).
_OP_CONTRACT = Contract("dynamic_mask_dice_loss_triton", (
    Arg("kernels", "K E", FLOATING),
    Arg("mask_feats", "N E P", ("kernels",)),
    Arg("pos_image", "K", INDEX, below="N"),
    Arg("target", "K P", (torch.uint8, torch.bool, "kernels")),
))
_BACKWARD_CONTRACT = Contract("dynamic_mask_dice_loss_triton_backward", _OP_CONTRACT.args + (
    Arg("grad_loss", "K", ("floating",)),
    Arg("sums", "K 3", ("floating",)),
))


def dynamic_mask_dice_loss(kernels: Tensor, mask_feats: Tensor, pos_image: Tensor,
                           target: Tensor, *, eps: float = 1e-3, backend: str | None = None,
                           check_index: bool = True) -> Tensor:
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
        check_index: check that pos_image lies in [0, N). The check reads its minimum and maximum
            (one device-to-host copy, a synchronisation on a GPU, for the forward and backward
            together); it runs in the backend that reads the indices (this function for the
            reference, the compiled or Triton op otherwise). Pass False only for indices built in
            range (as the target assignment builds them): out-of-range indices then read out of
            bounds.

    Returns:
        (K,) in kernels' dtype: ``1 - 2a / ((b + eps) + (c + eps))`` of
        ``p_k = sigmoid(kernels[k] . mask_feats[pos_image[k]])`` against ``target[k]``;
        differentiable with respect to kernels and mask_feats (the indices and targets get no
        gradient).

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, shape or device, or
            an index is out of range.
    """
    tensors = {"kernels": kernels, "mask_feats": mask_feats, "pos_image": pos_image,
               "target": target}
    sizes = _CONTRACT.check(**tensors)
    eps = check_number("dynamic_mask_dice_loss", "eps", eps, minimum=0)
    chosen = choose_backend("dynamic_mask_dice_loss", kernels.device, backend)
    if chosen == "reference":
        if check_index:
            _CONTRACT.check_ranges(sizes, **tensors)
        return dynamic_mask_dice_loss_reference(kernels, mask_feats, pos_image, target, eps=eps)
    n, e, h, w = mask_feats.shape
    feats3d = mask_feats.reshape(n, e, h * w).contiguous()  # (N, E, P)
    target2d = op_target(target.reshape(target.shape[0], h * w).contiguous(),
                         kernels.dtype)  # (K, P)
    op = (torch.ops.solo_fast.dynamic_mask_dice_loss_triton_forward if chosen == "triton"
          else torch.ops.solo_fast.dynamic_mask_dice_loss_forward)
    loss, _ = op(kernels.contiguous(), feats3d, pos_image.contiguous(), target2d, eps,
                 bool(check_index))
    return loss


# ----------------------------------------------------------------------------------------------
# Registration: the Triton ops (the compiled ones are declared in csrc/solo_fast.cpp), and the
# fake kernels and autograd of both pairs.

@torch.library.custom_op("solo_fast::dynamic_mask_dice_loss_triton_forward", mutates_args=())
def _dynamic_mask_dice_loss_triton_forward(kernels: Tensor, mask_feats: Tensor, pos_image: Tensor,
                                           target: Tensor, eps: float, check_index: bool = True
                                           ) -> tuple[Tensor, Tensor]:
    # Lazy: Triton is optional, and imported only when its backend runs.
    from solo_fast.kernels import dynamic_mask_dice_loss as triton_kernels

    _OP_CONTRACT.check(ranges=check_index, kernels=kernels, mask_feats=mask_feats,
                       pos_image=pos_image, target=target)
    return triton_kernels.dynamic_mask_dice_loss_forward(kernels, mask_feats, pos_image, target,
                                                         eps)


@torch.library.custom_op("solo_fast::dynamic_mask_dice_loss_triton_backward", mutates_args=())
def _dynamic_mask_dice_loss_triton_backward(grad_loss: Tensor, kernels: Tensor,
                                            mask_feats: Tensor, pos_image: Tensor,
                                            target: Tensor, sums: Tensor, eps: float,
                                            check_index: bool = True) -> tuple[Tensor, Tensor]:
    from solo_fast.kernels import dynamic_mask_dice_loss as triton_kernels  # lazy, as above

    _BACKWARD_CONTRACT.check(ranges=check_index, kernels=kernels, mask_feats=mask_feats,
                             pos_image=pos_image, target=target, grad_loss=grad_loss, sums=sums)
    return triton_kernels.dynamic_mask_dice_loss_backward(grad_loss, kernels, mask_feats,
                                                          pos_image, target, sums, eps)


register_dice_op("dynamic_mask_dice_loss_triton_forward",
                 torch.ops.solo_fast.dynamic_mask_dice_loss_triton_backward, num_grads=2,
                 check_index=True)
if has_ops():
    register_dice_op("dynamic_mask_dice_loss_forward",
                     torch.ops.solo_fast.dynamic_mask_dice_loss_backward, num_grads=2,
                     check_index=True)
