"""SOLOv2's Matrix NMS (mmdetection ``mask_matrix_nms``, docs/algorithms.md §11) on bit-packed
masks.

The reference (``matrix_nms_reference``) multiplies float copies of the masks (n x P, 4 bytes a
pixel) into an n x n GEMM and builds five n x n temporaries. The fused backends pack each mask into
P bits once (``matrix_nms_pack``) and compute the decay of every candidate in one op
(``matrix_nms_decay``) from exact integer intersections, popcount(mask_i AND mask_j), visiting only
pairs of one image and one label: no float masks, no n x n matrix. The sorts, the ``nms_pre`` and
``max_num`` cuts and the filter stay here, in PyTorch: they are cheap and they define the stable
tie order, exactly as the reference does them.

The compiled kernels (``torch.ops.solo_fast.matrix_nms_pack/decay``, C++ on CPU, CUDA on GPU) and
the Triton kernels (``torch.ops.solo_fast.matrix_nms_triton_pack/decay``) share one contract:

* pack: masks (n, H, W) bool/uint8 -> (n, Wd) int64; bit b of word w is pixel 64 w + b of the
  row-major flattened mask, the tail bits zero;
* decay: packed (n, Wd) sorted by descending score within each segment, labels (n,) int64, areas
  (n,) float32/float64 used as given, segments (B + 1,) int64 offsets (only pairs inside one
  segment interact), kernel 0 = gaussian / 1 = linear, sigma -> decay (n,) in areas' dtype, with
  the arithmetic of ``csrc/matrix_nms.h``.

Masks may also come already packed, as a :class:`PackedMasks` (``bits`` (N, Wd) int64 in the
pack layout above, ``height``, ``width``), e.g. from ``dynamic_mask_scores(..., pack_masks=True)``,
which writes them while it scores the candidates: the fused backends then skip the pack and pick
the rows they need from ``bits``; the reference backend unpacks them to bool first. With packed
input both backends return the kept masks as a :class:`PackedMasks` too.

Results equal the reference's: the same ``keep_inds``, labels and masks, and scores equal up to
one rounding of exp (the C library's expf against torch's vectorised exp); the tests hold them to
1e-6 absolute.

One case is handled here rather than in the kernels: an IoU of 0/0 (two masks of zero area, or a
NaN area). In the reference that NaN reaches a compensation term and, through the n x n ratio
matrix, every score of the image, whatever the labels. The kernels never look at pairs of
different labels, so this module detects the case (from the areas: O(n)) and makes every decay of
that image NaN, as the reference does. The heads never pass empty masks (they require area >
stride). Areas are assumed >= 0 (or NaN): a negative ``mask_area`` is not a mask's area.
"""

# N=input candidates, n=candidates after the nms_pre cut, B=images, H, W=mask size, P=H*W,
# Wd=words of a packed mask = ceil(P / 64)

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from solo_fast.ops._backend import choose_backend
from solo_fast.ops._checks import INDEX, MASK, Arg, Contract
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import matrix_nms_reference, unpack_masks_reference

__all__ = ["PackedMasks", "batched_matrix_nms", "matrix_nms"]

_KERNELS = {"gaussian": 0, "linear": 1}
_PER_MASK = ", one entry per mask"
_CANDIDATES = (
    Arg("labels", "N", ("integer",), dtype_text="an integer dtype", note=_PER_MASK),
    Arg("scores", "N", ("floating",), note=_PER_MASK),
    Arg("mask_area", "N", (torch.float32, torch.float64), note=_PER_MASK, optional=True),
)
_IMAGE_IDS = Arg("image_ids", "N", INDEX, below="num_images", note=_PER_MASK)
# Per op, the contract of (N, H, W) masks and that of PackedMasks (whose bits _check_packed has
# checked: only their count and device remain).
_CONTRACTS = {
    (op, packed): Contract(op, (
        Arg("masks", "N Wd") if packed else
        Arg("masks", "N H W", MASK, dtype_text="bool, uint8 or floating (0/1)"),
        *_CANDIDATES, *((_IMAGE_IDS,) if op == "batched_matrix_nms" else ())),
        spell_letters=False)
    for op in ("matrix_nms", "batched_matrix_nms") for packed in (False, True)}
# The Triton ops' contracts (the compiled ops check the same in csrc/op_checks.h).
_PACK_CONTRACT = Contract("matrix_nms_triton_pack", (
    Arg("masks", "n H W", (torch.bool, torch.uint8)),
))
_DECAY_CONTRACT = Contract("matrix_nms_triton_decay", (
    Arg("packed", "n Wd", INDEX),
    Arg("labels", "n", INDEX),
    Arg("areas", "n", (torch.float32, torch.float64)),
    Arg("segments", "B", INDEX),
))


class PackedMasks(NamedTuple):
    """N binary masks of H x W pixels, bit-packed (the layout of ``matrix_nms_pack``).

    Attributes:
        bits: (N, Wd) int64, Wd = ceil(height * width / 64): bit b of word w of row i is pixel
            64 w + b of mask i flattened row-major; the bits past height * width are zero.
        height: H, a non-negative int.
        width: W, a non-negative int.
    """

    bits: Tensor
    height: int
    width: int


def matrix_nms(masks: Tensor | PackedMasks, labels: Tensor, scores: Tensor,
               filter_thr: float = -1, nms_pre: int = -1, max_num: int = -1,
               kernel: str = "gaussian", sigma: float = 2.0, mask_area: Tensor | None = None, *,
               backend: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Matrix NMS of one image's candidates, fused; mmdetection's signature and results.

    Positional parameters are mmdetection's ``mask_matrix_nms``'s, so that call sites port as
    they are. Ties follow the reference: both sorts are stable, and the linear kernel's 0/0 is 0
    (see ``matrix_nms_reference``).

    Args:
        masks: (N, H, W) binary masks: bool or uint8 (read in place; nonzero = inside), or
            floating 0/1 (compared with 0, one bool copy); or a :class:`PackedMasks` of N masks
            (no packing: its rows are used as they are).
        labels: (N,) integer class of each mask.
        scores: (N,) floating scores.
        filter_thr: Keep decayed scores >= filter_thr; no filter when <= 0.
        nms_pre: Decay only the ``nms_pre`` best-scored candidates (all when <= 0).
        max_num: Return at most ``max_num`` candidates (all when <= 0).
        kernel: ``"gaussian"`` or ``"linear"``.
        sigma: Gaussian parameter, exp(-sigma * iou^2); a finite number >= 0. Unused by the
            linear kernel.
        mask_area: (N,) float32 or float64 area of each mask, used as given; None counts each
            mask's pixels (float32).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None takes
            ``SOLO_FAST_BACKEND`` or the fastest tested backend for the masks' device.

    Returns:
        ``(scores, labels, masks, keep_inds)`` of the kept candidates sorted by decayed score
        (descending): scores (n,) in the promotion of scores' and the areas' dtypes; labels (n,)
        and masks (n, H, W) in their input dtypes (a :class:`PackedMasks` of the n kept rows when
        masks was one); keep_inds (n,) int64 indices into the inputs.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, rank, length or device, or
            an unknown kernel name or a bad sigma.
    """
    op = "matrix_nms"
    _check_inputs(op, masks, labels=labels, scores=scores, mask_area=mask_area, kernel=kernel,
                  sigma=sigma)
    device, num = _device_and_count(masks)
    chosen = _choose(op, device, backend)
    if chosen == "reference" or num == 0:
        out = matrix_nms_reference(_unpacked(masks), labels, scores, filter_thr=filter_thr,
                                   nms_pre=nms_pre, max_num=max_num, kernel=kernel,
                                   sigma=sigma, mask_area=mask_area)
        if isinstance(masks, PackedMasks):  # the kept rows, packed as they came in
            out = (*out[:2], _rows(masks, out[3]), out[3])
        return out
    sorted_scores, order = torch.sort(scores, descending=True, stable=True)
    if 0 < nms_pre < num:
        order, sorted_scores = order[:nms_pre], sorted_scores[:nms_pre]
    segments = torch.tensor([0, len(order)], dtype=torch.int64, device=device)
    decay = _decay(chosen, masks, labels, order, mask_area, segments, kernel, sigma)
    decayed = sorted_scores * decay
    keep_inds = order
    if filter_thr > 0:
        keep = decayed >= filter_thr
        keep_inds, decayed = keep_inds[keep], decayed[keep]
    decayed, second = torch.sort(decayed, descending=True, stable=True)
    if 0 < max_num < len(second):
        second, decayed = second[:max_num], decayed[:max_num]
    keep_inds = keep_inds[second]
    return decayed, labels[keep_inds], _rows(masks, keep_inds), keep_inds


def batched_matrix_nms(masks: Tensor | PackedMasks, labels: Tensor, scores: Tensor,
                       image_ids: Tensor, *, num_images: int, filter_thr: float = -1,
                       nms_pre: int = -1, max_num: int = -1, kernel: str = "gaussian",
                       sigma: float = 2.0, mask_area: Tensor | None = None,
                       backend: str | None = None, check_index: bool = True
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Matrix NMS of a whole batch in one fused call; per image the result of :func:`matrix_nms`.

    Candidates of all images come in one flat set, each tagged with its image. Candidates of
    different images never interact; ``nms_pre`` and ``max_num`` apply per image.

    Args:
        masks: (N, H, W) binary masks of all images (bool, uint8 or floating 0/1), or a
            :class:`PackedMasks` of them.
        labels: (N,) integer class of each mask.
        scores: (N,) floating scores.
        image_ids: (N,) integer image of each candidate, in [0, num_images); any order.
        num_images: B, the number of images (images without candidates included).
        filter_thr, nms_pre, max_num, kernel, sigma, mask_area, backend: as in
            :func:`matrix_nms`; nms_pre and max_num count per image.
        check_index: check that image_ids lie in [0, num_images), here, on every backend: one
            device-to-host copy of their minimum and maximum (a synchronisation on a GPU). Pass
            False only for ids built in range (as the post-processing builds them).

    Returns:
        ``(scores, labels, masks, keep_inds, counts)``: the kept candidates of image 0, then
        image 1, ..., each image's sorted by decayed score (descending) exactly as
        :func:`matrix_nms` returns them (masks a :class:`PackedMasks` when the input masks were
        one); keep_inds (n,) int64 index the flat inputs; counts (B,) int64 is the number kept
        per image (``torch.split(keep_inds, counts.tolist())`` gives per-image results). Scores
        have one dtype for the whole batch, that of the decayed scores (where
        :func:`matrix_nms` returns an image without candidates in scores' dtype).

    Raises:
        TypeError, ValueError: as :func:`matrix_nms`, and image_ids of the wrong dtype or length,
            or outside [0, num_images).
    """
    op = "batched_matrix_nms"
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"{op}: num_images must be an int >= 0, got {num_images!r}")
    contract, tensors = _check_inputs(op, masks, labels=labels, scores=scores,
                                      mask_area=mask_area, image_ids=image_ids, kernel=kernel,
                                      sigma=sigma)
    if check_index:
        contract.check_ranges({"num_images": num_images}, **tensors)
    device, _ = _device_and_count(masks)
    chosen = _choose(op, device, backend)
    if chosen == "reference":
        out = _batched_reference(_unpacked(masks), labels, scores, image_ids, num_images,
                                 filter_thr, nms_pre, max_num, kernel, sigma, mask_area)
        if isinstance(masks, PackedMasks):  # the kept rows, packed as they came in
            out = (*out[:2], _rows(masks, out[3]), *out[3:])
        return out
    # Stable by score, then stable by image: each image's candidates in matrix_nms's order.
    sorted_scores, order = torch.sort(scores, descending=True, stable=True)
    order, ids, sorted_scores = _group_by_image(order, image_ids[order], sorted_scores, nms_pre,
                                                num_images)
    counts = torch.bincount(ids, minlength=num_images)  # (B,)
    segments = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (B + 1,)
    decay = _decay(chosen, masks, labels, order, mask_area, segments, kernel, sigma)
    decayed = sorted_scores * decay
    if filter_thr > 0:
        keep = decayed >= filter_thr
        order, ids, decayed = order[keep], ids[keep], decayed[keep]
    decayed, second = torch.sort(decayed, descending=True, stable=True)
    keep_inds, ids, decayed = _group_by_image(order[second], ids[second], decayed, max_num,
                                              num_images)
    counts = torch.bincount(ids, minlength=num_images) if len(ids) else \
        torch.zeros(num_images, dtype=torch.int64, device=device)
    return decayed, labels[keep_inds], _rows(masks, keep_inds), keep_inds, counts


def _device_and_count(masks: Tensor | PackedMasks) -> tuple[torch.device, int]:
    tensor = masks.bits if isinstance(masks, PackedMasks) else masks
    return tensor.device, tensor.shape[0]


def _rows(masks: Tensor | PackedMasks, index: Tensor) -> Tensor | PackedMasks:
    """The masks ``index``, in the form they came in."""
    if isinstance(masks, PackedMasks):
        return PackedMasks(masks.bits[index], masks.height, masks.width)
    return masks[index]


def _unpacked(masks: Tensor | PackedMasks) -> Tensor:
    """Bool (N, H, W) masks of a PackedMasks, for the reference; other masks as they are."""
    if isinstance(masks, PackedMasks):
        return unpack_masks_reference(masks.bits, masks.height, masks.width)
    return masks


def _group_by_image(order: Tensor, ids: Tensor, values: Tensor, limit: int, num_images: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Stable regrouping of an already ordered list by image, keeping each image's first
    ``limit`` entries (all when limit <= 0)."""
    ids, by_image = torch.sort(ids, stable=True)
    order, values = order[by_image], values[by_image]
    if limit > 0 and len(ids):
        counts = torch.bincount(ids, minlength=num_images)  # (B,)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(len(ids), device=ids.device) - starts[ids]
        keep = rank < limit
        order, ids, values = order[keep], ids[keep], values[keep]
    return order, ids, values


def _decay(backend: str, masks: Tensor | PackedMasks, labels: Tensor, order: Tensor,
           mask_area: Tensor | None, segments: Tensor, kernel: str, sigma: float) -> Tensor:
    """(n,) decay of the candidates ``order`` (sorted within each segment) by the fused core."""
    if backend == "triton":
        pack, decay = (torch.ops.solo_fast.matrix_nms_triton_pack,
                       torch.ops.solo_fast.matrix_nms_triton_decay)
    else:
        pack, decay = torch.ops.solo_fast.matrix_nms_pack, torch.ops.solo_fast.matrix_nms_decay
    if isinstance(masks, PackedMasks):
        packed = masks.bits.index_select(0, order)  # (n, Wd)
    else:
        if masks.dtype not in (torch.bool, torch.uint8):
            masks = masks != 0
        # Packing every mask and then picking rows reads the masks once and copies 1/8 of a
        # byte per pixel; picking the masks first would copy a byte per pixel.
        packed = pack(masks).index_select(0, order)  # (n, Wd)
    if mask_area is None:
        areas = _popcount_rows(packed).to(torch.float32)  # exact: counts < 2^24
    else:
        areas = mask_area.index_select(0, order)
    result = decay(packed, labels.index_select(0, order).to(torch.int64), areas, segments,
                   _KERNELS[kernel], float(sigma))
    return _poison_nan_iou_images(result, packed, areas, segments, mask_area is not None)


_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


def _popcount_rows(packed: Tensor) -> Tensor:
    """(n,) int64 pixel count of each packed mask, reading 1/8 of the bytes of a sum over the
    byte masks: the C++ kernel on the CPU, a SWAR popcount in PyTorch elsewhere."""
    if packed.device.type == "cpu" and has_ops():
        return torch.ops.solo_fast.matrix_nms_popcount(packed)
    x = packed - ((packed >> 1) & _M1)  # arithmetic shift: the mask drops the sign copies
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4  # every byte holds its own popcount, <= 8
    return x.view(torch.uint8).reshape(len(packed), -1).sum(1)  # (n, Wd * 8) -> (n,)


def _poison_nan_iou_images(decay: Tensor, packed: Tensor, areas: Tensor, segments: Tensor,
                           areas_given: bool) -> Tensor:
    """Every decay of an image with a 0/0 IoU becomes NaN, as in the reference (module doc).

    IoU_ij = inter / (a_i + a_j - inter) is NaN, for areas >= 0, when a_i or a_j is NaN, or when
    a_i = a_j = 0 and the masks are disjoint (always, for pixel counts). One host sync; the
    per-pair check runs only for images with two zero areas, which the heads never produce.
    """
    suspect = areas.isnan() | (areas == 0)
    if len(areas) < 2 or not bool(suspect.any()):
        return decay
    sizes = segments[1:] - segments[:-1]  # (B,)
    image = torch.repeat_interleave(torch.arange(len(sizes), device=areas.device), sizes)  # (n,)
    nan_rows = torch.zeros(len(sizes), dtype=torch.int64, device=areas.device)
    zero_rows = torch.zeros_like(nan_rows)
    nan_rows.index_add_(0, image, areas.isnan().long())
    zero_rows.index_add_(0, image, (areas == 0).long())
    poisoned = (sizes >= 2) & (nan_rows > 0)
    if not areas_given:
        poisoned |= zero_rows >= 2
    else:
        for b in torch.nonzero(zero_rows >= 2).flatten().tolist():
            rows = torch.nonzero((image == b) & (areas == 0)).flatten()
            poisoned[b] |= _has_disjoint_pair(packed.index_select(0, rows))
    return torch.where(poisoned[image], torch.full_like(decay, math.nan), decay)


def _has_disjoint_pair(packed: Tensor) -> bool:
    for i in range(len(packed) - 1):
        if not bool(((packed[i + 1:] & packed[i]) != 0).any(1).all()):
            return True
    return False


def _batched_reference(masks, labels, scores, image_ids, num_images, filter_thr, nms_pre,
                       max_num, kernel, sigma, mask_area):
    results, counts = [], []
    for b in range(num_images):
        rows = torch.nonzero(image_ids == b).flatten()
        out = matrix_nms_reference(
            masks[rows], labels[rows], scores[rows], filter_thr=filter_thr, nms_pre=nms_pre,
            max_num=max_num, kernel=kernel, sigma=sigma,
            mask_area=None if mask_area is None else mask_area[rows])
        results.append((*out[:3], rows[out[3]]))
        counts.append(len(out[3]))
    if not results:
        out = matrix_nms_reference(masks[:0], labels[:0], scores[:0])
        results.append(out)
    columns = [torch.cat(parts) for parts in zip(*results)]
    return (*columns, torch.tensor(counts, dtype=torch.int64, device=masks.device))


_TRITON_KERNELS_PRESENT = importlib.util.find_spec("solo_fast.kernels.matrix_nms") is not None
_warned: set[str] = set()


def _choose(op: str, device: torch.device, backend: str | None) -> str:
    chosen = choose_backend("matrix_nms", device, backend)
    if chosen == "triton" and not _TRITON_KERNELS_PRESENT:
        if "triton" not in _warned:
            _warned.add("triton")
            warnings.warn(f"solo_fast.ops.{op}: the Triton kernels (solo_fast.kernels.matrix_nms)"
                          " are not installed; falling back", RuntimeWarning, stacklevel=3)
        chosen = choose_backend("matrix_nms", device, None)
    return chosen


def _check_inputs(op: str, masks: object, *, kernel: object, sigma: object,
                  **candidates: object) -> tuple[Contract, dict[str, object]]:
    """Checks every argument; returns the contract that held and its tensors (for the ranges)."""
    packed = isinstance(masks, PackedMasks)
    if packed:
        _check_packed(op, masks)
    elif not isinstance(masks, Tensor):
        raise TypeError(f"{op}: masks must be a torch.Tensor or a PackedMasks, got "
                        f"{type(masks).__name__}")
    contract = _CONTRACTS[op, packed]
    tensors = dict(masks=masks.bits if packed else masks, **candidates)
    contract.check(**tensors)
    if not isinstance(kernel, str) or kernel not in _KERNELS:
        raise ValueError(f"{op}: kernel must be one of {tuple(_KERNELS)}, got {kernel!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or (
            kernel == "gaussian" and not (math.isfinite(sigma) and sigma >= 0)):
        raise ValueError(f"{op}: sigma must be a finite number >= 0 (the gaussian kernel decays "
                         f"with the IoU), got {sigma!r}")
    return contract, tensors


def _check_packed(op: str, masks: PackedMasks) -> None:
    for name in ("height", "width"):
        value = getattr(masks, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{op}: masks.{name} must be an int >= 0, got {value!r}")
    bits = masks.bits
    if not isinstance(bits, Tensor):
        raise TypeError(f"{op}: masks.bits must be a torch.Tensor, got {type(bits).__name__}")
    if bits.dtype != torch.int64:
        raise TypeError(f"{op}: masks.bits must be int64 (64 pixels a word), got {bits.dtype}")
    words = -(-masks.height * masks.width // 64)
    if bits.dim() != 2 or bits.shape[1] != words:
        raise ValueError(f"{op}: masks.bits must have shape (N, Wd) with Wd = ceil(height * "
                         f"width / 64) = ceil({masks.height} * {masks.width} / 64) = {words}, "
                         f"got {tuple(bits.shape)}")


# ----------------------------------------------------------------------------------------------
# Registration: fake kernels (shapes only, for torch.compile and meta tensors) for the compiled
# ops and the Triton ops. No autograd: matrix NMS is inference only.

def _fake_pack(masks: Tensor) -> Tensor:
    words = (masks.shape[1] * masks.shape[2] + 63) // 64
    return masks.new_empty((masks.shape[0], words), dtype=torch.int64)


def _fake_popcount(packed: Tensor) -> Tensor:
    return packed.new_empty((packed.shape[0],))


def _fake_decay(packed: Tensor, labels: Tensor, areas: Tensor, segments: Tensor, kernel: int,
                sigma: float) -> Tensor:
    return areas.new_empty((packed.shape[0],))


@torch.library.custom_op("solo_fast::matrix_nms_triton_pack", mutates_args=())
def _matrix_nms_triton_pack(masks: Tensor) -> Tensor:
    # Lazy: Triton is optional, and imported only when its backend runs.
    from solo_fast.kernels import matrix_nms as triton_kernels

    _PACK_CONTRACT.check(masks=masks)
    return triton_kernels.matrix_nms_pack(masks)


@torch.library.custom_op("solo_fast::matrix_nms_triton_decay", mutates_args=())
def _matrix_nms_triton_decay(packed: Tensor, labels: Tensor, areas: Tensor, segments: Tensor,
                             kernel: int, sigma: float) -> Tensor:
    from solo_fast.kernels import matrix_nms as triton_kernels  # lazy, as above

    op = _DECAY_CONTRACT.op
    _DECAY_CONTRACT.check(packed=packed, labels=labels, areas=areas, segments=segments)
    if len(segments) < 1 or kernel not in _KERNELS.values():
        raise ValueError(f"{op}: segments must be (B + 1,) offsets with B >= 0 and kernel one of "
                         f"{tuple(_KERNELS.values())}, got {len(segments)} offsets and {kernel}")
    # Their values are data: read only where that costs no synchronisation. Offsets that do not
    # partition [0, n) give a wrong grouping but no access out of bounds.
    if not segments.is_cuda and not (
            segments[0] == 0 and segments[-1] == len(packed)
            and bool((segments[1:] >= segments[:-1]).all())):
        raise ValueError(f"{op}: segments must be nondecreasing offsets from 0 to n = "
                         f"{len(packed)}, got {segments.tolist()}")
    return triton_kernels.matrix_nms_decay(packed, labels, areas, segments, kernel, sigma)


_matrix_nms_triton_pack.register_fake(_fake_pack)
_matrix_nms_triton_decay.register_fake(_fake_decay)

if has_ops():
    torch.library.register_fake("solo_fast::matrix_nms_pack", _fake_pack)
    torch.library.register_fake("solo_fast::matrix_nms_popcount", _fake_popcount)
    torch.library.register_fake("solo_fast::matrix_nms_decay", _fake_decay)
