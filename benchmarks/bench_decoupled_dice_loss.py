"""pytest-benchmark: Decoupled SOLO's fused dice loss against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_decoupled_dice_loss.py`` (add
``--benchmark-json out.json`` to keep the figures). One group per (size, mode); the ``provider``
axis holds every backend that runs on this machine's devices. ``extra_info["peak_mb"]`` is the
resident-memory peak of one call above what the inputs already hold (CPU, after trimming the C
heap; GPU peaks come from the CUDA allocator).

Sizes: Decoupled SOLO's level 0 at COCO's canonical 800 x 1088 input (SPEC §15.3: one image,
S = 40, 200 x 272 maps, K = 200 positives drawn in 3 x 3 blocks of cells around 25 centres, so that
they share rows and columns as real targets do), and a small level (S = 36, 100 x 136, K = 50).
"""

# N=images, S=grid side, K=positives, H, W=mask-map size

from __future__ import annotations

import pytest

from solo_fast.ops import decoupled_dice_loss
from tests.ops.helpers import benchmark_cases, benchmark_op
from tests.ops.test_decoupled_dice_loss import make_decoupled_inputs

# name -> (N, S, (H, W), K, blocks of cells the positives are drawn in)
SIZES = {"N1_S40_K200_200x272": (1, 40, (200, 272), 200, 25),
         "N1_S36_K50_100x136": (1, 36, (100, 136), 50, 7)}
MODES = ("forward", "backward", "full")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("size", SIZES)
def test_decoupled_dice_loss(benchmark, size, device, provider, mode):
    num_images, grids, pixels, num_positives, blocks = SIZES[size]
    benchmark.group = f"decoupled_dice_loss {size} {mode} ({device})"
    benchmark.extra_info.update(provider=provider, device=device, mode=mode)
    x, y, *rest = make_decoupled_inputs(num_images, grids, pixels, num_positives, device=device,
                                        num_blocks=blocks)
    x.requires_grad_(mode != "forward")
    y.requires_grad_(mode != "forward")
    benchmark_op(benchmark, device=device, mode=mode, leaves=[x, y],
                 loss=lambda: decoupled_dice_loss(x, y, *rest, backend=provider).sum())
