"""pytest-benchmark: fused Matrix NMS (SOLOv2) against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_matrix_nms.py`` (add ``--benchmark-json out.json`` to
keep the figures). One group per size; the ``provider`` axis holds every backend that runs on this
machine's devices. Matrix NMS is inference only, so the one mode is ``forward`` (no autograd).
``extra_info["peak_mb"]`` is the resident-memory peak of one call above what the inputs already
hold (CPU; GPU peaks come from the CUDA allocator).

The cases (sizes, inputs, the outputs compared) are ``CASES["matrix_nms"]`` of
``solo_fast.bench.cases``, which ``solo-fast bench`` runs too (``--size canonical``).

Sizes: n = 100, 500 (the canonical size, SPEC §15.5: the configs' nms_pre is 500) and 2,000
candidates on COCO's 200 x 272 stride-4 mask map. Candidates are made as SOLO's are: several grid
cells predict each object, so every candidate is a jittered copy (shifted, rescaled) of one of
n / 8 objects, ellipses and rectangles from 8 to ~100 pixels across, with the object's class
(10 classes; one candidate in ten relabelled at random) and a random score.
"""

from __future__ import annotations

import pytest

from solo_fast.bench.cases import cases
from tests.ops.helpers import benchmark_case, benchmark_cases

OP = "matrix_nms"


@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("case,mode", [(case, mode) for case in cases(OP) for mode in case.modes],
                         ids=lambda value: getattr(value, "name", value))
def test_matrix_nms(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
