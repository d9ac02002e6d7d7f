"""pytest-benchmark: the fused dice loss against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_dice_loss.py`` (add ``--benchmark-json out.json`` to keep
the figures). One group per (size, mode); the ``provider`` axis holds every backend that runs on
this machine's devices. ``extra_info["peak_mb"]`` is the resident-memory peak of one call above what
the inputs already hold (CPU; GPU peaks come from the CUDA allocator).
"""

from __future__ import annotations

import pytest

from solo_fast.ops import dice_loss
from tests.ops.helpers import benchmark_cases, benchmark_op, make_dice_inputs

SIZES = {"K200_200x272": (200, (200, 272)), "K50_100x136": (50, (100, 136))}
MODES = ("forward", "backward", "full")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("size", SIZES)
def test_dice_loss(benchmark, size, device, provider, mode):
    num_masks, pixels = SIZES[size]
    benchmark.group = f"dice_loss {size} {mode} ({device})"
    benchmark.extra_info.update(provider=provider, device=device, mode=mode)
    pred, target = make_dice_inputs(num_masks, pixels, device=device)
    pred.requires_grad_(mode != "forward")
    benchmark_op(benchmark, device=device, mode=mode, leaves=[pred],
                 loss=lambda: dice_loss(pred, target, backend=provider).sum())
