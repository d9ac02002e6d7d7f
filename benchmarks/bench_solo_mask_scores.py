"""pytest-benchmark: vanilla SOLO's fused candidate scoring against its PyTorch reference.

Run: ``python -m pytest benchmarks/bench_solo_mask_scores.py`` (add ``--benchmark-json
out.json`` to keep the figures). One group per size; the ``provider`` axis holds every backend that
runs on this machine's devices. ``extra_info["peak_mb"]`` is the memory peak of one call above what
the inputs already hold (resident set on CPU after trimming the C heap; CUDA allocator on GPU).
Scoring is inference only: the mode is ``forward`` (no autograd).

Sizes: SPEC §9 / §15.2 at COCO's canonical 800 x 1088 input: one image, mmdetection's grids
(40, 36, 24, 16, 12), each level's mask logits (1, S^2, h, w) at (200, 272), (200, 272),
(100, 136), (50, 68), (50, 68), resized to the level-0 map 200 x 272; 1,000 (and 200) candidates
at distinct random cells of all levels (so ~75 % lie on the two full-size levels, which need no
resize), one op call per level, as the fused post-processing calls it.
"""

# N=images, L=levels, S=grid side, Q=S^2 channels of a level, K=candidates, H, W=mask-map size

from __future__ import annotations

import pytest
import torch

from solo_fast.ops import solo_mask_scores
from tests.ops.helpers import benchmark_cases, benchmark_op

GRIDS = (40, 36, 24, 16, 12)
MAP = (200, 272)  # 800 x 1088 / 4
LEVEL_SIZES = (MAP, MAP, (100, 136), (50, 68), (50, 68))
# name -> K
SIZES = {"N1_K1000_200x272": 1000, "N1_K200_200x272": 200}


def make_solo_level_inputs(num: int, *, seed: int = 0, device: str = "cpu"):
    """Per level, (mask_preds (1, S^2, h, w) logits, image (K_l,), channel (K_l,)) of ``num``
    candidates at distinct random cells of all levels."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randperm(sum(s * s for s in GRIDS), generator=generator)[:num]  # (K,)
    levels, start = [], 0
    for grid, size in zip(GRIDS, LEVEL_SIZES):
        preds = torch.randn((1, grid * grid, *size), generator=generator) * 3  # (1, Q, h, w)
        local = cells[(cells >= start) & (cells < start + grid * grid)] - start  # (K_l,)
        levels.append((preds.to(device), torch.zeros_like(local).to(device), local.to(device)))
        start += grid * grid
    return levels


@pytest.mark.parametrize("device,provider", benchmark_cases(), ids=lambda value: str(value))
@pytest.mark.parametrize("size", SIZES)
def test_solo_mask_scores(benchmark, size, device, provider):
    benchmark.group = f"solo_mask_scores {size} forward ({device})"
    benchmark.extra_info.update(provider=provider, device=device, mode="forward")
    levels = make_solo_level_inputs(SIZES[size], device=device)

    def score():
        for preds, image, channel in levels:
            solo_mask_scores(preds, image, channel, size=MAP, threshold=0.5, backend=provider)

    benchmark_op(benchmark, device=device, mode="forward", leaves=[], loss=score,
                 rounds=10 if provider != "reference" else 5)
