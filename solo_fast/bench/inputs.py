"""Random inputs of every fused op, shared by the op tests, the benchmarks and ``solo-fast bench``.

They live in the package (not the tests) so that ``solo-fast bench`` runs the benchmarks' cases
from an installed package, where neither tests/ nor benchmarks/ exist.
"""

# N=images, S=grid side, E=mask-feature channels, C=channels per branch, K=positives or
# candidates, L=levels, Q=S^2 channels of a level, H, W=mask-map size, n=NMS candidates

from __future__ import annotations

import torch

__all__ = ["make_decoupled_inputs", "make_decoupled_score_inputs", "make_dice_inputs",
           "make_dynamic_dice_inputs", "make_dynamic_score_inputs", "make_nms_candidates",
           "make_solo_level_inputs"]


def make_dice_inputs(num_masks: int, pixels: tuple[int, ...], *, dtype=torch.float32,
                     target_dtype=torch.bool, logits: bool = True, seed: int = 0,
                     device: str = "cpu"):
    """Random (pred, target) for the dice loss: pred (N, *pixels), target of pred's shape.

    Logits are spread over [-6, 6] so both sigmoid tails are exercised; probabilities lie in
    [0, 1]. Target row 0 is all zero when N > 1 (the loss is then 1 whatever pred is).
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (num_masks, *pixels)
    if logits:
        pred = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    else:
        pred = torch.rand(shape, generator=generator, dtype=torch.float64)
    target = torch.rand(shape, generator=generator) > 0.6
    if num_masks > 1:
        target[0] = False
    pred = pred.to(dtype=dtype, device=device)
    target = target.to(dtype=target_dtype, device=device)
    return pred, target


def make_decoupled_inputs(num_images: int, grids: int, size: tuple[int, int], num_positives: int,
                          *, dtype=torch.float32, target_dtype=torch.bool, seed: int = 0,
                          device: str = "cpu", num_blocks: int | None = None):
    """Random (x_logits, y_logits, pos_image, pos_row, pos_col, target) as a level's targets.

    Logits (N, S, H, W) spread over about [-9, 9], so both sigmoid tails are exercised. Positives
    are drawn, in random order, in 3 x 3 blocks of cells around ``num_blocks`` random centres (as
    SOLO assigns a GT's centre region), so that they share rows and columns; positive 1 repeats
    positive 0's cell (a duplicate) when K > 1. Target 0 is all zero when K > 1.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (num_images, grids, *size)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    y = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    num_blocks = max(1, num_positives // 6) if num_blocks is None else num_blocks
    centre_image = torch.randint(num_images, (num_blocks,), generator=generator)
    centre_row = torch.randint(grids, (num_blocks,), generator=generator)
    centre_col = torch.randint(grids, (num_blocks,), generator=generator)
    block = torch.randint(num_blocks, (num_positives,), generator=generator)
    offset_row = torch.randint(-1, 2, (num_positives,), generator=generator)
    offset_col = torch.randint(-1, 2, (num_positives,), generator=generator)
    pos_image = centre_image[block]
    pos_row = (centre_row[block] + offset_row).clamp(0, grids - 1)
    pos_col = (centre_col[block] + offset_col).clamp(0, grids - 1)
    if num_positives > 1:
        pos_image[1], pos_row[1], pos_col[1] = pos_image[0], pos_row[0], pos_col[0]
    target = torch.rand((num_positives, *size), generator=generator) > 0.6
    if num_positives > 1:
        target[0] = False
    x, y = x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)
    return (x, y, pos_image.to(device), pos_row.to(device), pos_col.to(device),
            target.to(dtype=target_dtype, device=device))


def make_dynamic_dice_inputs(num_images: int, channels: int, size: tuple[int, int],
                             num_positives: int, *, dtype=torch.float32,
                             target_dtype=torch.bool, seed: int = 0, device: str = "cpu",
                             empty_image: bool = True):
    """Random (kernels, mask_feats, pos_image, target) as a batch's SOLOv2 positives.

    Logits z = kernels . mask_feats have a standard deviation of about 3, so both sigmoid tails
    are exercised. Positives come in random image order; positive 1 repeats positive 0 (a
    duplicate kernel and target) when K > 1, target 0 is all zero when K > 1, and the last image
    has no positive when N > 1 and ``empty_image``.
    """
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn((num_images, channels, *size), generator=generator, dtype=torch.float64)
    kernels = torch.randn((num_positives, channels), generator=generator, dtype=torch.float64)
    kernels *= 3 / max(channels, 1) ** 0.5
    images = num_images - 1 if num_images > 1 and empty_image else num_images
    pos_image = torch.randint(images, (num_positives,), generator=generator)
    target = torch.rand((num_positives, *size), generator=generator) > 0.6
    if num_positives > 1:
        kernels[1], pos_image[1], target[1] = kernels[0], pos_image[0], target[0]
        target[0] = False
    return (kernels.to(dtype=dtype, device=device), feats.to(dtype=dtype, device=device),
            pos_image.to(device), target.to(dtype=target_dtype, device=device))


def make_decoupled_score_inputs(num_images: int, channels: int, size: tuple[int, int],
                                num: int, *, dtype=torch.float32, seed: int = 0,
                                device: str = "cpu", num_blocks: int | None = None):
    """Random (x_probs, y_probs, image, row, col) of Decoupled SOLO candidates.

    Probabilities are sigmoids of logits spread over about [-6, 6], so the products cover
    (0, 1) with many near 0.5. Candidates are drawn, in random order, in 3 x 3 blocks of cells
    around ``num_blocks`` random centres, so that they share rows and columns as real candidates
    do; candidate 1 repeats candidate 0's cell when K > 1. With N > 1 the middle image gets none.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (num_images, channels, *size)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).sigmoid()
    y = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).sigmoid()
    num_blocks = max(1, num // 6) if num_blocks is None else num_blocks
    used = torch.tensor([n for n in range(num_images) if num_images == 1 or n != num_images // 2])
    centre_image = used[torch.randint(len(used), (num_blocks,), generator=generator)]
    centre_row = torch.randint(channels, (num_blocks,), generator=generator)
    centre_col = torch.randint(channels, (num_blocks,), generator=generator)
    block = torch.randint(num_blocks, (num,), generator=generator)
    image = centre_image[block]
    row = (centre_row[block] + torch.randint(-1, 2, (num,), generator=generator))
    col = (centre_col[block] + torch.randint(-1, 2, (num,), generator=generator))
    row, col = row.clamp(0, channels - 1), col.clamp(0, channels - 1)
    if num > 1:
        image[1], row[1], col[1] = image[0], row[0], col[0]
    return (x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device), image.to(device),
            row.to(device), col.to(device))


def make_dynamic_score_inputs(num_images: int, channels: int, size: tuple[int, int], num: int,
                              *, dtype=torch.float32, seed: int = 0, device: str = "cpu",
                              exact: bool = True):
    """Random (kernels, mask_feats, image) of SOLOv2 candidates.

    ``exact``: kernels and features are multiples of 1/8 in [-1, 1], so every logit is a multiple
    of 1/64 that float32 (and float16 / bfloat16 for |z| < 32) hold exactly whatever order a GEMM
    sums in. The logits then spread around 0 (many are exactly 0, where s = 0.5 must not pass a
    0.5 threshold), and no soft value lies within an ulp of the thresholds the tests use, so the
    thresholded sets of every backend must equal the reference's exactly. Otherwise normal values
    (logits of standard deviation ~sqrt(E)/2).

    Candidates come in random image order; with N > 1 the middle image gets none.
    """
    generator = torch.Generator().manual_seed(seed)
    if exact:
        kernels = torch.randint(-8, 9, (num, channels), generator=generator) / 8
        feats = torch.randint(-8, 9, (num_images, channels, *size), generator=generator) / 8
    else:
        kernels = torch.randn((num, channels), generator=generator, dtype=torch.float64) / 2
        feats = torch.randn((num_images, channels, *size), generator=generator,
                            dtype=torch.float64)
    used = [n for n in range(num_images) if num_images == 1 or n != num_images // 2]
    image = torch.tensor(used)[torch.randint(len(used), (num,), generator=generator)]
    return (kernels.to(dtype=dtype, device=device), feats.to(dtype=dtype, device=device),
            image.to(device))


def make_solo_level_inputs(num: int, grids: tuple[int, ...],
                           level_sizes: tuple[tuple[int, int], ...], *, seed: int = 0,
                           device: str = "cpu"):
    """Per level, (mask_preds (1, S^2, h, w) logits, image (K_l,), channel (K_l,)) of ``num``
    candidates at distinct random cells of all levels (SOLO's grids ``grids``, each level's map
    ``level_sizes``), logits spread over about [-9, 9]."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randperm(sum(s * s for s in grids), generator=generator)[:num]  # (K,)
    levels, start = [], 0
    for grid, size in zip(grids, level_sizes, strict=True):
        preds = torch.randn((1, grid * grid, *size), generator=generator) * 3  # (1, Q, h, w)
        local = cells[(cells >= start) & (cells < start + grid * grid)] - start  # (K_l,)
        levels.append((preds.to(device), torch.zeros_like(local).to(device), local.to(device)))
        start += grid * grid
    return levels


def make_nms_candidates(num: int, size: tuple[int, int], *, num_classes: int = 10,
                        seed: int = 0):
    """(masks (n, H, W) bool, labels (n,) int64, scores (n,) float32) made as SOLO's are.

    Several grid cells predict each object, so every candidate is a jittered copy (shifted,
    rescaled) of one of n / 8 objects, ellipses and rectangles from 8 px to half the map's side
    across, with the object's class (one candidate in ten relabelled at random) and a random
    score.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    objects = max(1, num // 8)

    def uniform(count, low, high):
        return low + (high - low) * torch.rand(count, generator=generator)

    centre = torch.stack([uniform(objects, 0, height), uniform(objects, 0, width)], 1)
    radius = torch.stack([uniform(objects, 4, height / 4), uniform(objects, 4, width / 4)], 1)
    object_class = torch.randint(num_classes, (objects,), generator=generator)
    which = torch.randint(objects, (num,), generator=generator)
    jitter = torch.randn(num, 2, generator=generator)
    radii = radius[which] * (1 + 0.15 * torch.randn(num, 1, generator=generator)).clamp(0.5)
    centres = centre[which] + 0.2 * radius[which] * jitter  # (n, 2)
    ys = torch.arange(height, dtype=torch.float32)
    xs = torch.arange(width, dtype=torch.float32)
    masks = torch.empty(num, height, width, dtype=torch.bool)
    for begin in range(0, num, 100):  # in chunks: the float distances are 4 bytes a pixel
        end = min(num, begin + 100)
        dy = (ys[None, :, None] - centres[begin:end, 0, None, None]) / radii[begin:end, 0, None,
                                                                             None]  # (c, H, 1)
        dx = (xs[None, None, :] - centres[begin:end, 1, None, None]) / radii[begin:end, 1, None,
                                                                             None]  # (c, 1, W)
        ellipse = dy * dy + dx * dx <= 1  # (c, H, W)
        rectangle = (dy.abs() <= 1) & (dx.abs() <= 1)  # (c, H, W)
        odd = (torch.arange(begin, end) % 2 == 1)[:, None, None]
        masks[begin:end] = torch.where(odd, rectangle, ellipse)
    empty = ~masks.flatten(1).any(1)
    masks[empty, height // 2, width // 2] = True  # the heads never pass empty masks
    labels = object_class[which]
    relabel = torch.rand(num, generator=generator) < 0.1
    labels[relabel] = torch.randint(num_classes, (int(relabel.sum()),), generator=generator)
    scores = torch.rand(num, generator=generator)
    return masks, labels, scores

