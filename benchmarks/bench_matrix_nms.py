"""pytest-benchmark: fused Matrix NMS (SOLOv2) against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_matrix_nms.py`` (add ``--benchmark-json out.json`` to
keep the figures). One group per size; the ``provider`` axis holds every backend that runs on this
machine's devices. Matrix NMS is inference only, so the one mode is ``forward`` (no autograd).
``extra_info["peak_mb"]`` is the resident-memory peak of one call above what the inputs already
hold (CPU; GPU peaks come from the CUDA allocator).

Sizes: n = 100, 500 (the canonical size, SPEC §15.5: the configs' nms_pre is 500) and 2,000
candidates on COCO's 200 x 272 stride-4 mask map. Candidates are made as SOLO's are: several grid
cells predict each object, so every candidate is a jittered copy (shifted, rescaled) of one of
n / 8 objects, ellipses and rectangles from 8 to ~100 pixels across, with the object's class
(10 classes; one candidate in ten relabelled at random) and a random score.
"""

# n=candidates, H, W=mask-map size

from __future__ import annotations

import pytest
import torch

from solo_fast.ops import matrix_nms
from tests.ops.helpers import benchmark_cases, benchmark_op

SIZES = {"n100_200x272": 100, "n500_200x272": 500, "n2000_200x272": 2000}
MAP = (200, 272)


def make_candidates(num: int, size: tuple[int, int] = MAP, *, num_classes: int = 10,
                    seed: int = 0):
    """(masks (n, H, W) bool, labels (n,) int64, scores (n,) float32), see the module doc."""
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


@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("size", SIZES)
def test_matrix_nms(benchmark, size, device, provider):
    num = SIZES[size]
    benchmark.group = f"matrix_nms {size} forward ({device})"
    benchmark.extra_info.update(provider=provider, device=device, mode="forward")
    masks, labels, scores = (t.to(device) for t in make_candidates(num))
    # SOLOv2's test configuration (SPEC §1.7), with the filter off so every candidate is kept
    # and the outputs are as large as they can be
    kwargs = {"nms_pre": num, "max_num": 100, "kernel": "gaussian", "sigma": 2.0}
    rounds = 3 if num > 1000 else 10  # the reference takes seconds at n = 2,000
    benchmark_op(benchmark, device=device, mode="forward", leaves=[], rounds=rounds,
                 loss=lambda: matrix_nms(masks, labels, scores, backend=provider, **kwargs))
