"""pytest-benchmark: Decoupled SOLO's fused candidate scoring against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_decoupled_mask_scores.py`` (add ``--benchmark-json
out.json`` to keep the figures). One group per size; the ``provider`` axis holds every backend that
runs on this machine's devices. ``extra_info["peak_mb"]`` is the memory peak of one call above what
the inputs already hold (resident set on CPU after trimming the C heap; CUDA allocator on GPU).
Scoring is inference only: the mode is ``forward`` (no autograd).

The cases (sizes, inputs, the outputs compared) are ``CASES["decoupled_mask_scores"]`` of
``solo_fast.bench.cases``, which ``solo-fast bench`` runs too (``--size canonical``).

Sizes: SPEC §9 / §15.3 at COCO's canonical 800 x 1088 input: one image, 128 channels per branch
(the five levels' grids, 40 + 36 + 24 + 16 + 12), 200 x 272 maps, 1,000 candidates drawn in 3 x 3
blocks of cells around 166 centres (so that they share rows and columns as real candidates do),
and 200.
"""

from __future__ import annotations

import pytest

from solo_fast.bench.cases import cases
from tests.ops.helpers import benchmark_case, benchmark_cases

OP = "decoupled_mask_scores"


@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("case,mode", [(case, mode) for case in cases(OP) for mode in case.modes],
                         ids=lambda value: getattr(value, "name", value))
def test_decoupled_mask_scores(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
