"""pytest-benchmark: vanilla SOLO's fused candidate scoring against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_solo_mask_scores.py``.
Cases: ``CASES["solo_mask_scores"]`` of ``solo_fast.bench.cases``, which ``solo-fast bench``
runs too.
Groups, providers and ``extra_info``: ``tests.ops.helpers.benchmark_case``.

Sizes: docs/algorithms.md §10 / §12.9 at COCO's canonical 800 x 1088 input: one image, mmdetection's
grids (40, 36, 24, 16, 12), each level's mask logits (1, S^2, h, w) at (200, 272), (200, 272), (100,
136), (50, 68), (50, 68), resized to the level-0 map 200 x 272; 1,000 (and 200) candidates at
distinct random cells of all levels (so ~75 % lie on the two full-size levels, which need no
resize), one op call per level, as the fused post-processing calls it.
"""

from __future__ import annotations

from tests.ops.helpers import benchmark_case, benchmark_parameters

OP = "solo_mask_scores"


@benchmark_parameters(OP)
def test_solo_mask_scores(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
