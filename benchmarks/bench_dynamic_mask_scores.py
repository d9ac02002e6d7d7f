"""pytest-benchmark: SOLOv2's fused candidate scoring against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_dynamic_mask_scores.py`` (add ``--benchmark-json
out.json`` to keep the figures). One group per size; the ``provider`` axis holds every backend that
runs on this machine's devices. ``extra_info["peak_mb"]`` is the memory peak of one call above what
the inputs already hold (resident set on CPU after trimming the C heap; CUDA allocator on GPU).
Scoring is inference only: the mode is ``forward`` (no autograd).

Sizes: SPEC §9 / §15.4 at COCO's canonical 800 x 1088 input: one image, E = 256 mask-feature
channels, a 200 x 272 mask map, 1,000 candidates (score > 0.1 before nms_pre) and 200. The
``pack_masks`` axis times the op with and without writing the bit-packed binary masks (K x P / 8
bytes, 6.8 MB at K = 1,000) that SOLOv2's fused post-processing hands to matrix NMS.
``test_cpu_schedules`` times the C++ kernel's two schedules (SOLO_FAST_SCORES_SCHEDULE): tiles in
parallel with single-threaded GEMMs, or tiles in sequence with multi-threaded GEMMs.
"""

# N=images, E=mask-feature channels, K=candidates, H, W=mask-map size

from __future__ import annotations

import pytest

from solo_fast.ops import dynamic_mask_scores
from tests.ops.helpers import benchmark_cases, benchmark_op
from tests.ops.test_dynamic_mask_scores import make_dynamic_inputs

# name -> (N, E, (H, W), K)
SIZES = {"N1_E256_K1000_200x272": (1, 256, (200, 272), 1000),
         "N1_E256_K200_200x272": (1, 256, (200, 272), 200)}


@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("pack_masks", [False, True], ids=["scores", "scores+packed"])
@pytest.mark.parametrize("size", SIZES)
def test_dynamic_mask_scores(benchmark, size, pack_masks, device, provider):
    num_images, channels, pixels, num = SIZES[size]
    benchmark.group = f"dynamic_mask_scores {size} forward ({device})"
    benchmark.extra_info.update(provider=provider, device=device, mode="forward",
                                pack_masks=pack_masks)
    inputs = make_dynamic_inputs(num_images, channels, pixels, num, device=device, exact=False)
    benchmark_op(benchmark, device=device, mode="forward", leaves=[],
                 loss=lambda: dynamic_mask_scores(*inputs, threshold=0.5, backend=provider,
                                                  pack_masks=pack_masks))


@pytest.mark.parametrize("schedule", ["tiles", "gemm"])
def test_cpu_schedules(benchmark, schedule, monkeypatch):
    if ("cpu", "cpu") not in benchmark_cases():
        pytest.skip("solo_fast._C is not built")
    size = "N1_E256_K1000_200x272"
    num_images, channels, pixels, num = SIZES[size]
    monkeypatch.setenv("SOLO_FAST_SCORES_SCHEDULE", schedule)
    benchmark.group = f"dynamic_mask_scores {size} cpu schedules"
    benchmark.extra_info.update(provider="cpu", device="cpu", mode="forward", schedule=schedule)
    inputs = make_dynamic_inputs(num_images, channels, pixels, num, exact=False)
    benchmark_op(benchmark, device="cpu", mode="forward", leaves=[],
                 loss=lambda: dynamic_mask_scores(*inputs, threshold=0.5, backend="cpu"))
