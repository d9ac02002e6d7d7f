"""Readable PyTorch references of solo_fast's fused ops.

Each function states the maths of one op in plain tensor operations, as mmdetection 3.3 computes it.
Every compiled or Triton backend is tested against these; autograd differentiates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["decoupled_dice_loss_reference", "decoupled_mask_scores_reference",
           "dice_loss_reference", "dynamic_mask_dice_loss_reference",
           "dynamic_mask_scores_reference", "matrix_nms_reference", "pack_masks_reference",
           "solo_mask_scores_reference", "unpack_masks_reference"]


def dice_loss_reference(pred: Tensor, target: Tensor, *, logits: bool = True,
                        eps: float = 1e-3) -> Tensor:
    """Per-mask dice loss of SOLO (mmdetection ``DiceLoss``, ``naive_dice=False``, unweighted).

    Args:
        pred: (N, ...) logits (``logits=True``) or probabilities, any floating dtype.
        target: (N, ...) with pred's shape; bool, uint8 or floating.
        logits: apply a sigmoid to ``pred`` first.
        eps: added to each of the two squared sums.

    Returns:
        (N,) in pred's dtype: ``1 - 2 sum(p t) / ((sum(p^2) + eps) + (sum(t^2) + eps))``.
    """
    p = pred.sigmoid() if logits else pred
    p = p.flatten(1)  # (N, P)
    t = target.flatten(1).to(p.dtype)  # (N, P)
    a = (p * t).sum(1)
    b = (p * p).sum(1) + eps
    c = (t * t).sum(1) + eps
    return 1 - 2 * a / (b + c)


def decoupled_dice_loss_reference(x_logits: Tensor, y_logits: Tensor, pos_image: Tensor,
                                  pos_row: Tensor, pos_col: Tensor, target: Tensor, *,
                                  eps: float = 1e-3) -> Tensor:
    """Dice loss of Decoupled SOLO's positives (mmdetection ``DecoupledSOLOHead.loss_by_feat``).

    The soft mask of positive k is ``sigmoid(y_logits[n, i]) * sigmoid(x_logits[n, j])`` with
    n, i, j = ``pos_image[k], pos_row[k], pos_col[k]``: channel i of Y is grid row i, channel j of
    X grid column j. Its dice loss (:func:`dice_loss_reference`, no further activation) against
    ``target[k]``.

    Args:
        x_logits: (N, S, H, W) floating logits of the X branch.
        y_logits: (N, S, H, W) floating logits of the Y branch, x_logits' dtype.
        pos_image: (K,) int64 image of each positive.
        pos_row: (K,) int64 grid row of each positive, in [0, S).
        pos_col: (K,) int64 grid column of each positive, in [0, S).
        target: (K, H, W) bool, uint8 or floating mask of each positive.
        eps: added to each of the two squared sums.

    Returns:
        (K,) in x_logits' dtype.
    """
    # N=images, S=grid side, K=positives, H, W=mask-map size
    n, s, h, w = x_logits.shape
    # The sigmoid of a whole level, then the rows of the positives: elementwise the same values as
    # the sigmoid of every positive's copy, and cheaper once positives share rows.
    prob_x = x_logits.sigmoid().reshape(n * s, h, w).index_select(0, pos_image * s + pos_col)
    prob_y = y_logits.sigmoid().reshape(n * s, h, w).index_select(0, pos_image * s + pos_row)
    # prob_x, prob_y: (K, H, W)
    return dice_loss_reference(prob_y * prob_x, target, logits=False, eps=eps)


def dynamic_mask_dice_loss_reference(kernels: Tensor, mask_feats: Tensor, pos_image: Tensor,
                                     target: Tensor, *, eps: float = 1e-3) -> Tensor:
    """Dice loss of SOLOv2's dynamic masks (mmdetection ``SOLOV2Head.loss_by_feat``,
    docs/algorithms.md §7.3).

    The logits of positive k are the 1x1 convolution of its image's mask features with its
    kernel, ``z_k = sum_e kernels[k, e] * mask_feats[pos_image[k], e]``; their dice loss
    (:func:`dice_loss_reference`, sigmoid inside) against ``target[k]``. Positives may come in
    any order and repeat.

    Args:
        kernels: (K, E) floating, one dynamic kernel per positive.
        mask_feats: (N, E, H, W) floating mask features, kernels' dtype.
        pos_image: (K,) int64 image of each positive, in [0, N).
        target: (K, H, W) bool, uint8 or floating mask of each positive.
        eps: added to each of the two squared sums.

    Returns:
        (K,) in kernels' dtype.
    """
    # N=images, E=mask-feature channels, K=positives, H, W=mask-map size
    n, e, h, w = mask_feats.shape
    logits = kernels.new_zeros((kernels.shape[0], h * w))  # (K, H*W)
    # One matmul per image on its positives, as mmdetection runs one conv2d per image.
    for image in range(n):
        selected = (pos_image == image).nonzero().squeeze(1)  # (K_n,)
        features = mask_feats[image].reshape(e, h * w)  # (E, H*W)
        logits = logits.index_copy(0, selected, kernels[selected] @ features)
    logits = logits.reshape(kernels.shape[0], h, w)  # (K, H, W)
    return dice_loss_reference(logits, target, logits=True, eps=eps)


_MATRIX_NMS_KERNELS = ("gaussian", "linear")


def matrix_nms_reference(masks: Tensor, labels: Tensor, scores: Tensor, *,
                         filter_thr: float = -1.0, nms_pre: int = -1, max_num: int = -1,
                         kernel: str = "gaussian", sigma: float = 2.0,
                         mask_area: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Matrix NMS of SOLOv2 (mmdetection ``mask_matrix_nms``, docs/algorithms.md §11), step for
    step.

    Candidates are sorted by score (descending) and cut to ``nms_pre``. For i < j (i scored
    higher), d_ij = IoU(i, j) when both have the same label and 0 otherwise; comp_i = max_k d_ki
    is how much candidate i is itself suppressed. Candidate j's score is multiplied by
    ``decay_j = min_i f(d_ij) / f(comp_i)``, with f(x) = exp(-sigma x^2) (gaussian) or 1 - x
    (linear). Scores below ``filter_thr`` are dropped, the rest sorted again and cut to
    ``max_num``.

    Two behaviours are defined here where mmdetection leaves them to chance or to NaN:

    * **Ties.** Both sorts are stable: equal input scores are ordered by ascending input index,
      and equal decayed scores keep the order of the first sort. mmdetection's ``torch.sort`` is
      not stable, so its order for ties (and hence the decay, which depends on the order) is
      whatever the sort implementation returns; the order chosen here is one of those.
    * **Linear kernel, identical masks.** When candidate i is identical to a higher-scored mask of
      its class (comp_i = 1) and j is identical to i (d_ij = 1), the ratio (1 - d_ij) /
      (1 - comp_i) is 0/0, which mmdetection turns into NaN and ``min`` propagates: the decayed
      score is NaN, sorts first and survives a disabled filter. Here that ratio is 0, its limit
      and the value every other ratio takes for a mask fully covered by a higher-scored one
      (d_ij = 1 with comp_i < 1 gives 0 / positive = 0); j is then completely suppressed
      (decay 0). Other ratios with comp_i = 1 are +inf, as in mmdetection, and never the minimum.
      The gaussian kernel has no such case.

    What stays as in mmdetection: ``mask_area`` is used as given (not checked against the masks);
    two empty same-class masks make an IoU of 0/0 = NaN that poisons every decay (the heads never
    pass empty masks: they require area > stride); ``filter_thr``, ``nms_pre`` and ``max_num``
    apply only when > 0, and the filter keeps ``score >= filter_thr``.

    Args:
        masks: (N, H, W) binary masks; bool, uint8 or floating 0/1.
        labels: (N,) class of each mask, integer.
        scores: (N,) floating scores.
        filter_thr: Keep decayed scores >= filter_thr; no filter when <= 0.
        nms_pre: Decay only the ``nms_pre`` best-scored candidates (all when <= 0).
        max_num: Return at most ``max_num`` candidates (all when <= 0).
        kernel: ``"gaussian"`` or ``"linear"``.
        sigma: Gaussian kernel parameter (exp(-sigma * iou^2)); unused by the linear kernel.
        mask_area: (N,) floating area of each mask; None computes ``masks.sum((1, 2))`` as float.

    Returns:
        ``(scores, labels, masks, keep_inds)`` of the n kept candidates, sorted by decayed score
        (descending): scores (n,) decayed, in scores' dtype; labels (n,); masks (n, H, W) in
        masks' dtype; keep_inds (n,) int64 indices into the inputs.

    Raises:
        ValueError: masks not 3-D, labels / scores not 1-D, lengths that disagree, or an unknown
            kernel.
    """
    _check_matrix_nms_inputs(masks, labels, scores, mask_area, kernel)
    num = masks.shape[0]
    if num == 0:
        return _empty_matrix_nms(masks, labels, scores)
    if mask_area is None:
        mask_area = masks.sum((1, 2)).float()

    scores, order = torch.sort(scores, descending=True, stable=True)
    if 0 < nms_pre < num:
        order, scores = order[:nms_pre], scores[:nms_pre]
    keep_inds = order
    masks, mask_area, labels = masks[order], mask_area[order], labels[order]

    num = len(order)
    flat = masks.reshape(num, -1).float()  # (n, H*W)
    inter = torch.mm(flat, flat.transpose(1, 0))  # (n, n)
    area = mask_area.expand(num, num)  # (n, n): area[i, j] = area of j
    iou = (inter / (area + area.transpose(1, 0) - inter)).triu(diagonal=1)
    same_label = (labels[:, None] == labels[None, :]).triu(diagonal=1)  # (n, n)
    decay_iou = iou * same_label  # d_ij, (n, n)
    # Row i of the compensation matrix is comp_i, the largest d that candidate i itself receives.
    compensate_iou, _ = decay_iou.max(0)
    compensate_iou = compensate_iou.expand(num, num).transpose(1, 0)  # (n, n)
    if kernel == "gaussian":
        decay = torch.exp(-1 * sigma * (decay_iou**2))
        compensate = torch.exp(-1 * sigma * (compensate_iou**2))
        decay_coefficient, _ = (decay / compensate).min(0)
    else:
        numerator, denominator = 1 - decay_iou, 1 - compensate_iou
        ratio = numerator / denominator
        ratio = torch.where((numerator == 0) & (denominator == 0), 0.0, ratio)  # 0/0 -> 0
        decay_coefficient, _ = ratio.min(0)
    scores = scores * decay_coefficient

    if filter_thr > 0:
        keep = scores >= filter_thr
        if not keep.any():
            return _empty_matrix_nms(masks, labels, scores)
        keep_inds, masks, scores, labels = keep_inds[keep], masks[keep], scores[keep], labels[keep]

    scores, order = torch.sort(scores, descending=True, stable=True)
    if 0 < max_num < len(order):
        order, scores = order[:max_num], scores[:max_num]
    return scores, labels[order], masks[order], keep_inds[order]


def _check_matrix_nms_inputs(masks: Tensor, labels: Tensor, scores: Tensor,
                             mask_area: Tensor | None, kernel: str) -> None:
    if masks.dim() != 3:
        raise ValueError(f"masks must be 3-D (N, H, W), got shape {tuple(masks.shape)}")
    num = masks.shape[0]
    named = {"labels": labels, "scores": scores}
    if mask_area is not None:
        named["mask_area"] = mask_area
    for name, tensor in named.items():
        if tensor.dim() != 1 or tensor.shape[0] != num:
            raise ValueError(f"{name} must have shape ({num},), one entry per mask, "
                             f"got {tuple(tensor.shape)}")
    if kernel not in _MATRIX_NMS_KERNELS:
        raise ValueError(f"kernel must be one of {_MATRIX_NMS_KERNELS}, got {kernel!r}")


def _empty_matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (scores.new_zeros(0), labels.new_zeros(0), masks.new_zeros(0, *masks.shape[-2:]),
            torch.zeros(0, dtype=torch.int64, device=labels.device))


_WORD_BITS = 64


def pack_masks_reference(masks: Tensor) -> Tensor:
    """Binary masks bit-packed, in the layout of the ``matrix_nms_pack`` op.

    Args:
        masks: (n, H, W) bool (or 0/1 of any dtype: nonzero = inside).

    Returns:
        (n, Wd) int64, Wd = ceil(H * W / 64): bit b of word w is pixel 64 w + b of the row-major
        flattened mask; the bits past H * W are zero.
    """
    # n=masks, P=H*W pixels, Wd=words
    num = masks.shape[0]
    pixels = masks.shape[1] * masks.shape[2]
    words = -(-pixels // _WORD_BITS)
    if words == 0:  # torch cannot view the empty bytes of this case as int64
        return torch.zeros((num, 0), dtype=torch.int64, device=masks.device)
    flat = torch.zeros((num, words * _WORD_BITS), dtype=torch.uint8, device=masks.device)
    flat[:, :pixels] = masks.reshape(num, pixels) != 0  # (n, Wd * 64), the tail zero
    # 8 pixels -> a byte (distinct powers of two: their sum is their OR); 8 bytes -> a word,
    # byte j holding pixels 8j .. 8j + 7 (torch's int64 is little-endian on every platform)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=masks.device)
    return (flat.view(num, words * 8, 8) * weights).sum(2, dtype=torch.uint8).view(
        torch.int64)  # (n, Wd * 8) bytes -> (n, Wd)


def unpack_masks_reference(packed: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_masks_reference`: (n, Wd) int64 -> (n, height, width) bool."""
    # n=masks, Wd=words
    num, words = packed.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.contiguous().view(torch.uint8)[:, :, None] >> shifts) & 1  # (n, Wd * 8, 8)
    return bits.reshape(num, words * _WORD_BITS)[:, :height * width].bool().reshape(
        num, height, width)  # (n, Wd * 64) -> (n, H, W)


def dynamic_mask_scores_reference(kernels: Tensor, mask_feats: Tensor, image: Tensor, *,
                                  threshold: float, pack_masks: bool = False
                                  ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Area and soft sum of SOLOv2's candidate masks (mmdetection ``SOLOV2Head``,
    docs/algorithms.md §10.3-10.6).

    Per image, as mmdetection does: the candidates' soft masks are the 1 x 1 convolution of the
    image's mask features with their dynamic kernels, then a sigmoid; the binary mask is
    ``soft > threshold``. Every soft mask is materialised (K x H x W), which is what the fused
    backends avoid.

    Args:
        kernels: (K, E) floating dynamic kernels of the candidates.
        mask_feats: (N, E, H, W) mask features, kernels' dtype.
        image: (K,) int64 in [0, N), the image of each candidate, any order.
        threshold: the mask threshold (mmdetection's ``mask_thr``, 0.5), compared in the soft
            masks' dtype.
        pack_masks: Also return the binary masks, bit-packed (:func:`pack_masks_reference`).

    Returns:
        ``(area, soft_sum)``: area (K,) int64, the pixel count of ``soft > threshold``;
        soft_sum (K,) float64, the sum of ``soft`` over those pixels. With ``pack_masks``,
        ``(area, soft_sum, packed)``: packed (K, Wd) int64, Wd = ceil(H * W / 64), row k the
        packed ``soft > threshold`` of candidate k.
    """
    # K=candidates, E=mask-feature channels, N=images, H, W=mask-map size, Wd=packed words
    num = kernels.shape[0]
    height, width = mask_feats.shape[-2:]
    area = torch.zeros(num, dtype=torch.int64, device=kernels.device)
    soft_sum = torch.zeros(num, dtype=torch.float64, device=kernels.device)
    packed = torch.zeros((num, -(-height * width // _WORD_BITS)), dtype=torch.int64,
                         device=kernels.device)  # (K, Wd)
    result = (area, soft_sum, packed) if pack_masks else (area, soft_sum)
    if height * width == 0:  # no pixel: F.conv2d would reject the empty map
        return result
    for n in range(mask_feats.shape[0]):
        members = (image == n).nonzero().squeeze(1)
        if members.numel() == 0:
            continue
        weight = kernels[members][:, :, None, None]  # (K_n, E, 1, 1)
        soft = F.conv2d(mask_feats[n:n + 1], weight).sigmoid()[0]  # (K_n, H, W)
        masks = soft > threshold
        area[members] = masks.sum((1, 2))
        soft_sum[members] = (soft * masks).sum((1, 2), dtype=torch.float64)
        if pack_masks:
            packed[members] = pack_masks_reference(masks)
    return result


def decoupled_mask_scores_reference(x_probs: Tensor, y_probs: Tensor, image: Tensor, row: Tensor,
                                    col: Tensor, *, threshold: float) -> tuple[Tensor, Tensor]:
    """Area and soft sum of Decoupled SOLO's candidate masks (mmdetection
    ``DecoupledSOLOHead``, docs/algorithms.md §10.3-10.6).

    The soft mask of candidate k is ``y_probs[n, i] * x_probs[n, j]`` with n, i, j =
    ``image[k], row[k], col[k]`` (channels of the levels' concatenated maps); the binary mask is
    ``soft > threshold``. Every soft mask is materialised (K x H x W).

    Args:
        x_probs: (N, C, H, W) floating probabilities of the X branch (sigmoid, upsampled).
        y_probs: (N, C, H, W) probabilities of the Y branch, x_probs' dtype.
        image: (K,) int64 in [0, N), the image of each candidate.
        row: (K,) int64 in [0, C), the Y channel of each candidate.
        col: (K,) int64 in [0, C), the X channel of each candidate.
        threshold: the mask threshold, compared in the soft masks' dtype.

    Returns:
        ``(area, soft_sum)`` as :func:`dynamic_mask_scores_reference`.
    """
    soft = y_probs[image, row] * x_probs[image, col]  # (K, H, W)
    masks = soft > threshold
    return masks.sum((1, 2)), (soft * masks).sum((1, 2), dtype=torch.float64)


# Candidates whose soft masks solo_mask_scores_reference holds at a time (64 x 200 x 272 fp32 =
# 14 MB at 800 x 1088).
_SOLO_SCORES_CHUNK = 64


def solo_mask_scores_reference(mask_preds: Tensor, image: Tensor, channel: Tensor, *,
                               size: tuple[int, int], threshold: float,
                               logits: bool = True) -> tuple[Tensor, Tensor]:
    """Area and soft sum of vanilla SOLO's candidate masks (mmdetection ``SOLOHead``,
    docs/algorithms.md §10.3-10.6).

    The soft mask of candidate k is channel ``channel[k]`` of image ``image[k]`` of one level,
    activated (sigmoid, in the inputs' dtype) and resized bilinearly to ``size``
    (align_corners=False), as mmdetection's eval forward resizes the whole level; the binary mask
    is ``soft > threshold``. Chunks of candidates are gathered, activated and resized at a time.

    Args:
        mask_preds: (N, Q, h, w) floating mask logits (``logits=True``) or probabilities of one
            level.
        image: (K,) int64 in [0, N), the image of each candidate.
        channel: (K,) int64 in [0, Q), the channel (grid cell) of each candidate.
        size: (H, W), the level-0 mask-map size.
        threshold: the mask threshold, compared in the soft masks' dtype.
        logits: apply the sigmoid first.

    Returns:
        ``(area, soft_sum)`` as :func:`dynamic_mask_scores_reference`.
    """
    area = torch.zeros(image.shape[0], dtype=torch.int64, device=mask_preds.device)
    soft_sum = torch.zeros(image.shape[0], dtype=torch.float64, device=mask_preds.device)
    for start in range(0, image.shape[0], _SOLO_SCORES_CHUNK):
        chunk = slice(start, start + _SOLO_SCORES_CHUNK)
        maps = mask_preds[image[chunk], channel[chunk]]  # (k, h, w)
        probs = maps.sigmoid() if logits else maps
        # one image of k channels, as the eval forward resizes a level
        soft = F.interpolate(probs[None], size=tuple(size), mode="bilinear",
                             align_corners=False)[0]  # (k, H, W)
        masks = soft > threshold
        area[chunk] = masks.sum((1, 2))
        soft_sum[chunk] = (soft * masks).sum((1, 2), dtype=torch.float64)
    return area, soft_sum
