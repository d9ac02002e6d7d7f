"""pytest-benchmark: SOLOv2's fused dynamic mask convolution + dice loss against its reference.

Run: ``python -m pytest benchmarks/bench_dynamic_mask_dice_loss.py``.
Cases: ``CASES["dynamic_mask_dice_loss"]`` of ``solo_fast.bench.cases``, which ``solo-fast bench``
runs too.
Groups, providers and ``extra_info``: ``tests.ops.helpers.benchmark_case``.

Sizes: SOLOv2's training canonical size (docs/algorithms.md §12.9: one image, K = 200 positives,
E = 256 mask-feature channels, 200 x 272 mask map at COCO's 800 x 1088 input), and a
smaller one (two images, K = 50, E = 128, 100 x 136).
"""

from __future__ import annotations

from tests.ops.helpers import benchmark_case, benchmark_parameters

OP = "dynamic_mask_dice_loss"


@benchmark_parameters(OP)
def test_dynamic_mask_dice_loss(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
