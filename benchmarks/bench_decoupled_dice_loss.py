"""pytest-benchmark: Decoupled SOLO's fused dice loss against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_decoupled_dice_loss.py``.
Cases: ``CASES["decoupled_dice_loss"]`` of ``solo_fast.bench.cases``, which ``solo-fast bench``
runs too.
Groups, providers and ``extra_info``: ``tests.ops.helpers.benchmark_case``.

Sizes: Decoupled SOLO's level 0 at COCO's canonical 800 x 1088 input (docs/algorithms.md §12.9: one
image, S = 40, 200 x 272 maps, K = 200 positives drawn in 3 x 3 blocks of cells around 25 centres,
so that they share rows and columns as real targets do), and a small level (S = 36, 100 x 136,
K = 50).
"""

from __future__ import annotations

from tests.ops.helpers import benchmark_case, benchmark_parameters

OP = "decoupled_dice_loss"


@benchmark_parameters(OP)
def test_decoupled_dice_loss(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
