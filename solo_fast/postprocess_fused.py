"""The fused, batched post-processing: the default path of every post-processor (SPEC §9, §15).

It computes what :mod:`solo_fast.postprocess`'s reference path computes, in another order, so that
no step holds a soft mask per candidate:

1. candidates of the whole batch, as the reference selects them;
2. area and maskness sum of EVERY candidate of the batch in one op call
   (:func:`~solo_fast.ops.dynamic_mask_scores`, :func:`~solo_fast.ops.decoupled_mask_scores`;
   SOLO: :func:`~solo_fast.ops.solo_mask_scores`, one call per level), without storing their
   soft masks; SOLOv2's op also writes every candidate's binary mask bit-packed (P / 8 bytes a
   candidate);
3. small-mask filter, maskness rescoring and the per-image ``nms_pre`` cut, vectorised over the
   batch: the cut picks exactly the candidates the reference's matrix NMS keeps after its own
   (stable) sort, ties by candidate order;
4. binary masks of those <= nms_pre per image only into matrix NMS (:func:`batched_matrix_nms`,
   the one call site): SOLOv2 hands over the rows of its packed masks; the other families build
   bool masks from their soft masks in chunks;
5. soft masks of the <= max_per_img kept per image only, resized to the original size in chunks
   (the reference's two bilinear resizes), with the boxes and optionally COCO RLE taken from each
   chunk, so no step holds full-size masks of more than one chunk besides the bool output.

Results equal the reference's (labels, order, masks) except where a score lands within rounding of
another: the maskness sum is accumulated in float64 here and in float32 there, so scores differ by
~1e-7 relative (tests allow 1e-6). SOLOv2's binary masks into matrix NMS are the scoring op's
(the pixels counted in its area), where the reference thresholds its own soft masks: they can
differ only at pixels whose soft value lies within a few ulp of ``mask_thr``.
"""

# N=images, K=candidates of the batch, M=candidates into matrix NMS (<= nms_pre per image),
# E=mask-feature channels, U=distinct X/Y maps used, H4, W4=stride-4 mask map, H0, W0=original size,
# Wd=ceil(H4 * W4 / 64) words of a packed mask

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from solo_fast import ops
from solo_fast.config import TestConfig

if TYPE_CHECKING:
    from solo_fast.postprocess import Candidates

__all__ = ["MASK_CHUNK", "MASK_FORMATS", "RESIZE_CHUNK", "NMSResult", "batched_matrix_nms",
           "encode_rle", "nms_pre_cut", "predict_fused"]

MASK_FORMATS = ("bool", "rle")
# Candidates per chunk when stride-4 masks are built (64 x 200 x 272 fp32 = 14 MB at 800 x 1088)
MASK_CHUNK = 64
# Kept instances per chunk of the final resize (8 x 800 x 1088 fp32 = 28 MB on the canvas)
RESIZE_CHUNK = 8


class NMSResult(NamedTuple):
    """Matrix NMS of one image.

    Attributes:
        keep: (n,) int64 indices into the batch-level inputs of :func:`batched_matrix_nms`.
        scores: (n,) decayed scores, descending.
        labels: (n,) int64 labels.
    """

    keep: Tensor
    scores: Tensor
    labels: Tensor


def batched_matrix_nms(masks: Tensor | ops.PackedMasks, labels: Tensor, scores: Tensor,
                       mask_area: Tensor, image: Tensor, *, num_images: int,
                       test_cfg: TestConfig, backend: str | None = None) -> list[NMSResult]:
    """Matrix NMS of every image of a batch with ``test_cfg``'s settings (SPEC §10).

    The one place the fused path calls matrix NMS: one call of the fused, bit-packed
    :func:`solo_fast.ops.batched_matrix_nms` for the whole batch.

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

    Returns:
        N results: per image the kept candidates' indices into these inputs, decayed scores and
        labels, by decayed score (descending), at most ``max_per_img``.
    """
    nms_scores, nms_labels, _, keep, counts = ops.batched_matrix_nms(
        masks, labels, scores, image, num_images=num_images, mask_area=mask_area,
        nms_pre=test_cfg.nms_pre, max_num=test_cfg.max_per_img, kernel=test_cfg.kernel,
        sigma=test_cfg.sigma, filter_thr=test_cfg.filter_thr, backend=backend)
    split = counts.tolist()
    return [NMSResult(*parts) for parts in zip(keep.split(split), nms_scores.split(split),
                                               nms_labels.split(split))]


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


def encode_rle(masks: Tensor) -> list[dict[str, Any]]:
    """COCO run-length encodings of binary masks (pycocotools), ready for ``json``.

    Args:
        masks: (K, H, W) bool.

    Returns:
        K dicts ``{"size": [H, W], "counts": str}``.
    """
    from pycocotools import mask as mask_util  # imported here: only RLE output needs it

    if masks.shape[0] == 0:
        return []
    # pycocotools wants (H, W, K) in Fortran order, i.e. (K, W, H) contiguous
    fortran = masks.transpose(1, 2).to(torch.uint8).contiguous().cpu().numpy()  # (K, W, H)
    encoded = mask_util.encode(np.asfortranarray(fortran.transpose(2, 1, 0)))  # (H, W, K)
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")
    return encoded


class MaskScores(NamedTuple):
    """What a family's scoring gives for every candidate's binary mask ``soft > threshold``.

    Attributes:
        area: (K,) int64 its pixel count.
        soft_sum: (K,) float64 the sum of the soft mask over it.
        packed: (K, Wd) int64 the binary masks bit-packed (:class:`~solo_fast.ops.PackedMasks`'
            layout) where the family's scoring op writes them; None: the fused path builds the
            masks it needs from the soft masks.
    """

    area: Tensor
    soft_sum: Tensor
    packed: Tensor | None = None


class MaskSource:
    """What the fused path needs of a family: its candidates' scores and soft masks.

    Args:
        scores: (threshold, backend) -> :class:`MaskScores` of every candidate.
        soft: (index (k,) int64) -> (k, H4, W4) soft masks of those candidates.
        size: (H4, W4).
    """

    def __init__(self, *, scores: Callable[[float, str | None], MaskScores],
                 soft: Callable[[Tensor], Tensor], size: tuple[int, int]) -> None:
        self.scores = scores
        self.soft = soft
        self.size = tuple(int(v) for v in size)


def predict_fused(processor: Any, candidates: Candidates, source: MaskSource,
                  image_sizes: Sequence[tuple[int, int]],
                  original_sizes: Sequence[tuple[int, int]], *, backend: str | None,
                  mask_format: str) -> list[dict[str, Any]]:
    """Steps 2-5 of the module docstring for a batch's candidates.

    Args:
        processor: The family's post-processor (test_cfg, strides, mask_stride, _final_masks).
        candidates: The batch's candidates (``_PostProcessor.select_candidates``).
        source: The family's candidate scores and soft masks.
        image_sizes, original_sizes: N pairs (h, w), as for the post-processors.
        backend: The ops' backend (None: their default).
        mask_format: ``"bool"`` or ``"rle"``.

    Returns:
        Per image, as the post-processors return.
    """
    cfg = processor.test_cfg
    num_images = len(image_sizes)
    device = candidates.score.device
    if len(candidates.score):
        scored = source.scores(cfg.mask_thr, backend)
    else:  # no op call on empty inputs: nothing to score
        scored = MaskScores(torch.zeros(0, dtype=torch.int64, device=device),
                            torch.zeros(0, dtype=torch.float64, device=device))
    area, soft_sum = scored.area, scored.soft_sum  # (K,), (K,)
    # The area is in mask-map pixels yet compared with the level's stride, as mmdetection does
    strides = torch.tensor(processor.strides, dtype=torch.int64, device=device)
    passes = (area > strides[candidates.level]).nonzero().squeeze(1)  # (K',)
    scores = candidates.score[passes] * (soft_sum[passes] / area[passes]).to(
        candidates.score.dtype)  # class score x maskness (mean probability in the mask)
    cut = nms_pre_cut(scores, candidates.image[passes], cfg.nms_pre)  # (M,) into passes
    chosen, nms_scores = passes[cut], scores[cut]

    if scored.packed is not None:  # the scoring op wrote them: no second pass over the logits
        masks = ops.PackedMasks(scored.packed[chosen], *source.size)  # (M, Wd)
    else:
        masks = torch.empty((len(chosen), *source.size), dtype=torch.bool, device=device)
        for start in range(0, len(chosen), MASK_CHUNK):  # (M, H4, W4) binary, chunk by chunk
            masks[start:start + MASK_CHUNK] = source.soft(chosen[start:start + MASK_CHUNK]) \
                > cfg.mask_thr
    kept = batched_matrix_nms(masks, candidates.label[chosen], nms_scores,
                              area[chosen].to(nms_scores.dtype), candidates.image[chosen],
                              num_images=num_images, test_cfg=cfg, backend=backend)
    del masks, scored  # the packed masks of every candidate are no longer needed

    canvas = (source.size[0] * processor.mask_stride, source.size[1] * processor.mask_stride)
    results = []
    for image, result in enumerate(kept):
        final = _final_chunks(processor, source, chosen[result.keep], canvas, image_sizes[image],
                              original_sizes[image], mask_format)
        results.append({"masks": final[0], "labels": result.labels.long(),
                        "scores": result.scores.float(), "boxes": final[1]})
    return results


def _final_chunks(processor: Any, source: MaskSource, index: Tensor, canvas: tuple[int, int],
                  image_size: tuple[int, int], original_size: tuple[int, int],
                  mask_format: str) -> tuple[Tensor | list[dict[str, Any]], Tensor]:
    """Final masks (bool (k, H0, W0) or k RLE dicts) and boxes of one image, chunk by chunk."""
    original = tuple(int(v) for v in original_size)
    device = index.device
    boxes = torch.zeros((len(index), 4), dtype=torch.float32, device=device)
    dense = (torch.zeros((len(index), *original), dtype=torch.bool, device=device)
             if mask_format == "bool" else None)
    encoded: list[dict[str, Any]] = []
    threshold = processor.test_cfg.mask_thr
    for group in range(0, len(index), MASK_CHUNK):
        # stride-4 soft masks a group at a time: SOLOv2's GEMM reads every mask feature once per
        # call, so 13 calls of 8 kernels took 109 ms where one of 100 took 32 ms
        small = source.soft(index[group:group + MASK_CHUNK])  # (g, H4, W4)
        for offset in range(0, len(small), RESIZE_CHUNK):
            start = group + offset
            soft = processor._final_soft(small[offset:offset + RESIZE_CHUNK], canvas, image_size,
                                         original)  # (k, H0, W0)
            chunk = soft > threshold  # (k, H0, W0) bool
            boxes[start:start + len(chunk)] = _boxes_of_thresholded(soft, threshold)
            del soft
            if dense is None:
                encoded += encode_rle(chunk)
            else:
                dense[start:start + len(chunk)] = chunk
    return (encoded if dense is None else dense), boxes


def _boxes_of_thresholded(soft: Tensor, threshold: float) -> Tensor:
    """:func:`~solo_fast.postprocess.masks_to_boxes` of ``soft > threshold`` from the soft masks'
    row and column maxima: a row holds a mask pixel exactly when its maximum passes the threshold,
    and float max-reductions run SIMD where torch's reductions over bool do not. A NaN (a broken
    model's output) makes its row's maximum NaN, which would hide the row's other pixels: then the
    boxes come from the bool masks instead.

    Args:
        soft: (K, H, W) floating.
        threshold: The mask threshold.

    Returns:
        (K, 4) float32 boxes, as masks_to_boxes returns them.
    """
    from solo_fast.postprocess import boxes_from_hits, masks_to_boxes

    if soft.numel() == 0:
        return torch.zeros(soft.shape[0], 4, dtype=torch.float32, device=soft.device)
    row_max = soft.amax(2)  # (K, H)
    if bool(row_max.isnan().any()):
        return masks_to_boxes(soft > threshold)
    return boxes_from_hits(row_max > threshold, soft.amax(1) > threshold)


# ------------------------------------------------------------------ the families' mask sources


def dynamic_source(kernels: Tensor, mask_feats: Tensor, image: Tensor) -> MaskSource:
    """SOLOv2: soft mask k = sigmoid(kernels[k] . mask_feats[image[k]]).

    Args:
        kernels: (K, E) the candidates' dynamic kernels.
        mask_feats: (N, E, H4, W4).
        image: (K,) int64 image of each candidate.
    """
    from solo_fast import ops

    def scores(threshold: float, backend: str | None) -> MaskScores:
        # the binary masks come with the scores: matrix NMS takes them packed as they are
        return MaskScores(*ops.dynamic_mask_scores(kernels, mask_feats, image,
                                                   threshold=threshold, backend=backend,
                                                   pack_masks=True))

    def soft(index: Tensor) -> Tensor:
        out = mask_feats.new_empty((len(index), *mask_feats.shape[-2:]))  # (k, H4, W4)
        images = image[index]
        for n in torch.unique(images).tolist():  # the images of a chunk: usually one
            members = (images == n).nonzero().squeeze(1)
            # a GEMM, not the reference's 1x1 convolution: oneDNN builds a convolution per
            # output-channel count, ~0.1 s each, and chunks have many counts
            logits = kernels[index[members]] @ mask_feats[n].flatten(1)  # (k_n, H4 * W4)
            out[members] = logits.sigmoid().view(-1, *mask_feats.shape[-2:])
        return out

    return MaskSource(scores=scores, soft=soft, size=tuple(mask_feats.shape[-2:]))


def decoupled_source(probs: Tensor, row: Tensor, col: Tensor) -> MaskSource:
    """Decoupled SOLO: soft mask k = probs[row[k]] * probs[col[k]] (Y map times X map).

    Args:
        probs: (U, H4, W4) the distinct X and Y probability maps the candidates use, of every
            image (X maps and Y maps in one tensor, so the op gets one map set for both).
        row: (K,) int64 the Y map of each candidate in ``probs``.
        col: (K,) int64 the X map of each candidate in ``probs``.
    """
    from solo_fast import ops

    maps = probs[None]  # (1, U, H4, W4): one "image" holding every map
    image = torch.zeros_like(row)

    def scores(threshold: float, backend: str | None) -> MaskScores:
        return MaskScores(*ops.decoupled_mask_scores(maps, maps, image, row, col,
                                                     threshold=threshold, backend=backend))

    def soft(index: Tensor) -> Tensor:
        # in place: one gathered chunk fewer (multiplication commutes exactly)
        return probs[row[index]].mul_(probs[col[index]])  # (k, H4, W4)

    return MaskSource(scores=scores, soft=soft, size=tuple(probs.shape[-2:]))


def solo_source(levels: Sequence[Tensor], image: Tensor, level: Tensor, channel: Tensor, *,
                activate: bool, soft: Callable[[Tensor], Tensor]) -> MaskSource:
    """SOLO: soft mask k = sigmoid(levels[level[k]][image[k], channel[k]]) resized bilinearly to
    level 0's size (or that map as given, ``activate=False``).

    Args:
        levels: L tensors (N, Q_l, h_l, w_l) of mask logits (``activate``) or probabilities.
        image: (K,) int64 image of each candidate.
        level: (K,) int64 level of each candidate.
        channel: (K,) int64 channel (local cell) of each candidate in its level.
        activate: The maps are logits: sigmoid first.
        soft: (index (k,)) -> (k, H4, W4) soft masks of those candidates.
    """
    from solo_fast import ops

    size = tuple(int(v) for v in levels[0].shape[-2:])

    def scores(threshold: float, backend: str | None) -> MaskScores:
        area = torch.zeros(len(image), dtype=torch.int64, device=image.device)
        soft_sum = torch.zeros(len(image), dtype=torch.float64, device=image.device)
        for index_level, maps in enumerate(levels):  # one op call per level with candidates
            index = (level == index_level).nonzero().squeeze(1)  # (K_l,)
            if index.numel() == 0:
                continue
            area[index], soft_sum[index], _ = ops.solo_mask_scores(
                maps, image[index], channel[index], size=size, threshold=threshold,
                logits=activate, backend=backend)
        return MaskScores(area, soft_sum)

    return MaskSource(scores=scores, soft=soft, size=size)
