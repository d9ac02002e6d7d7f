"""pytest-benchmark: Decoupled SOLO's fused candidate scoring against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_decoupled_mask_scores.py`` (add ``--benchmark-json
out.json`` to keep the figures). One group per size; the ``provider`` axis holds every backend that
runs on this machine's devices. ``extra_info["peak_mb"]`` is the memory peak of one call above what
the inputs already hold (resident set on CPU after trimming the C heap; CUDA allocator on GPU).
Scoring is inference only: the mode is ``forward`` (no autograd).

Sizes: SPEC §9 / §15.3 at COCO's canonical 800 x 1088 input: one image, 128 channels per branch
(the five levels' grids, 40 + 36 + 24 + 16 + 12), 200 x 272 maps, 1,000 candidates drawn in 3 x 3
blocks of cells around 166 centres (so that they share rows and columns as real candidates do),
and 200.
"""

# N=images, C=channels per branch, K=candidates, H, W=mask-map size

from __future__ import annotations

import pytest

from solo_fast.ops import decoupled_mask_scores
from tests.ops.helpers import benchmark_cases, benchmark_op
from tests.ops.test_decoupled_mask_scores import make_decoupled_score_inputs

# name -> (N, C, (H, W), K)
SIZES = {"N1_C128_K1000_200x272": (1, 128, (200, 272), 1000),
         "N1_C128_K200_200x272": (1, 128, (200, 272), 200)}


@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("size", SIZES)
def test_decoupled_mask_scores(benchmark, size, device, provider):
    num_images, channels, pixels, num = SIZES[size]
    benchmark.group = f"decoupled_mask_scores {size} forward ({device})"
    benchmark.extra_info.update(provider=provider, device=device, mode="forward")
    inputs = make_decoupled_score_inputs(num_images, channels, pixels, num, device=device)
    benchmark_op(benchmark, device=device, mode="forward", leaves=[],
                 loss=lambda: decoupled_mask_scores(*inputs, threshold=0.5, backend=provider))
