"""The fused, batched post-processing: the default path of every family (docs/algorithms.md
§10, §10.10).

It computes what :mod:`.reference` computes, in another order, so that no step holds a soft mask
per candidate:

1. area and maskness sum of EVERY candidate of the batch from the family's fused scoring op
   (:meth:`CandidateMasks.scores`), without storing their soft masks; SOLOv2's op also writes
   every candidate's binary mask bit-packed (P / 8 bytes a candidate);
2. small-mask filter, maskness rescoring and the per-image ``nms_pre`` cut, vectorised over the
   batch: the cut picks exactly the candidates the reference's matrix NMS keeps after its own
   (stable) sort, ties by candidate order;
3. binary masks of those <= nms_pre per image only into matrix NMS, one
   :func:`solo_fast.ops.batched_matrix_nms` call for the batch: SOLOv2 hands over the rows of its
   packed masks; the other families build bool masks from their soft masks in chunks;
4. soft masks of the <= max_per_img kept per image only, resized to the original size in chunks
   (:func:`.common.resize_to_original`), with the boxes and optionally COCO RLE taken from each
   chunk, so no step holds full-size masks of more than one chunk besides the bool output.

Results equal the reference's (labels, order, masks) except where a score lands within rounding of
another: the maskness sum is accumulated in float64 here and in float32 there, so scores differ by
~1e-7 relative (tests allow 1e-6). SOLOv2's binary masks into matrix NMS are the scoring op's
(the pixels counted in its area), where the reference thresholds its own soft masks: they can
differ only at pixels whose soft value lies within a few ulp of ``mask_thr``.
"""

# N=images, K=candidates of the batch, M=candidates into matrix NMS (<= nms_pre per image),
# H4, W4=stride-4 mask map, H0, W0=original size, Wd=ceil(H4 * W4 / 64) words of a packed mask

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from solo_fast import ops
from solo_fast.config import TestConfig
from solo_fast.postprocess.common import (
    CandidateMasks,
    Candidates,
    Size,
    boxes_of_thresholded,
    encode_rle,
    resize_to_original,
)

__all__ = ["MASK_CHUNK", "RESIZE_CHUNK", "NMSResult", "matrix_nms_by_image", "nms_pre_cut",
           "predict_fused"]

# Candidates per chunk when stride-4 masks are built (64 x 200 x 272 fp32 = 14 MB at 800 x 1088)
MASK_CHUNK = 64
# Kept instances per chunk of the final resize (8 x 800 x 1088 fp32 = 28 MB on the canvas)
RESIZE_CHUNK = 8


class NMSResult(NamedTuple):
    """Matrix NMS of one image.

    Attributes:
        keep: (n,) int64 indices into the batch-level inputs of :func:`matrix_nms_by_image`.
        scores: (n,) decayed scores, descending.
        labels: (n,) int64 labels.
    """

    keep: Tensor
    scores: Tensor
    labels: Tensor


def predict_fused(masks: CandidateMasks, candidates: Candidates, *, test_cfg: TestConfig,
                  strides: Sequence[int], mask_stride: int, image_sizes: Size,
                  original_sizes: Size, backend: str | None,
                  mask_format: str) -> list[dict[str, Any]]:
    """Instances per image from a batch's candidates, steps 1-4 of the module docstring.

    Args:
        masks: The family's soft masks of ``candidates``.
        candidates: The batch's candidates (:func:`.common.select_candidates`).
        test_cfg: Thresholds and matrix-NMS settings.
        strides: Per-level stride of the small-mask filter (area > stride, in stride-4 pixels).
        mask_stride: Stride of the mask map: the padded canvas is mask_stride x its size.
        image_sizes, original_sizes: N pairs (h, w), as :class:`.processor.PostProcessor` takes.
        backend: The ops' backend (None: their default).
        mask_format: ``"bool"`` or ``"rle"``.

    Returns:
        Per image, as :class:`.processor.PostProcessor` returns.
    """
    num_images = len(image_sizes)
    device = candidates.score.device
    if len(candidates.score):
        scored = masks.scores(test_cfg.mask_thr, backend)
    else:  # no op call on empty inputs: nothing to score
        scored = ops.MaskScores(torch.zeros(0, dtype=torch.int64, device=device),
                                torch.zeros(0, dtype=torch.float64, device=device), None)
    area, soft_sum = scored.area, scored.soft_sum  # (K,), (K,)
    # The area is in mask-map pixels yet compared with the level's stride, as mmdetection does
    level_strides = torch.tensor(tuple(strides), dtype=torch.int64, device=device)
    passes = (area > level_strides[candidates.level]).nonzero().squeeze(1)  # (K',)
    scores = candidates.score[passes] * (soft_sum[passes] / area[passes]).to(
        candidates.score.dtype)  # class score x maskness (mean probability in the mask)
    cut = nms_pre_cut(scores, candidates.image[passes], test_cfg.nms_pre)  # (M,) into passes
    chosen, nms_scores = passes[cut], scores[cut]

    if scored.packed is not None:  # the scoring op wrote them: no second pass over the logits
        binary = ops.PackedMasks(scored.packed[chosen], *masks.size)  # (M, Wd)
    else:
        binary = torch.empty((len(chosen), *masks.size), dtype=torch.bool, device=device)
        for start in range(0, len(chosen), MASK_CHUNK):  # (M, H4, W4) binary, chunk by chunk
            binary[start:start + MASK_CHUNK] = masks.soft(chosen[start:start + MASK_CHUNK]) \
                > test_cfg.mask_thr
    kept = matrix_nms_by_image(binary, candidates.label[chosen], nms_scores,
                               area[chosen].to(nms_scores.dtype), candidates.image[chosen],
                               num_images=num_images, test_cfg=test_cfg, backend=backend,
                               check_index=False)
    del binary, scored  # the packed masks of every candidate are no longer needed

    canvas = (masks.size[0] * mask_stride, masks.size[1] * mask_stride)
    results = []
    for image, result in enumerate(kept):
        final, boxes = _final_chunks(masks, chosen[result.keep], canvas, image_sizes[image],
                                     original_sizes[image], test_cfg.mask_thr, mask_format)
        results.append({"masks": final, "labels": result.labels.long(),
                        "scores": result.scores.float(), "boxes": boxes})
    return results


def nms_pre_cut(scores: Tensor, image: Tensor, nms_pre: int) -> Tensor:
    """The best ``nms_pre`` candidates of each image, for the whole batch at once.

    Args:
        scores: (K,) floating scores.
        image: (K,) int64 image of each candidate.
        nms_pre: Candidates kept per image; all when <= 0.

    Returns:
        (M,) int64 indices into ``scores``: image by image (ascending), within an image by score
        (descending), equal scores by index (ascending), as a stable sort of each image's
        candidates by score would order them.
    """
    order = torch.sort(scores, descending=True, stable=True).indices  # (K,)
    order = order[torch.sort(image[order], stable=True).indices]  # image-major, then score
    if nms_pre <= 0 or len(order) == 0:
        return order
    counts = torch.bincount(image, minlength=int(image.max()) + 1)  # (N',)
    first = counts.cumsum(0) - counts  # position of each image's first candidate in order
    rank = torch.arange(len(order), device=order.device) - first[image[order]]
    return order[rank < nms_pre]


def matrix_nms_by_image(masks: Tensor | ops.PackedMasks, labels: Tensor, scores: Tensor,
                        mask_area: Tensor, image: Tensor, *, num_images: int,
                        test_cfg: TestConfig, backend: str | None = None,
                        check_index: bool = True) -> list[NMSResult]:
    """Matrix NMS of every image of a batch with ``test_cfg``'s settings, split per image
    (docs/algorithms.md §11): one :func:`solo_fast.ops.batched_matrix_nms` call.

    Args:
        masks: (M, H4, W4) bool binary masks of the candidates of all images, concatenated, or
            the same masks bit-packed (:class:`~solo_fast.ops.PackedMasks`).
        labels: (M,) int64 labels.
        scores: (M,) floating (maskness-rescored) scores.
        mask_area: (M,) floating areas of ``masks``.
        image: (M,) int64 image of each candidate, in [0, num_images); any order. Within an
            image, equal scores are ordered by their position in these inputs.
        num_images: N, the batch size (images without candidates get empty results).
        test_cfg: nms_pre, max_per_img, kernel, sigma, filter_thr.
        backend: The op's backend (None: its default).
        check_index: Check that ``image`` lies in [0, num_images) (one device-to-host copy);
            the fused path passes False, its candidates' images being in range by construction.

    Returns:
        N results: per image the kept candidates' indices into these inputs, decayed scores and
        labels, by decayed score (descending), at most ``max_per_img``.
    """
    nms_scores, nms_labels, _, keep, counts = ops.batched_matrix_nms(
        masks, labels, scores, image, num_images=num_images, mask_area=mask_area,
        nms_pre=test_cfg.nms_pre, max_num=test_cfg.max_per_img, kernel=test_cfg.kernel,
        sigma=test_cfg.sigma, filter_thr=test_cfg.filter_thr, backend=backend,
        check_index=check_index)
    split = counts.tolist()
    return [NMSResult(*parts) for parts in zip(keep.split(split), nms_scores.split(split),
                                               nms_labels.split(split))]


def _final_chunks(masks: CandidateMasks, index: Tensor, canvas: tuple[int, int],
                  image_size: tuple[int, int], original_size: tuple[int, int], threshold: float,
                  mask_format: str) -> tuple[Tensor | list[dict[str, Any]], Tensor]:
    """Final masks (bool (k, H0, W0) or k RLE dicts) and boxes of one image, chunk by chunk."""
    original = tuple(int(v) for v in original_size)
    device = index.device
    boxes = torch.zeros((len(index), 4), dtype=torch.float32, device=device)
    dense = (torch.zeros((len(index), *original), dtype=torch.bool, device=device)
             if mask_format == "bool" else None)
    encoded: list[dict[str, Any]] = []
    for group in range(0, len(index), MASK_CHUNK):
        # stride-4 soft masks a group at a time: SOLOv2's GEMM reads every mask feature once per
        # call, so 13 calls of 8 kernels took 109 ms where one of 100 took 32 ms
        small = masks.soft(index[group:group + MASK_CHUNK])  # (g, H4, W4)
        for offset in range(0, len(small), RESIZE_CHUNK):
            start = group + offset
            soft = resize_to_original(small[offset:offset + RESIZE_CHUNK], canvas, image_size,
                                      original)  # (k, H0, W0)
            chunk = soft > threshold  # (k, H0, W0) bool
            boxes[start:start + len(chunk)] = boxes_of_thresholded(soft, threshold)
            del soft
            if dense is None:
                encoded += encode_rle(chunk)
            else:
                dense[start:start + len(chunk)] = chunk
    return (encoded if dense is None else dense), boxes
