"""Training targets of the SOLO family: grid-cell labels and positive (cell, instance) pairs.

Reproduces mmdetection 3.3's ``SOLOHead``, ``DecoupledSOLOHead`` and ``SOLOV2Head``
``_get_targets_single`` bit for bit (docs/algorithms.md §8, §14), for a whole batch at once. The
instances of all images are concatenated and carry their image index, so there is no Python loop
over images or instances; the only host syncs are one ``nonzero`` per level.

Unlike mmdetection, no dense (S*S, h, w) mask-target stack is built. Each positive instead points
at the instance whose downsampled GT mask is its target: a loss gathers ``gt_masks[pos_instance]``
and the matching predictions at ``(pos_image, pos_cell)``.
"""

# N=images, L=levels, S=grid side, G=S*S cells of a level, M=gt instances of the whole batch,
# K=positives of a level, H, W=padded canvas, h, w=a level's mask-map size, B=9 window slots

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TargetConfig",
    "LevelTargets",
    "solo_targets",
    "decoupled_solo_targets",
    "solov2_targets",
    "downsample_gt_masks",
]


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Grid assignment settings; the defaults are mmdetection's SOLO / SOLOv2 R50 configs."""

    num_grids: tuple[int, ...] = (40, 36, 24, 16, 12)  # grid side S per level
    # a GT is assigned to level l iff lo <= sqrt(box w * box h) <= hi (both ends inclusive)
    scale_ranges: tuple[tuple[float, float], ...] = (
        (1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    # SOLO / Decoupled downsample GT masks by stride / 2, the stride of their mask maps
    strides: tuple[int, ...] = (8, 8, 16, 32, 32)
    pos_scale: float = 0.2  # the centre region is pos_scale x the box, around the mass centre
    num_classes: int = 80  # the background label
    mask_stride: int = 4  # SOLOv2 only: stride of the unified mask feature, its target resolution

    def __post_init__(self) -> None:
        levels = len(self.num_grids)
        if len(self.scale_ranges) != levels or len(self.strides) != levels:
            raise ValueError(
                f"num_grids, scale_ranges and strides need one entry per level; got "
                f"{len(self.num_grids)}, {len(self.scale_ranges)} and {len(self.strides)}")
        for factor in [s // 2 for s in self.strides] + [self.mask_stride]:
            if factor != 1 and factor % 2:
                raise ValueError(f"mask downsampling factors must be 1 or even, got {factor}")


@dataclass(frozen=True)
class LevelTargets:
    """Targets of one level for a batch of N images.

    Attributes:
        grid_size: S, the grid side of this level.
        labels: int64 (N, S, S); the class of each cell, ``num_classes`` for background. Where GTs
            share a cell, the later GT (in input order) owns the label.
        pos_image: int64 (K,); the image of each positive.
        pos_cell: int64 (K,); the local cell index ``i * S + j`` (row i = y, column j = x).
        pos_instance: int64 (K,); index into the batch's concatenated GT instances (image 0's
            instances first), i.e. the row of ``gt_masks`` holding this positive's mask target.
        gt_masks: bool (M, h, w); every GT mask of the batch downsampled to this level's mask-map
            size. Levels with the same downsampling factor share one tensor.
        num_pos: int64 (); the number of distinct positive cells, the loss normaliser. It equals
            K for SOLO and Decoupled; SOLOv2 can have K > num_pos.
    """

    grid_size: int
    labels: Tensor
    pos_image: Tensor
    pos_cell: Tensor
    pos_instance: Tensor
    gt_masks: Tensor
    num_pos: Tensor

    @property
    def pos_row(self) -> Tensor:
        """int64 (K,); row i of each positive: Decoupled SOLO's Y-branch channel."""
        return torch.div(self.pos_cell, self.grid_size, rounding_mode="floor")

    @property
    def pos_col(self) -> Tensor:
        """int64 (K,); column j of each positive: Decoupled SOLO's X-branch channel."""
        return self.pos_cell % self.grid_size


def solo_targets(
    gt_instances: Sequence[Mapping[str, Tensor]], *, config: TargetConfig = TargetConfig()
) -> list[LevelTargets]:
    """SOLO targets (``SOLOHead._get_targets_single`` for every image of a batch).

    Each cell has at most one positive; where GTs share a cell, the last GT in input order owns
    both its label and its mask target. Positives are sorted by (image, cell).

    Args:
        gt_instances: One mapping per image with ``masks`` bool (M_n, H, W) on the padded batch
            canvas (the same H, W for every image, a multiple of the largest ``strides`` / 2),
            ``labels`` int64 (M_n,) in [0, num_classes) and ``boxes`` (M_n, 4) xyxy pixels,
            computed on in float32. Images may have no instances (M_n = 0).
        config: Grid settings.

    Returns:
        One :class:`LevelTargets` per level. ``gt_masks`` of level l has shape
        (M, H / (strides[l] / 2), W / (strides[l] / 2)), the size of the head's mask map.
    """
    batch = _Batch(gt_instances)
    factors = [stride // 2 for stride in config.strides]
    return _assign(batch, config, factors, keep_shared_cells=False)


def decoupled_solo_targets(
    gt_instances: Sequence[Mapping[str, Tensor]], *, config: TargetConfig = TargetConfig()
) -> list[LevelTargets]:
    """Decoupled SOLO targets: the same assignment as :func:`solo_targets`.

    mmdetection's ``xy_pos_indexes`` are ``(pos_row, pos_col)`` of the returned levels, in the same
    (image, row-major) order; the X branch uses ``pos_col`` and the Y branch ``pos_row``.
    Arguments and returns are those of :func:`solo_targets`.
    """
    return solo_targets(gt_instances, config=config)


def solov2_targets(
    gt_instances: Sequence[Mapping[str, Tensor]], *, config: TargetConfig = TargetConfig()
) -> list[LevelTargets]:
    """SOLOv2 targets (``SOLOV2Head._get_targets_single`` for every image of a batch).

    There is one positive per (GT, cell) pair: a cell claimed by several GTs appears once per GT,
    so its kernel is trained towards each of their masks, while ``labels`` holds the last GT's
    class. Positives are sorted by (image, GT, cell) and ``num_pos`` counts distinct cells.

    Args:
        gt_instances: As for :func:`solo_targets`; H and W must be multiples of
            ``config.mask_stride``.
        config: Grid settings.

    Returns:
        One :class:`LevelTargets` per level; every level shares one ``gt_masks`` tensor of shape
        (M, H / mask_stride, W / mask_stride).
    """
    batch = _Batch(gt_instances)
    factors = [config.mask_stride] * len(config.num_grids)
    return _assign(batch, config, factors, keep_shared_cells=True)


def downsample_gt_masks(masks: Tensor, factor: int) -> Tensor:
    """Downsample binary masks exactly as ``mmcv.imrescale(mask, 1 / factor)`` (OpenCV bilinear).

    OpenCV samples each output pixel at the centre of its factor x factor block, i.e. the average
    of the block's central 2x2 pixels rounded half up: the output is 1 iff at least 2 of those 4
    pixels are 1 (docs/algorithms.md §8.4). No other input pixel matters.

    Args:
        masks: bool (M, H, W), with H and W multiples of ``factor``.
        factor: 1 or an even integer.

    Returns:
        bool (M, H / factor, W / factor).
    """
    if factor == 1:
        return masks
    first = factor // 2 - 1  # the upper/left pixel of each block's central pair
    pixels = masks.view(torch.uint8)  # (M, H, W), a free reinterpretation
    rows = pixels[:, first::factor] + pixels[:, first + 1::factor]  # (M, h, W)
    votes = rows[:, :, first::factor] + rows[:, :, first + 1::factor]  # (M, h, w)
    return votes >= 2


class _Batch:
    """The GT instances of all images concatenated, with the image index of each instance."""

    def __init__(self, gt_instances: Sequence[Mapping[str, Tensor]]) -> None:
        if len(gt_instances) == 0:
            raise ValueError("gt_instances needs one entry per image, got an empty sequence")
        canvases = {tuple(gt["masks"].shape[-2:]) for gt in gt_instances}
        if len(canvases) != 1:
            raise ValueError(f"all GT masks must be padded to the batch canvas, got {canvases}")
        (self.canvas_hw,) = canvases
        self.num_images = len(gt_instances)
        self.masks = torch.cat([gt["masks"].bool() for gt in gt_instances])  # (M, H, W)
        self.device = self.masks.device
        self.labels = torch.cat([gt["labels"].long() for gt in gt_instances])  # (M,)
        # mmdetection's pipeline holds float32 boxes and does all the box arithmetic in float32
        self.boxes = torch.cat([gt["boxes"].float() for gt in gt_instances]).view(-1, 4)  # (M, 4)
        counts = [len(gt["labels"]) for gt in gt_instances]
        self.image = torch.repeat_interleave(
            torch.arange(self.num_images, device=self.device),
            torch.tensor(counts, device=self.device), output_size=sum(counts))  # (M,)


def _largest_divisor(value: int, limit: int) -> int:
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def _pixel_counts(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Exact int64 True counts of bool masks (M, H, W) per row (M, H) and per column (M, W).

    Summing bools makes PyTorch materialise an int64 copy 8x the masks' size, which dominated the
    CPU time. Instead 8 neighbouring pixels are summed at once as the bytes of one int64 word
    (SWAR): blocks of at most 255 words keep every byte lane below 256, so no lane carries into
    the next, and the lanes are split apart again afterwards. Byte order does not matter.
    """
    num, height, width = masks.shape
    if width % 8 or height == 0 or not masks.is_contiguous():
        return masks.sum(dim=2), masks.sum(dim=1)
    words_per_row = width // 8
    words = masks.view(torch.uint8).view(torch.int64)  # (M, H, W/8), 8 pixels per word
    word_block = _largest_divisor(words_per_row, 255)
    row_blocks = words_per_row // word_block
    row_lanes = words.view(num, height, row_blocks, word_block).sum(dim=3)  # (M, H, blocks)
    row_counts = row_lanes.view(torch.uint8).view(num, height, row_blocks * 8).sum(dim=2)
    row_block = _largest_divisor(height, 255)
    col_blocks = height // row_block
    col_lanes = words.view(num, col_blocks, row_block, words_per_row).sum(dim=2)  # (M, blocks, W/8)
    col_counts = col_lanes.view(torch.uint8).view(num, col_blocks, width).sum(dim=1)  # (M, W)
    return row_counts, col_counts


def _mass_centres(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 (M,) row and column mass centres, with mmdetection's rounding, and int64 areas.

    mmdetection sums mask * index in int64 (exact), then divides it, rounded to float32, by the
    float32 pixel count clamped at 1e-6.
    """
    height, width = masks.shape[-2:]
    row_counts, col_counts = _pixel_counts(masks)  # (M, H), (M, W)
    rows = torch.arange(height, device=masks.device)
    cols = torch.arange(width, device=masks.device)
    area = row_counts.sum(dim=1)  # (M,)
    divisor = area.float().clamp(min=1e-6)
    centre_row = (row_counts * rows).sum(dim=1).float() / divisor
    centre_col = (col_counts * cols).sum(dim=1).float() / divisor
    return centre_row, centre_col, area


def _quantise(coord: Tensor, extent: Tensor, cell_fraction: Tensor) -> Tensor:
    """Grid cell of canvas coordinates: int64 (M, L) from coord (M,) for each level.

    mmdetection computes trunc((v / U) / float32(1 / S)) in float32, which differs from
    floor(v * S / U) at some cell boundaries (docs/algorithms.md §8.3), so the op order is kept.
    Both divisors are device tensors: PyTorch's CUDA kernels would replace division by a CPU
    scalar with multiplication by its reciprocal, which changes those boundary cells.
    """
    fraction_of_extent = (coord / extent)[:, None]  # (M, 1)
    return torch.div(fraction_of_extent, cell_fraction, rounding_mode="trunc").long()  # (M, L)


def _cell_windows(batch: _Batch, config: TargetConfig) -> tuple[Tensor, Tensor]:
    """The cells each GT claims at each level, as up to 3x3 windows.

    Returns:
        cells: int64 (M, L, B); the local cell index i * S + j of window slot b, which is
            (di, dj) = divmod(b, 3) from the window's top-left cell: slots run row-major, in the
            order of mmdetection's loops.
        claimed: bool (M, L, B); whether the GT claims that slot's cell at that level.
    """
    device = batch.device
    boxes = batch.boxes
    height, width = batch.canvas_hw
    grids = torch.tensor(config.num_grids, device=device)  # (L,)
    as_float32 = dict(dtype=torch.float32, device=device)
    cell_fraction = torch.tensor([1.0 / s for s in config.num_grids], **as_float32)  # (L,)
    lower = torch.tensor([float(lo) for lo, _ in config.scale_ranges], **as_float32)  # (L,)
    upper = torch.tensor([float(hi) for _, hi in config.scale_ranges], **as_float32)  # (L,)
    canvas_h = torch.tensor(float(height), **as_float32)
    canvas_w = torch.tensor(float(width), **as_float32)

    box_w = boxes[:, 2] - boxes[:, 0]  # (M,)
    box_h = boxes[:, 3] - boxes[:, 1]
    scale = torch.sqrt(box_w * box_h)[:, None]  # (M, 1)
    centre_row, centre_col, area = _mass_centres(batch.masks)  # (M,) each
    non_empty = (area > 0)[:, None]  # (M, 1); GTs with an empty mask are skipped
    hit = (scale >= lower) & (scale <= upper) & non_empty  # (M, L)

    # half-sizes of the centre region, with mmdetection's float32 op order
    half_h = 0.5 * box_h * config.pos_scale  # (M,)
    half_w = 0.5 * box_w * config.pos_scale
    centre_i = _quantise(centre_row, canvas_h, cell_fraction)  # (M, L)
    centre_j = _quantise(centre_col, canvas_w, cell_fraction)
    top = torch.maximum(_quantise(centre_row - half_h, canvas_h, cell_fraction).clamp(min=0),
                        centre_i - 1)  # (M, L)
    bottom = torch.minimum(
        torch.minimum(_quantise(centre_row + half_h, canvas_h, cell_fraction), grids - 1),
        centre_i + 1)
    left = torch.maximum(_quantise(centre_col - half_w, canvas_w, cell_fraction).clamp(min=0),
                         centre_j - 1)
    right = torch.minimum(
        torch.minimum(_quantise(centre_col + half_w, canvas_w, cell_fraction), grids - 1),
        centre_j + 1)

    # the window is at most 3x3 because it is clamped to the centre cell's neighbourhood
    slot = torch.arange(9, device=device)
    row = top[..., None] + torch.div(slot, 3, rounding_mode="floor")  # (M, L, B)
    col = left[..., None] + slot % 3  # (M, L, B)
    claimed = hit[..., None] & (row <= bottom[..., None]) & (col <= right[..., None])
    cells = row * grids[:, None] + col  # (M, L, B)
    return cells, claimed


def _assign(
    batch: _Batch, config: TargetConfig, factors: list[int], *, keep_shared_cells: bool
) -> list[LevelTargets]:
    height, width = batch.canvas_hw
    if any(height % f or width % f for f in factors):
        raise ValueError(
            f"the canvas {height}x{width} must be a multiple of every mask downsampling factor "
            f"{sorted(set(factors))}; pad the batch to a multiple of 32")
    device = batch.device
    num_instances = len(batch.labels)
    cells, claimed = _cell_windows(batch, config)
    # label lookup with a trailing background entry for unclaimed cells
    labels_or_background = torch.cat(
        [batch.labels, torch.full((1,), config.num_classes, device=device)])  # (M + 1,)
    instance = torch.arange(num_instances, device=device)[:, None].expand(-1, 9)  # (M, B)
    downsampled: dict[int, Tensor] = {}

    levels = []
    for level, (grid, factor) in enumerate(zip(config.num_grids, factors)):
        num_cells = grid * grid
        if factor not in downsampled:
            downsampled[factor] = downsample_gt_masks(batch.masks, factor)  # (M, h, w)
        level_claimed = claimed[:, level]  # (M, B)
        level_cells = cells[:, level]  # (M, B)
        # batch-wide cell id image * G + cell; unclaimed slots go to a dump slot at N * G
        dump = batch.num_images * num_cells
        batch_cells = torch.where(
            level_claimed, batch.image[:, None] * num_cells + level_cells, dump)  # (M, B)
        # GTs are written in input order, so the last writer of a cell is its largest instance
        owner = torch.full((dump + 1,), -1, device=device).scatter_reduce_(
            0, batch_cells.flatten(), instance.flatten(), reduce="amax")[:dump]  # (N * G,)
        is_positive = owner >= 0  # (N * G,)
        labels = labels_or_background[torch.where(is_positive, owner, num_instances)]
        labels = labels.view(batch.num_images, grid, grid)  # (N, S, S)
        if keep_shared_cells:
            pos_instance, pos_slot = level_claimed.nonzero(as_tuple=True)  # (K,), (GT, slot) order
            pos_cell = level_cells[pos_instance, pos_slot]
            pos_image = batch.image[pos_instance]
        else:
            positive_ids = is_positive.nonzero().squeeze(1)  # (K,) ascending image * G + cell
            pos_instance = owner[positive_ids]
            pos_image = torch.div(positive_ids, num_cells, rounding_mode="floor")
            pos_cell = positive_ids % num_cells
        levels.append(LevelTargets(
            grid_size=grid, labels=labels, pos_image=pos_image, pos_cell=pos_cell,
            pos_instance=pos_instance, gt_masks=downsampled[factor], num_pos=is_positive.sum()))
    return levels
