"""pytest-benchmark: Decoupled SOLO's fused dice loss against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_decoupled_dice_loss.py`` (add
``--benchmark-json out.json`` to keep the figures). One group per (size, mode); the ``provider``
axis holds every backend that runs on this machine's devices. ``extra_info["peak_mb"]`` is the
resident-memory peak of one call above what the inputs already hold (CPU, after trimming the C
heap; GPU peaks come from the CUDA allocator).

The cases (sizes, inputs, the outputs compared) are ``CASES["decoupled_dice_loss"]`` of
``solo_fast.bench.cases``, which ``solo-fast bench`` runs too (``--size canonical``).

Sizes: Decoupled SOLO's level 0 at COCO's canonical 800 x 1088 input (SPEC §15.3: one image,
S = 40, 200 x 272 maps, K = 200 positives drawn in 3 x 3 blocks of cells around 25 centres, so that
they share rows and columns as real targets do), and a small level (S = 36, 100 x 136, K = 50).
"""

from __future__ import annotations

import pytest

from solo_fast.bench.cases import cases
from tests.ops.helpers import benchmark_case, benchmark_cases

OP = "decoupled_dice_loss"


@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("case,mode", [(case, mode) for case in cases(OP) for mode in case.modes],
                         ids=lambda value: getattr(value, "name", value))
def test_decoupled_dice_loss(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
