"""pytest-benchmark: vanilla SOLO's fused candidate scoring against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_solo_mask_scores.py`` (add ``--benchmark-json
out.json`` to keep the figures). One group per size; the ``provider`` axis holds every backend that
runs on this machine's devices. ``extra_info["peak_mb"]`` is the memory peak of one call above what
the inputs already hold (resident set on CPU after trimming the C heap; CUDA allocator on GPU).
Scoring is inference only: the mode is ``forward`` (no autograd).

The cases (sizes, inputs, the outputs compared) are ``CASES["solo_mask_scores"]`` of
``solo_fast.bench.cases``, which ``solo-fast bench`` runs too (``--size canonical``).

Sizes: SPEC §9 / §15.2 at COCO's canonical 800 x 1088 input: one image, mmdetection's grids
(40, 36, 24, 16, 12), each level's mask logits (1, S^2, h, w) at (200, 272), (200, 272),
(100, 136), (50, 68), (50, 68), resized to the level-0 map 200 x 272; 1,000 (and 200) candidates
at distinct random cells of all levels (so ~75 % lie on the two full-size levels, which need no
resize), one op call per level, as the fused post-processing calls it.
"""

from __future__ import annotations

import pytest

from solo_fast.bench.cases import cases
from tests.ops.helpers import benchmark_case, benchmark_cases

OP = "solo_mask_scores"


@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("case,mode", [(case, mode) for case in cases(OP) for mode in case.modes],
                         ids=lambda value: getattr(value, "name", value))
def test_solo_mask_scores(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
