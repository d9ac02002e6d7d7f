"""Triton kernels of SOLOv2's dynamic mask convolution fused with the dice loss; host launchers.

Positive k of image n = pos_image[k] has the kernel w_k (E,); its mask logits are the 1x1
convolution z_k = w_k . F[n] (an E-dot-product per pixel), p_k = sigmoid(z_k), and its loss
L_k = 1 - 2a / ((b + eps) + (c + eps)) with a = sum p*t, b = sum p^2, c = sum t^2 (as
``kernels/dice_loss.py``). With dL_k/dz = (coef_p * p - coef_t * t) * p (1 - p):
dL/dw_k = sum over pixels of dL_k/dz * F[n],  dL/dF[n] = sum over the positives of n of w_k dL_k/dz.

The K x P logits are never stored: every kernel forms them tile by tile with ``tl.dot`` (a block of
positives of ONE image x a tile of pixels) and consumes them in its epilogue. Positives come in any
order; the host sorts them stably by image and cuts each image's run into blocks of BLOCK_K
(``_positive_blocks``), so a program's positives share one feature map.

* forward: grid (positive block, chunk of pixels); E is walked in BLOCK_E chunks; the epilogue takes
  the sigmoid and writes one partial (a, b, c) per (positive, chunk), summed over chunks on the host
  in float64.
* backward, mask features: grid (image x pixel tile). A program owns F[n, :, tile]'s gradient: it
  loads the feature tile once, runs over ALL the image's positives (ascending k) recomputing their
  logits, and stores its tile once. No atomics, no two programs writing one element.
* backward, kernels: grid (positive block, chunk of pixels), one partial gradient (E,) per
  (positive, chunk), summed over chunks on the host in float64 in a fixed order.

The backward kernels hold whole feature columns (E_PAD = E rounded up to a power of two) so that
the same tile serves both the logits and the gradient product. Matrix products run in IEEE float32
(no TF32) or float64. float16/bfloat16 inputs: the forward upcasts them to float32 tile by tile; the
backward runs on float32 copies (its kernel-gradient kernel spills with 16-bit tiles).
"""

# N=images, E=mask-feature channels, P=pixels of the mask map (H*W), K=positives,
# B=blocks of positives (each within one image), C=chunks of pixels

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import sigmoid_with_derivative

__all__ = ["BACKWARD_PIXELS_PER_CHUNK", "PIXELS_PER_CHUNK", "dynamic_mask_dice_loss_backward",
           "dynamic_mask_dice_loss_forward", "launch_config"]

# Pixels per forward / kernel-gradient program. At K = 200 positives in 8 images (~12 forward
# blocks of 32, ~30 backward blocks of 8) and P = 54,400: 27 forward chunks make ~320 programs and
# 14 backward chunks ~420, a few per H100 SM, while the float32 partials stay short sums and the
# (K, C, E) kernel-gradient partials small (3 MB).
PIXELS_PER_CHUNK = 2048
BACKWARD_PIXELS_PER_CHUNK = 4096

@triton.jit
def _dmd_fwd_kernel(
    kernels_ptr,  # (K, E) contiguous
    feats_ptr,  # (N, E, P) contiguous, kernels' dtype
    member_ptr,  # (K,) int64: positive indices sorted stably by image
    block_first_ptr,  # (B,) int64: the block's first entry in member
    block_count_ptr,  # (B,) int64: its positives (0 for the spare blocks of the grid bound)
    block_image_ptr,  # (B,) int64: the image of all its positives
    target_ptr,  # (K, P) contiguous, uint8 (0/1) or kernels' dtype
    partial_ptr,  # (K, C, 3) contiguous: a, b, c of each (positive, chunk); its dtype (fp32, fp64
    #               for fp64 inputs) is the accumulation dtype
    num_channels,  # E: the row stride of kernels
    num_pixels,  # P: the channel stride of feats and the row stride of target
    num_chunks,  # C: the stride of partial's positive axis
    pixels_per_chunk,  # a multiple of BLOCK_P
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0)
    chunk_index = tl.program_id(1)
    acc_dtype = partial_ptr.dtype.element_ty
    count = tl.load(block_count_ptr + block)
    first = tl.load(block_first_ptr + block)
    image = tl.load(block_image_ptr + block)
    rows = tl.arange(0, BLOCK_K)
    row_valid = rows < count
    positive = tl.load(member_ptr + first + rows, mask=row_valid, other=0)  # (BLOCK_K,) int64
    kernel_rows = kernels_ptr + positive * num_channels
    target_rows = target_ptr + positive * num_pixels
    # int64 image offset; offsets inside one image's E x P features stay 32-bit (host-checked).
    image_feats = feats_ptr + image * num_channels * num_pixels
    chunk_begin = chunk_index * pixels_per_chunk
    chunk_end = tl.minimum(chunk_begin + pixels_per_chunk, num_pixels)

    sum_pt = tl.zeros([BLOCK_K], dtype=acc_dtype)
    sum_pp = tl.zeros([BLOCK_K], dtype=acc_dtype)
    sum_tt = tl.zeros([BLOCK_K], dtype=acc_dtype)
    for tile_begin in range(chunk_begin, chunk_end, BLOCK_P):
        pixels = tile_begin + tl.arange(0, BLOCK_P)
        pixel_valid = pixels < num_pixels
        z = tl.zeros([BLOCK_K, BLOCK_P], dtype=acc_dtype)
        for e_begin in range(0, num_channels, BLOCK_E):
            channels = e_begin + tl.arange(0, BLOCK_E)
            channel_valid = channels < num_channels
            w = tl.load(kernel_rows[:, None] + channels[None, :],
                        mask=row_valid[:, None] & channel_valid[None, :], other=0)
            f = tl.load(image_feats + channels[:, None] * num_pixels + pixels[None, :],
                        mask=channel_valid[:, None] & pixel_valid[None, :], other=0)
            z += tl.dot(w.to(acc_dtype), f.to(acc_dtype), input_precision="ieee")
        p, _ = sigmoid_with_derivative(z)
        valid = row_valid[:, None] & pixel_valid[None, :]
        # Padding pixels have z = 0, whose p = 1/2 must not reach b.
        p = tl.where(valid, p, 0.0)
        t = tl.load(target_rows[:, None] + pixels[None, :], mask=valid, other=0).to(acc_dtype)
        sum_pt += tl.sum(p * t, axis=1)
        sum_pp += tl.sum(p * p, axis=1)
        sum_tt += tl.sum(t * t, axis=1)

    out = partial_ptr + (positive * num_chunks + chunk_index) * 3
    tl.store(out, sum_pt, mask=row_valid)
    tl.store(out + 1, sum_pp, mask=row_valid)
    tl.store(out + 2, sum_tt, mask=row_valid)


@triton.jit
def _dmd_grad_logits(w, f, target_rows, coef_ptr, positive, valid, pixels, acc_dtype):
    """dL/dz of a (positives x pixels) tile: w (BLOCK_K, E_PAD) and f (E_PAD, BLOCK_P) in acc_dtype;
    0 outside ``valid``."""
    z = tl.dot(w, f, input_precision="ieee")
    p, dp = sigmoid_with_derivative(z)
    t = tl.load(target_rows[:, None] + pixels[None, :], mask=valid, other=0).to(acc_dtype)
    coef_p = tl.load(coef_ptr + positive * 2)
    coef_t = tl.load(coef_ptr + positive * 2 + 1)
    grad = (coef_p[:, None] * p - coef_t[:, None] * t) * dp
    return tl.where(valid, grad, 0.0)


@triton.jit
def _dmd_bwd_feats_kernel(
    kernels_ptr,  # (K, E) contiguous
    feats_ptr,  # (N, E, P) contiguous, kernels' dtype
    member_ptr,  # (K,) int64: positive indices sorted stably by image
    group_start_ptr,  # (N + 1,) int64: image n holds member[group_start[n] : group_start[n + 1]]
    target_ptr,  # (K, P) contiguous, uint8 (0/1) or kernels' dtype
    coef_ptr,  # (K, 2) contiguous: [coef_p, coef_t] = g * [4a/D^2, 2/D]; its dtype (fp32, fp64
    #            for fp64 inputs) is the accumulation dtype
    grad_feats_ptr,  # (N, E, P) contiguous, feats' dtype: every element written once
    num_channels,  # E
    num_pixels,  # P
    num_tiles,  # pixel tiles per image: program image * num_tiles + tile (a 1-D grid)
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    E_PAD: tl.constexpr,  # E rounded up to a power of two (>= 16)
):
    program = tl.program_id(0)
    image = (program // num_tiles).to(tl.int64)
    tile_index = program % num_tiles
    acc_dtype = coef_ptr.dtype.element_ty
    first = tl.load(group_start_ptr + image)
    last = tl.load(group_start_ptr + image + 1)
    pixels = tile_index * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_valid = pixels < num_pixels
    channels = tl.arange(0, E_PAD)
    channel_valid = channels < num_channels
    # int64 image offset; offsets inside one image's E x P features stay 32-bit (host-checked).
    image_offset = image * num_channels * num_pixels
    feat_offsets = channels[:, None] * num_pixels + pixels[None, :]  # (E_PAD, BLOCK_P)
    feat_mask = channel_valid[:, None] & pixel_valid[None, :]
    # The image's features of this tile, read once for all its positives.
    f = tl.load(feats_ptr + image_offset + feat_offsets, mask=feat_mask, other=0).to(acc_dtype)
    grad_f = tl.zeros([E_PAD, BLOCK_P], dtype=acc_dtype)
    for block_begin in range(first, last, BLOCK_K):
        entries = block_begin + tl.arange(0, BLOCK_K)
        row_valid = entries < last
        positive = tl.load(member_ptr + entries, mask=row_valid, other=0)  # (BLOCK_K,) int64
        w = tl.load(kernels_ptr + positive[:, None] * num_channels + channels[None, :],
                    mask=row_valid[:, None] & channel_valid[None, :], other=0).to(acc_dtype)
        grad_z = _dmd_grad_logits(w, f, target_ptr + positive * num_pixels, coef_ptr, positive,
                                  row_valid[:, None] & pixel_valid[None, :], pixels, acc_dtype)
        grad_f += tl.dot(tl.trans(w), grad_z, input_precision="ieee")
    grad_f = grad_f.to(grad_feats_ptr.dtype.element_ty)
    tl.store(grad_feats_ptr + image_offset + feat_offsets, grad_f, mask=feat_mask)


@triton.jit
def _dmd_bwd_kernels_kernel(
    kernels_ptr,  # (K, E) contiguous
    feats_ptr,  # (N, E, P) contiguous, kernels' dtype
    member_ptr,  # (K,) int64: positive indices sorted stably by image
    block_first_ptr,  # (B,) int64: as the forward's
    block_count_ptr,  # (B,) int64
    block_image_ptr,  # (B,) int64
    target_ptr,  # (K, P) contiguous, uint8 (0/1) or kernels' dtype
    coef_ptr,  # (K, 2) contiguous, the accumulation dtype: as _dmd_bwd_feats_kernel's
    partial_ptr,  # (K, C, E) contiguous, the accumulation dtype: dL/dw of each (positive, chunk)
    num_channels,  # E
    num_pixels,  # P
    num_chunks,  # C
    pixels_per_chunk,  # a multiple of BLOCK_P
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    E_PAD: tl.constexpr,
):
    block = tl.program_id(0)
    chunk_index = tl.program_id(1)
    acc_dtype = coef_ptr.dtype.element_ty
    count = tl.load(block_count_ptr + block)
    first = tl.load(block_first_ptr + block)
    image = tl.load(block_image_ptr + block)
    rows = tl.arange(0, BLOCK_K)
    row_valid = rows < count
    positive = tl.load(member_ptr + first + rows, mask=row_valid, other=0)  # (BLOCK_K,) int64
    channels = tl.arange(0, E_PAD)
    channel_valid = channels < num_channels
    w = tl.load(kernels_ptr + positive[:, None] * num_channels + channels[None, :],
                mask=row_valid[:, None] & channel_valid[None, :], other=0).to(acc_dtype)
    target_rows = target_ptr + positive * num_pixels
    image_feats = feats_ptr + image * num_channels * num_pixels
    chunk_begin = chunk_index * pixels_per_chunk
    chunk_end = tl.minimum(chunk_begin + pixels_per_chunk, num_pixels)

    grad_w = tl.zeros([BLOCK_K, E_PAD], dtype=acc_dtype)
    for tile_begin in range(chunk_begin, chunk_end, BLOCK_P):
        pixels = tile_begin + tl.arange(0, BLOCK_P)
        pixel_valid = pixels < num_pixels
        f = tl.load(image_feats + channels[:, None] * num_pixels + pixels[None, :],
                    mask=channel_valid[:, None] & pixel_valid[None, :], other=0).to(acc_dtype)
        grad_z = _dmd_grad_logits(w, f, target_rows, coef_ptr, positive,
                                  row_valid[:, None] & pixel_valid[None, :], pixels, acc_dtype)
        grad_w += tl.dot(grad_z, tl.trans(f), input_precision="ieee")
    out = (partial_ptr + (positive[:, None] * num_chunks + chunk_index) * num_channels
           + channels[None, :])
    tl.store(out, grad_w, mask=row_valid[:, None] & channel_valid[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers


def launch_config(dtype: torch.dtype, num_channels: int, *, kernel: str) -> dict[str, int]:
    """Tile sizes and warps of one kernel ("forward", "feats" or "kernels") for inputs of ``dtype``.

    Float32 products run on FMA units (IEEE, not TF32), whose dot operands take many registers:
    the tiles are the largest that compile without spills for sm_80 and sm_90 (see
    ``kernels/_compile.py``). The forward holds a (32, 64) logit tile and walks E 16 channels at a
    time (32 pixels for float64 and 16-bit inputs). The backward kernels hold an (E_PAD, BLOCK_P)
    feature tile, kept near 8192 elements whatever E is, and 8 positives at a time; the
    kernel-gradient kernel also holds a (BLOCK_K, E_PAD) accumulator (float64: 16 x 16, which
    fits A100's shared memory without spilling). The backward kernels take float32 or float64 only:
    with 16-bit feature tiles the kernel-gradient kernel spills, so the launcher upcasts those.
    """
    e_pad = max(16, triton.next_power_of_2(max(num_channels, 1)))
    if kernel == "forward":
        block_p = 64 if dtype == torch.float32 else 32
        return {"BLOCK_K": 32, "BLOCK_P": block_p, "BLOCK_E": 16, "num_warps": 8}
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the backward kernels run on float32 or float64 inputs, got {dtype}")
    if kernel == "feats":
        return {"BLOCK_K": 8, "BLOCK_P": min(64, max(16, 8192 // e_pad)), "E_PAD": e_pad,
                "num_warps": 8}
    if kernel == "kernels":
        if dtype == torch.float64:
            return {"BLOCK_K": 16, "BLOCK_P": 16, "E_PAD": e_pad, "num_warps": 8}
        return {"BLOCK_K": 8, "BLOCK_P": min(32, max(16, 8192 // e_pad)), "E_PAD": e_pad,
                "num_warps": 8}
    raise ValueError(f"unknown kernel {kernel!r}")


def _check_feature_offsets(feats: Tensor) -> None:
    # The kernels offset inside one image's features with int32 (the image offset is int64).
    if feats.shape[1] * feats.shape[2] >= 2**31:
        raise ValueError(f"dynamic_mask_dice_loss (triton): one image's features must hold under "
                         f"2^31 elements, got E x P = {feats.shape[1]} x {feats.shape[2]}")


def _positive_blocks(pos_image: Tensor, num_images: int,
                     block_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Positives grouped by image and cut into blocks of at most ``block_k``, on the device.

    Returns (member (K,), group_start (N + 1,), block_first, block_count, block_image (B,)), all
    int64: image n holds member[group_start[n] : group_start[n + 1]] (ascending k: a stable sort),
    and block b the entries member[block_first[b] : block_first[b] + block_count[b]], all of image
    block_image[b]. B = ceil(K / block_k) + min(N, K) bounds the real block count without a
    device-to-host copy; the spare blocks have count 0.
    """
    device = pos_image.device
    sorted_images, member = torch.sort(pos_image, stable=True)
    images = torch.arange(num_images + 1, dtype=torch.int64, device=device)  # (N + 1,)
    group_start = torch.searchsorted(sorted_images, images)  # (N + 1,)
    blocks_per_image = (group_start[1:] - group_start[:-1] + block_k - 1) // block_k  # (N,)
    block_end = torch.cumsum(blocks_per_image, 0)  # (N,): one past each image's last block
    num_blocks = -(-pos_image.shape[0] // block_k) + min(num_images, pos_image.shape[0])
    blocks = torch.arange(num_blocks, dtype=torch.int64, device=device)  # (B,)
    # The image of block b is the first whose blocks end after b (N for the spare blocks).
    block_image = torch.searchsorted(block_end, blocks, right=True)  # (B,)
    real = block_image < num_images
    block_image = block_image.clamp(max=num_images - 1)
    local = blocks - (block_end[block_image] - blocks_per_image[block_image])
    block_first = group_start[block_image] + local * block_k
    block_count = torch.minimum(group_start[block_image + 1] - block_first,
                                torch.full_like(block_first, block_k))
    block_count = torch.where(real, block_count, 0)
    block_first = torch.where(real, block_first, 0)
    return (member.contiguous(), group_start.contiguous(), block_first.contiguous(),
            block_count.contiguous(), block_image.contiguous())


def _as_target(target: Tensor) -> Tensor:
    # bool storage is 0/1 bytes: read it as uint8 (Triton has no bool pointer loads to fp).
    return target.view(torch.uint8) if target.dtype == torch.bool else target


def dynamic_mask_dice_loss_forward(kernels: Tensor, mask_feats: Tensor, pos_image: Tensor,
                                   target: Tensor, eps: float, *,
                                   pixels_per_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Dice loss of every positive's mask sigmoid(kernels[k] . mask_feats[pos_image[k]]).

    Args:
        kernels: (K, E) dynamic kernels; float16, bfloat16, float32 or float64; CUDA, or CPU under
            ``TRITON_INTERPRET=1`` (which has no bfloat16).
        mask_feats: (N, E, P) mask features, kernels' dtype and device.
        pos_image: (K,) int64 in [0, N), in any order, duplicates allowed.
        target: (K, P) uint8 (0/1), bool or kernels' dtype.
        eps: added to each of the two squared sums.
        pixels_per_chunk: pixels per program, rounded up to whole tiles; None:
            ``PIXELS_PER_CHUNK``. For tests.

    Returns:
        loss: (K,) in kernels' dtype, ``1 - 2a / ((b + eps) + (c + eps))`` computed in float64.
        sums: (K, 3) float64, ``[a, b, c]`` without eps.

    Raises:
        ValueError: one image's features hold 2^31 elements or more (Triton's int32 offsets).
            The other rules, pos_image's range included, are checked before:
            ``solo_fast.ops.dynamic_mask_dice_loss``'s contract.
    """
    _check_feature_offsets(mask_feats)
    kernels, mask_feats = kernels.contiguous(), mask_feats.contiguous()
    target, pos_image = _as_target(target.contiguous()), pos_image.contiguous()
    num_images, num_channels, num_pixels = mask_feats.shape
    num_positives = kernels.shape[0]
    if num_positives == 0 or num_pixels == 0:
        empty = _common.dice_partials(num_positives, 0, kernels)  # (K, 0, 3)
        return _common.loss_and_sums(empty, eps, kernels.dtype)

    config = launch_config(kernels.dtype, num_channels, kernel="forward")
    block_k, block_p = config["BLOCK_K"], config["BLOCK_P"]
    pixels_per_chunk, num_chunks = _common.grid_layout(
        num_pixels, block_p, PIXELS_PER_CHUNK if pixels_per_chunk is None else pixels_per_chunk,
        "dynamic_mask_dice_loss")
    member, _, block_first, block_count, block_image = _positive_blocks(
        pos_image, num_images, block_k)
    partials = _common.dice_partials(num_positives, num_chunks, kernels)  # (K, chunks, 3)
    with _common.device_guard(kernels):
        _dmd_fwd_kernel[(block_first.shape[0], num_chunks)](
            kernels, mask_feats, member, block_first, block_count, block_image, target, partials,
            num_channels, num_pixels, num_chunks, pixels_per_chunk, **config)
    return _common.loss_and_sums(partials, eps, kernels.dtype)


def dynamic_mask_dice_loss_backward(grad_loss: Tensor, kernels: Tensor, mask_feats: Tensor,
                                    pos_image: Tensor, target: Tensor, sums: Tensor, eps: float,
                                    *, pixels_per_chunk: int | None = None
                                    ) -> tuple[Tensor, Tensor]:
    """Gradients of the loss with respect to kernels and mask_feats; recomputes the logits.

    Args:
        grad_loss: (K,) upstream gradient of the loss, any floating dtype.
        kernels, mask_feats, pos_image, target: as in ``dynamic_mask_dice_loss_forward``.
        sums: (K, 3) ``[a, b, c]`` returned by ``dynamic_mask_dice_loss_forward``.
        eps: the forward's eps.
        pixels_per_chunk: pixels per program of the kernel gradient; None:
            ``BACKWARD_PIXELS_PER_CHUNK``. For tests.

    Returns:
        (grad_kernels (K, E), grad_mask_feats (N, E, P)), in kernels' dtype; the features of images
        without positives get 0. 16-bit inputs are computed on float32 copies.

    Raises:
        ValueError: one image's features hold 2^31 elements or more (Triton's int32 offsets).
            The other rules, pos_image's range included, are checked before:
            ``solo_fast.ops.dynamic_mask_dice_loss``'s contract.
    """
    _check_feature_offsets(mask_feats)
    num_images, num_channels, num_pixels = mask_feats.shape
    num_positives = kernels.shape[0]
    if num_positives == 0 or num_pixels == 0:
        return torch.zeros_like(kernels), torch.zeros_like(mask_feats)
    out_dtype = kernels.dtype
    acc_dtype = _common.accumulation_dtype(kernels.dtype)
    # 16-bit inputs: the float32 kernels on float32 copies (see launch_config), results cast back.
    kernels = kernels.to(acc_dtype).contiguous()  # (K, E)
    mask_feats = mask_feats.to(acc_dtype).contiguous()  # (N, E, P)
    target, pos_image = _as_target(target.contiguous()), pos_image.contiguous()
    if target.dtype not in (torch.uint8, acc_dtype):
        target = target.to(acc_dtype)

    coefs = _common.dice_coefficients(grad_loss, sums, eps, acc_dtype)  # (K, 2)

    feats_config = launch_config(kernels.dtype, num_channels, kernel="feats")
    kernels_config = launch_config(kernels.dtype, num_channels, kernel="kernels")
    pixels_per_chunk, num_chunks = _common.grid_layout(
        num_pixels, kernels_config["BLOCK_P"],
        BACKWARD_PIXELS_PER_CHUNK if pixels_per_chunk is None else pixels_per_chunk,
        "dynamic_mask_dice_loss")
    member, group_start, block_first, block_count, block_image = _positive_blocks(
        pos_image, num_images, kernels_config["BLOCK_K"])
    grad_feats = torch.empty_like(mask_feats)
    partials = torch.empty((num_positives, num_chunks, num_channels), dtype=acc_dtype,
                           device=kernels.device)  # (K, C, E)
    num_tiles = -(-num_pixels // feats_config["BLOCK_P"])
    with _common.device_guard(kernels):
        if num_channels > 0:
            _dmd_bwd_feats_kernel[(num_images * num_tiles,)](
                kernels, mask_feats, member, group_start, target, coefs, grad_feats,
                num_channels, num_pixels, num_tiles, **feats_config)
            _dmd_bwd_kernels_kernel[(block_first.shape[0], num_chunks)](
                kernels, mask_feats, member, block_first, block_count, block_image, target,
                coefs, partials, num_channels, num_pixels, num_chunks, pixels_per_chunk,
                **kernels_config)
    grad_kernels = partials.to(torch.float64).sum(dim=1).to(out_dtype)  # (K, E)
    return grad_kernels, grad_feats.to(out_dtype)
