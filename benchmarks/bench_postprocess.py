"""pytest-benchmark: the fused post-processing (default path) against the reference path.

Run: ``python -m pytest benchmarks/bench_postprocess.py`` (add ``--benchmark-json out.json`` to
keep the figures). One group per family; the ``provider`` axis holds ``reference`` (the reference
path, ``backend="reference"``), ``fused-<backend>`` (the fused path with its ops on that backend:
``cpu`` here) and ``matrix_nms`` (the matrix NMS alone on the same ~500 candidates, which both
paths run identically through the reference matrix NMS: its share of either time). The
``-no-nms`` providers run a path with its matrix-NMS call replaced by a replay of that call's
recorded result: time and peak memory of everything but the NMS, which a fused NMS will replace
(the reference NMS alone peaks at ~165 MB, more than the rest of the fused path). Every call is
one image's raw head outputs -> bool masks at the original size, under ``torch.no_grad``.
``extra_info["peak_mb"]`` is the resident-memory peak of one call above what the inputs hold.
``PYTHONPATH=. python benchmarks/bench_postprocess.py`` times the two paths alternately instead.

Synthetic head outputs (fixed seed), one image at 800 x 1088 (mask map 200 x 272), 80 classes,
mmdetection's grids (40, 36, 24, 16, 12) and test_cfg: every class logit is -10 except one
(cell, class) pair at each of 1,000 distinct random cells, logit uniform in [-1.5, 3] (score
0.18-0.95 > score_thr 0.1), so points NMS keeps ~1,000 candidates (it drops the few same-class
neighbours). Half of those cells (random) get an empty mask (area 0 <= stride: filtered), half a
smooth blob covering ~15 % of the map, so ~500 candidates reach matrix NMS, whose max_per_img
keeps 100.

- SOLOv2 (E = 256): mask features are smooth random fields (bilinear upsampling of a 13 x 17
  Gaussian grid) with channel 0 set to 1, a bias channel: a kept cell's kernel is a random
  direction with bias -1 x the field's std (~15 % of pixels above 0); a filtered cell's bias is
  -50 (no pixel above 0).
- Decoupled SOLO: X and Y logits per level at strides 4, 4, 8, 16, 16 are smooth random fields
  + 0.5 (product > 0.5 on ~17 % of the map); every odd grid row's Y map is -10 everywhere (product
  ~0), so the candidates in those rows (~half) are filtered.
- SOLO: mask logits per level (1, S^2, h, w) at strides 4, 4, 8, 16, 16 (667 MB in all), -10
  everywhere (empty masks) except a kept candidate cell's channel: a smooth random field minus
  its std (~15 % of pixels above 0). The fused path resizes only the candidates' channels, in the
  scoring op; the reference path gathers and resizes them (K x H4 x W4 floats).
"""

# N=images, L=levels, S=grid side, C=classes, E=mask-feature channels, K=candidates,
# H4, W4=stride-4 mask map

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from solo_fast.config import TestConfig
from solo_fast.models.decoupled_solo import DecoupledSOLOOutput
from solo_fast.models.solo import SOLOOutput
from solo_fast.models.solov2 import SOLOv2Output
from solo_fast.postprocess import (
    DecoupledSOLOPostProcessor,
    SOLOPostProcessor,
    SOLOv2PostProcessor,
    fused,
)
from solo_fast.postprocess import reference as reference_path
from tests.ops.helpers import benchmark_cases, benchmark_op

GRIDS = (40, 36, 24, 16, 12)
STRIDES = (8, 8, 16, 32, 32)
CLASSES = 80
CANDIDATES = 1000
MAP = (200, 272)  # 800 x 1088 / 4
# the mask maps of the levels (strides 4, 4, 8, 16, 16)
LEVEL_SIZES = (MAP, MAP, (MAP[0] // 2, MAP[1] // 2), (MAP[0] // 4, MAP[1] // 4),
               (MAP[0] // 4, MAP[1] // 4))
IMAGE_SIZES = [(800, 1066)]
ORIGINAL_SIZES = [(480, 640)]
# the fused path with every compiled op backend (its ops' PyTorch references only materialise)
FUSED = [f"fused-{backend}" for device, backend in benchmark_cases()
         if device == "cpu" and backend != "reference"]
PROVIDERS = ["reference", *FUSED, "matrix_nms", "reference-no-nms",
             *(f"{name}-no-nms" for name in FUSED)]
FAMILIES = ("solov2", "decoupled_solo", "solo")


def _smooth(generator: torch.Generator, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(1, channels, *size) smooth random fields of unit scale."""
    coarse = torch.randn(1, channels, 13, 17, generator=generator)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def _candidate_cells(generator: torch.Generator, allowed: torch.Tensor | None = None):
    """(cells, classes, logits) of CANDIDATES distinct cells over all levels."""
    cells = torch.arange(sum(s * s for s in GRIDS)) if allowed is None else allowed
    cells = cells[torch.randperm(len(cells), generator=generator)[:CANDIDATES]]
    classes = torch.randint(0, CLASSES, (CANDIDATES,), generator=generator)
    logits = torch.rand(CANDIDATES, generator=generator) * 4.5 - 1.5
    return cells, classes, logits


def _class_logits(cells, classes, logits) -> list[torch.Tensor]:
    flat = torch.full((sum(s * s for s in GRIDS), CLASSES), -10.0)  # (G, C)
    flat[cells, classes] = logits
    levels, start = [], 0
    for grid in GRIDS:  # (S*S, C) -> (1, C, S, S)
        levels.append(flat[start:start + grid * grid].T.reshape(1, CLASSES, grid, grid))
        start += grid * grid
    return levels


def make_solov2_outputs(seed: int = 0, channels: int = 256) -> SOLOv2Output:
    generator = torch.Generator().manual_seed(seed)
    cells, classes, logits = _candidate_cells(generator)
    feats = _smooth(generator, channels, MAP)  # (1, E, H4, W4)
    feats[:, 0] = 1.0  # the bias channel
    kernels = torch.randn(sum(s * s for s in GRIDS), channels, generator=generator)  # (G, E)
    kernels[:, 0] = 0.0
    kernels /= kernels.norm(dim=1, keepdim=True)
    # the field w . f has std ~ std(f) |w| = std(f): a bias of -1 std keeps ~15 % of the map
    scale = feats[:, 1:].std().item()
    filtered = torch.rand(CANDIDATES, generator=generator) < 0.5
    kernels[cells, 0] = torch.where(filtered, -50.0, -1.0 * scale)
    levels, start = [], 0
    for grid in GRIDS:  # (S*S, E) -> (1, E, S, S)
        levels.append(kernels[start:start + grid * grid].T.reshape(1, channels, grid, grid))
        start += grid * grid
    return SOLOv2Output(levels, _class_logits(cells, classes, logits), feats)


def make_decoupled_outputs(seed: int = 0) -> DecoupledSOLOOutput:
    generator = torch.Generator().manual_seed(seed)
    xs = [_smooth(generator, grid, size) + 0.5 for grid, size in zip(GRIDS, LEVEL_SIZES)]
    ys = [_smooth(generator, grid, size) + 0.5 for grid, size in zip(GRIDS, LEVEL_SIZES)]
    for y in ys:  # odd grid rows are dead (Y = -10: empty product masks)
        y[:, 1::2] = -10.0
    cells, classes, logits = _candidate_cells(generator)
    return DecoupledSOLOOutput(xs, ys, _class_logits(cells, classes, logits))


def make_solo_outputs(seed: int = 0) -> SOLOOutput:
    generator = torch.Generator().manual_seed(seed)
    cells, classes, logits = _candidate_cells(generator)
    blobs = cells[torch.rand(CANDIDATES, generator=generator) < 0.5]  # the others stay empty
    levels, start = [], 0
    for grid, size in zip(GRIDS, LEVEL_SIZES):
        maps = torch.full((1, grid * grid, *size), -10.0)  # (1, S*S, h, w)
        local = blobs[(blobs >= start) & (blobs < start + grid * grid)] - start
        if len(local):
            field = _smooth(generator, len(local), size)[0]  # (k, h, w)
            maps[0, local] = field - field.std()
        levels.append(maps)
        start += grid * grid
    return SOLOOutput(levels, _class_logits(cells, classes, logits))


_KINDS = {"solo": SOLOPostProcessor, "decoupled_solo": DecoupledSOLOPostProcessor,
          "solov2": SOLOv2PostProcessor}
_MAKERS = {"solo": make_solo_outputs, "decoupled_solo": make_decoupled_outputs,
           "solov2": make_solov2_outputs}


def _processor(family: str, backend: str | None):
    return _KINDS[family](test_cfg=TestConfig(), num_grids=GRIDS, strides=STRIDES,
                          backend=backend)


def _outputs(family: str):
    return _MAKERS[family]()


def _replay_nms(monkeypatch, name: str, module) -> None:
    """Replace ``module.name`` (a matrix-NMS call) by a replay of its first result."""
    real, recorded = getattr(module, name), []

    def replay(*args, **kwargs):
        if not recorded:
            recorded.append(real(*args, **kwargs))
        return recorded[0]

    monkeypatch.setattr(module, name, replay)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_postprocess(benchmark, family, provider, monkeypatch):
    benchmark.group = f"postprocess {family} 1 image 800x1088 (cpu)"
    outputs = _outputs(family)
    trace: list = []
    reference = _processor(family, "reference")
    with torch.no_grad():
        expected = reference(outputs, IMAGE_SIZES, ORIGINAL_SIZES, trace=trace)
    nms_input = trace[0]["nms_input"]
    benchmark.extra_info.update(
        provider=provider, candidates=len(trace[0]["candidates"]["label"]),
        into_nms=len(nms_input["labels"]), kept=len(expected[0]["labels"]))
    if provider == "matrix_nms":
        num = len(nms_input["labels"])
        call = lambda: fused.matrix_nms_by_image(  # noqa: E731
            nms_input["masks"], nms_input["labels"], nms_input["scores"],
            nms_input["mask_area"], torch.zeros(num, dtype=torch.int64), num_images=1,
            test_cfg=TestConfig())
    else:
        path = provider.removesuffix("-no-nms")
        processor = reference if path == "reference" else _processor(
            family, path.removeprefix("fused-"))
        call = lambda: processor(outputs, IMAGE_SIZES, ORIGINAL_SIZES)  # noqa: E731
        if provider.endswith("-no-nms"):
            _replay_nms(monkeypatch, "matrix_nms_reference", reference_path)
            _replay_nms(monkeypatch, "matrix_nms_by_image", fused)
            with torch.no_grad():
                call()  # records the NMS result outside the measurements
    benchmark_op(benchmark, device="cpu", mode="forward", loss=call, leaves=[])


def interleaved(rounds: int = 5) -> None:
    """Reference and fused paths timed alternately, call after call, so that the load of a
    shared machine falls on both alike; prints medians and their ratio per family."""
    import statistics
    import time

    for family in FAMILIES:
        outputs = _outputs(family)
        paths = {"reference": _processor(family, "reference"), "fused": _processor(family, None)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        with torch.no_grad():
            for _ in range(rounds + 1):  # the first round warms up
                for name, processor in paths.items():
                    start = time.perf_counter()
                    processor(outputs, IMAGE_SIZES, ORIGINAL_SIZES)
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values[1:]) for name, values in times.items()}
        print(f"{family}: reference {medians['reference'] * 1e3:.0f} ms, fused "
              f"{medians['fused'] * 1e3:.0f} ms, speed-up "
              f"{medians['reference'] / medians['fused']:.2f}x")


if __name__ == "__main__":  # PYTHONPATH=. python benchmarks/bench_postprocess.py
    interleaved()
