"""pytest-benchmark: the fused dice loss against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_dice_loss.py``.
Cases: ``CASES["dice_loss"]`` of ``solo_fast.bench.cases``, which ``solo-fast bench`` runs too.
Groups, providers and ``extra_info``: ``tests.ops.helpers.benchmark_case``.
"""

from __future__ import annotations

from tests.ops.helpers import benchmark_case, benchmark_parameters

OP = "dice_loss"


@benchmark_parameters(OP)
def test_dice_loss(benchmark, case, mode, device, provider):
    benchmark_case(benchmark, case, mode=mode, device=device, provider=provider)
