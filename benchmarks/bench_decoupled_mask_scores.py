"""pytest-benchmark: Decoupled SOLO's fused candidate scoring against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_decoupled_mask_scores.py``.
Cases: ``CASES["decoupled_mask_scores"]`` of ``solo_fast.bench.cases``, which ``solo-fast bench``
runs too.
Groups, providers and ``extra_info``: ``tests.ops.helpers.benchmark_case``.

Sizes: docs/algorithms.md §10 / §12.9 at COCO's canonical 800 x 1088 input: one image, 128 channels
per branch (the five levels' grids, 40 + 36 + 24 + 16 + 12), 200 x 272 maps, 1,000 candidates drawn
in 3 x 3 blocks of cells around 166 centres (so that they share rows and columns as real candidates
do), and 200.
"""

from __future__ import annotations

from tests.ops.helpers import benchmark_case, benchmark_parameters

OP = "decoupled_mask_scores"


@benchmark_parameters(OP)
def test_decoupled_mask_scores(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
