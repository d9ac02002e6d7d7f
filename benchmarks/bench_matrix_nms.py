"""pytest-benchmark: fused Matrix NMS (SOLOv2) against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_matrix_nms.py``.
Cases: ``CASES["matrix_nms"]`` of ``solo_fast.bench.cases``, which ``solo-fast bench`` runs too.
Groups, providers and ``extra_info``: ``tests.ops.helpers.benchmark_case``.

Sizes: n = 100, 500 (the canonical size, docs/algorithms.md §12.9: the configs' nms_pre is 500) and
2,000 candidates on COCO's 200 x 272 stride-4 mask map. Candidates are made as SOLO's are: several
grid cells predict each object, so every candidate is a jittered copy (shifted, rescaled) of one of
n / 8 objects, ellipses and rectangles from 8 to ~100 pixels across, with the object's class
(10 classes; one candidate in ten relabelled at random) and a random score.
"""

from __future__ import annotations

from tests.ops.helpers import benchmark_case, benchmark_parameters

OP = "matrix_nms"


@benchmark_parameters(OP)
def test_matrix_nms(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
