"""pytest-benchmark: SOLOv2's fused candidate scoring against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_dynamic_mask_scores.py``.
Cases: ``CASES["dynamic_mask_scores"]`` of ``solo_fast.bench.cases``, which ``solo-fast bench``
runs too.
Groups, providers and ``extra_info``: ``tests.ops.helpers.benchmark_case``.

Sizes: docs/algorithms.md §10 / §12.9 at COCO's canonical 800 x 1088 input: one image, E = 256
mask-feature channels, a 200 x 272 mask map, 1,000 candidates (score > 0.1 before nms_pre) and 200.
The ``pack_masks`` axis times the op with and without writing the bit-packed binary masks (K x P / 8
bytes, 6.8 MB at K = 1,000) that SOLOv2's fused post-processing hands to matrix NMS.
``test_cpu_schedules`` times the C++ kernel's two schedules (SOLO_FAST_SCORES_SCHEDULE): tiles in
parallel with single-threaded GEMMs, or tiles in sequence with multi-threaded GEMMs.
"""

from __future__ import annotations

import pytest

from solo_fast.bench.cases import cases
from tests.ops.helpers import benchmark_case, benchmark_cases, benchmark_op, benchmark_parameters

OP = "dynamic_mask_scores"


@benchmark_parameters(OP)
def test_dynamic_mask_scores(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)


@pytest.mark.parametrize("schedule", ["tiles", "gemm"])
def test_cpu_schedules(benchmark, schedule, monkeypatch):
    if ("cpu", "cpu") not in benchmark_cases():
        pytest.skip("solo_fast._C is not built")
    (case,) = [c for c in cases(OP, ("canonical",)) if c.variant == "scores"]
    monkeypatch.setenv("SOLO_FAST_SCORES_SCHEDULE", schedule)
    benchmark.group = f"{OP} {case.size} cpu schedules"
    benchmark.extra_info.update(provider="cpu", device="cpu", mode="forward", schedule=schedule)
    problem = case.make("cpu")
    benchmark_op(benchmark, device="cpu", mode="forward", leaves=[],
                 loss=lambda: problem.loss("cpu"))
