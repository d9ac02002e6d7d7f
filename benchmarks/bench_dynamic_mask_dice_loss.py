"""pytest-benchmark: SOLOv2's fused dynamic mask convolution + dice loss against its reference.

Run: ``python -m pytest benchmarks/bench_dynamic_mask_dice_loss.py`` (add
``--benchmark-json out.json`` to keep the figures). One group per (size, mode); the ``provider``
axis holds every backend that runs on this machine's devices. ``extra_info["peak_mb"]`` is the
resident-memory peak of one call above what the inputs already hold (CPU, after trimming the C
heap; GPU peaks come from the CUDA allocator).

Sizes: SOLOv2's training canonical size (SPEC §15.4 and KERNELS.md: one image, K = 200
positives, E = 256 mask-feature channels, 200 x 272 mask map at COCO's 800 x 1088 input), and a
smaller one (two images, K = 50, E = 128, 100 x 136).
"""

# N=images, E=mask-feature channels, K=positives, H, W=mask-map size

from __future__ import annotations

import pytest

from solo_fast.ops import dynamic_mask_dice_loss
from tests.ops.helpers import benchmark_cases, benchmark_op
from tests.ops.test_dynamic_mask_dice_loss import make_dynamic_inputs

# name -> (N, E, (H, W), K)
SIZES = {"N1_K200_E256_200x272": (1, 256, (200, 272), 200),
         "N2_K50_E128_100x136": (2, 128, (100, 136), 50)}
MODES = ("forward", "backward", "full")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("size", SIZES)
def test_dynamic_mask_dice_loss(benchmark, size, device, provider, mode):
    num_images, channels, pixels, num_positives = SIZES[size]
    benchmark.group = f"dynamic_mask_dice_loss {size} {mode} ({device})"
    benchmark.extra_info.update(provider=provider, device=device, mode=mode)
    kernels, feats, pos_image, target = make_dynamic_inputs(
        num_images, channels, pixels, num_positives, device=device, empty_image=False)
    kernels.requires_grad_(mode != "forward")
    feats.requires_grad_(mode != "forward")
    benchmark_op(benchmark, device=device, mode=mode, leaves=[kernels, feats],
                 loss=lambda: dynamic_mask_dice_loss(kernels, feats, pos_image, target,
                                                     backend=provider).sum())
