"""Every fused op's benchmark cases, defined once.

A :class:`Case` is one op at one size: how to build its inputs on a device, which outputs are
compared with the reference's, and the modes it is timed in. ``benchmarks/bench_<op>.py``
(pytest-benchmark, the figures of record in ``benchmarks/RESULTS.md``) is parametrised over the
cases of tier ``canonical`` and ``extra``; ``solo-fast bench`` runs the same cases with a small
timer, the ``quick`` tier by default. The reference is the backend ``"reference"`` of each op (its
PyTorch implementation in ``solo_fast.ops.reference``).

Canonical sizes are those of COCO's 800 x 1088 input (200 x 272 mask maps), see
``docs/algorithms.md``; ``quick`` sizes are small and odd, for a check in seconds.
"""

# N=images, S=grid side, E=mask-feature channels, C=channels per branch, K=positives or
# candidates, H, W=mask-map size, n=NMS candidates

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from solo_fast.bench.inputs import (
    make_decoupled_inputs,
    make_decoupled_score_inputs,
    make_dice_inputs,
    make_dynamic_dice_inputs,
    make_dynamic_score_inputs,
    make_nms_candidates,
    make_solo_level_inputs,
)
from solo_fast.ops import (
    decoupled_dice_loss,
    decoupled_mask_scores,
    dice_loss,
    dynamic_mask_dice_loss,
    dynamic_mask_scores,
    matrix_nms,
    solo_mask_scores,
)
from solo_fast.ops.reference import unpack_masks_reference

__all__ = ["CASES", "LOSS_MODES", "OPS", "TIERS", "Case", "Problem", "cases", "relative_error"]

LOSS_MODES = ("forward", "backward", "full")
TIERS = ("quick", "canonical", "extra")


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One case's inputs on one device, ready to run on any backend.

    Attributes:
        call: backend name -> the op's outputs on the inputs (a loss op: its (K,) losses).
        pick: the op's outputs -> the named tensors compared with the reference's. Scoring ops
            are indexed positionally (``[0]`` area, ``[1]`` soft sum), whatever tuple type
            they return.
        leaves: the inputs that get gradients (loss ops), by name; they require grad.
    """

    call: Callable[[str], Any]
    pick: Callable[[Any], dict[str, Tensor]]
    leaves: dict[str, Tensor] = field(default_factory=dict)

    def loss(self, backend: str) -> Any:
        """What a benchmark times: the op's outputs, summed to a 0-d loss for a loss op."""
        out = self.call(backend)
        return out.sum() if self.leaves else out

    def step(self, backend: str, mode: str) -> Callable[[], None]:
        """A call of the op in ``mode``: ``"forward"`` (no autograd) or ``"full"`` (forward
        and backward of the summed loss, gradients cleared first)."""
        if mode == "forward":
            def forward() -> None:
                with torch.no_grad():
                    self.loss(backend)
            return forward
        if mode == "full" and self.leaves:
            def full() -> None:
                for leaf in self.leaves.values():
                    leaf.grad = None
                self.loss(backend).backward()
            return full
        raise ValueError(f"mode must be 'forward' or (a loss op) 'full', got {mode!r}")

    def results(self, backend: str) -> dict[str, Tensor]:
        """The picked outputs and, for a loss op, every leaf's gradient of the summed loss."""
        for leaf in self.leaves.values():
            leaf.grad = None
        if not self.leaves:
            with torch.no_grad():
                return dict(self.pick(self.call(backend)))
        out = self.call(backend)
        out.sum().backward()
        results = {name: value.detach() for name, value in self.pick(out).items()}
        results.update({f"grad {name}": leaf.grad for name, leaf in self.leaves.items()})
        return results


@dataclass(frozen=True, kw_only=True)
class Case:
    """One op at one size.

    Attributes:
        op: the op's name in ``solo_fast.ops``.
        size: the case's name, its sizes spelt out (``K200_200x272``).
        tier: ``"quick"`` (seconds, the default of ``solo-fast bench``), ``"canonical"`` (the
            size of record) or ``"extra"`` (other sizes the benchmarks time).
        make: device -> the :class:`Problem` on that device.
        modes: what the benchmarks time: ``LOSS_MODES`` for a loss, ``("forward",)`` otherwise.
        variant: a second axis besides the size (``"scores+packed"``), or empty.
        rounds: pytest-benchmark's timed calls (fewer where the reference takes seconds).
    """

    op: str
    size: str
    tier: str
    make: Callable[[str], Problem]
    modes: tuple[str, ...] = ("forward",)
    variant: str = ""
    rounds: int = 10

    @property
    def name(self) -> str:
        return f"{self.size}-{self.variant}" if self.variant else self.size


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """How far ``actual`` is from ``expected``: the fraction of differing elements for bool
    tensors, else max |actual - expected| / max |expected| (the absolute difference when
    ``expected`` is all zero); ``inf`` when the shapes differ."""
    if actual.shape != expected.shape:
        return math.inf
    if expected.numel() == 0:
        return 0.0
    if expected.dtype == torch.bool:
        return (actual.cpu() != expected.cpu()).double().mean().item()
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def _losses(out: Tensor) -> dict[str, Tensor]:
    return {"loss": out}


def _scores(out) -> dict[str, Tensor]:
    return {"area": out[0], "soft_sum": out[1]}


def _dice(num_masks: int, pixels: tuple[int, int]) -> Callable[[str], Problem]:
    def make(device: str) -> Problem:
        pred, target = make_dice_inputs(num_masks, pixels, device=device)
        pred.requires_grad_(True)
        return Problem(call=lambda backend: dice_loss(pred, target, backend=backend),
                       pick=_losses, leaves={"pred": pred})
    return make


def _decoupled_dice(num_images: int, grids: int, pixels: tuple[int, int], num_positives: int,
                    blocks: int) -> Callable[[str], Problem]:
    def make(device: str) -> Problem:
        # positives in 3 x 3 blocks of cells around `blocks` centres: they share rows and
        # columns as SOLO's centre regions do
        x, y, *rest = make_decoupled_inputs(num_images, grids, pixels, num_positives,
                                            device=device, num_blocks=blocks)
        x.requires_grad_(True)
        y.requires_grad_(True)
        return Problem(call=lambda backend: decoupled_dice_loss(x, y, *rest, backend=backend),
                       pick=_losses, leaves={"x": x, "y": y})
    return make


def _dynamic_dice(num_images: int, channels: int, pixels: tuple[int, int],
                  num_positives: int) -> Callable[[str], Problem]:
    def make(device: str) -> Problem:
        kernels, feats, pos_image, target = make_dynamic_dice_inputs(
            num_images, channels, pixels, num_positives, device=device, empty_image=False)
        kernels.requires_grad_(True)
        feats.requires_grad_(True)
        return Problem(call=lambda backend: dynamic_mask_dice_loss(kernels, feats, pos_image,
                                                                   target, backend=backend),
                       pick=_losses, leaves={"kernels": kernels, "mask_feats": feats})
    return make


def _decoupled_scores(num_images: int, channels: int, pixels: tuple[int, int],
                      num: int) -> Callable[[str], Problem]:
    def make(device: str) -> Problem:
        inputs = make_decoupled_score_inputs(num_images, channels, pixels, num, device=device)
        return Problem(call=lambda backend: decoupled_mask_scores(*inputs, threshold=0.5,
                                                                  backend=backend),
                       pick=_scores)
    return make


def _dynamic_scores(num_images: int, channels: int, pixels: tuple[int, int], num: int, *,
                    pack_masks: bool, exact: bool = False) -> Callable[[str], Problem]:
    def pick(out) -> dict[str, Tensor]:
        picked = _scores(out)
        if pack_masks:  # compared as masks: the fraction of pixels set differently
            picked["masks"] = unpack_masks_reference(out[2], *pixels)
        return picked

    def make(device: str) -> Problem:
        inputs = make_dynamic_score_inputs(num_images, channels, pixels, num, device=device,
                                           exact=exact)
        return Problem(call=lambda backend: dynamic_mask_scores(
            *inputs, threshold=0.5, backend=backend, pack_masks=pack_masks), pick=pick)
    return make


# SOLO's five levels at 800 x 1088: mmdetection's grids, each level's mask map
SOLO_GRIDS = (40, 36, 24, 16, 12)
SOLO_LEVEL_SIZES = ((200, 272), (200, 272), (100, 136), (50, 68), (50, 68))


def _solo_scores(num: int, grids: tuple[int, ...], level_sizes: tuple[tuple[int, int], ...]
                 ) -> Callable[[str], Problem]:
    def pick(out) -> dict[str, Tensor]:
        return {"area": torch.cat([level[0] for level in out]),
                "soft_sum": torch.cat([level[1] for level in out])}

    def make(device: str) -> Problem:
        # one op call per level, each resized to the level-0 map, as the post-processing calls it
        levels = make_solo_level_inputs(num, grids, level_sizes, device=device)
        return Problem(call=lambda backend: [
            solo_mask_scores(preds, image, channel, size=level_sizes[0], threshold=0.5,
                             backend=backend) for preds, image, channel in levels], pick=pick)
    return make


def _matrix_nms(num: int, pixels: tuple[int, int]) -> Callable[[str], Problem]:
    def pick(out) -> dict[str, Tensor]:
        return {"scores": out[0], "labels": out[1], "keep_inds": out[3]}

    def make(device: str) -> Problem:
        masks, labels, scores = (t.to(device) for t in make_nms_candidates(num, pixels))
        # SOLOv2's test configuration, with the filter off so that every candidate is kept and
        # the outputs are as large as they can be
        return Problem(call=lambda backend: matrix_nms(
            masks, labels, scores, nms_pre=num, max_num=100, kernel="gaussian", sigma=2.0,
            backend=backend), pick=pick)
    return make


MAP = (200, 272)  # 800 x 1088 / 4
QUICK = (17, 23)  # odd: no vector width divides a row

CASES: dict[str, tuple[Case, ...]] = {
    "dice_loss": (
        Case(op="dice_loss", size="K6_17x23", tier="quick", modes=LOSS_MODES,
             make=_dice(6, QUICK)),
        Case(op="dice_loss", size="K200_200x272", tier="canonical", modes=LOSS_MODES,
             make=_dice(200, MAP)),
        Case(op="dice_loss", size="K50_100x136", tier="extra", modes=LOSS_MODES,
             make=_dice(50, (100, 136))),
    ),
    "decoupled_dice_loss": (
        Case(op="decoupled_dice_loss", size="N1_S5_K12_17x23", tier="quick", modes=LOSS_MODES,
             make=_decoupled_dice(1, 5, QUICK, 12, 2)),
        # Decoupled SOLO's level 0: 200 positives in blocks around 25 centres
        Case(op="decoupled_dice_loss", size="N1_S40_K200_200x272", tier="canonical",
             modes=LOSS_MODES, make=_decoupled_dice(1, 40, MAP, 200, 25)),
        Case(op="decoupled_dice_loss", size="N1_S36_K50_100x136", tier="extra",
             modes=LOSS_MODES, make=_decoupled_dice(1, 36, (100, 136), 50, 7)),
    ),
    "dynamic_mask_dice_loss": (
        Case(op="dynamic_mask_dice_loss", size="N2_K9_E7_17x23", tier="quick", modes=LOSS_MODES,
             make=_dynamic_dice(2, 7, QUICK, 9)),
        Case(op="dynamic_mask_dice_loss", size="N1_K200_E256_200x272", tier="canonical",
             modes=LOSS_MODES, make=_dynamic_dice(1, 256, MAP, 200)),
        Case(op="dynamic_mask_dice_loss", size="N2_K50_E128_100x136", tier="extra",
             modes=LOSS_MODES, make=_dynamic_dice(2, 128, (100, 136), 50)),
    ),
    "decoupled_mask_scores": (
        Case(op="decoupled_mask_scores", size="N1_C5_K12_17x23", tier="quick",
             make=_decoupled_scores(1, 5, QUICK, 12)),
        # 128 channels per branch: the five levels' grids, 40 + 36 + 24 + 16 + 12
        Case(op="decoupled_mask_scores", size="N1_C128_K1000_200x272", tier="canonical",
             make=_decoupled_scores(1, 128, MAP, 1000)),
        Case(op="decoupled_mask_scores", size="N1_C128_K200_200x272", tier="extra",
             make=_decoupled_scores(1, 128, MAP, 200)),
    ),
    "dynamic_mask_scores": (
        # exact inputs (multiples of 1/64): no pixel lies within an ulp of the threshold
        Case(op="dynamic_mask_scores", size="N1_E7_K12_17x23", tier="quick",
             variant="scores+packed",
             make=_dynamic_scores(1, 7, QUICK, 12, pack_masks=True, exact=True)),
        Case(op="dynamic_mask_scores", size="N1_E256_K1000_200x272", tier="canonical",
             variant="scores", make=_dynamic_scores(1, 256, MAP, 1000, pack_masks=False)),
        # what SOLOv2's fused post-processing calls: the binary masks packed for matrix NMS
        Case(op="dynamic_mask_scores", size="N1_E256_K1000_200x272", tier="canonical",
             variant="scores+packed", make=_dynamic_scores(1, 256, MAP, 1000, pack_masks=True)),
        Case(op="dynamic_mask_scores", size="N1_E256_K200_200x272", tier="extra",
             variant="scores", make=_dynamic_scores(1, 256, MAP, 200, pack_masks=False)),
        Case(op="dynamic_mask_scores", size="N1_E256_K200_200x272", tier="extra",
             variant="scores+packed", make=_dynamic_scores(1, 256, MAP, 200, pack_masks=True)),
    ),
    "solo_mask_scores": (
        Case(op="solo_mask_scores", size="N1_K10_17x23", tier="quick",
             make=_solo_scores(10, (5, 3), (QUICK, (9, 12)))),
        Case(op="solo_mask_scores", size="N1_K1000_200x272", tier="canonical",
             make=_solo_scores(1000, SOLO_GRIDS, SOLO_LEVEL_SIZES)),
        Case(op="solo_mask_scores", size="N1_K200_200x272", tier="extra",
             make=_solo_scores(200, SOLO_GRIDS, SOLO_LEVEL_SIZES)),
    ),
    "matrix_nms": (
        Case(op="matrix_nms", size="n24_24x32", tier="quick", make=_matrix_nms(24, (24, 32))),
        # the configs' nms_pre is 500
        Case(op="matrix_nms", size="n500_200x272", tier="canonical", make=_matrix_nms(500, MAP)),
        Case(op="matrix_nms", size="n100_200x272", tier="extra", make=_matrix_nms(100, MAP)),
        # the reference takes seconds at n = 2,000
        Case(op="matrix_nms", size="n2000_200x272", tier="extra", rounds=3,
             make=_matrix_nms(2000, MAP)),
    ),
}
OPS = tuple(CASES)


def cases(op: str, tiers: tuple[str, ...] = ("canonical", "extra")) -> list[Case]:
    """The cases of ``op`` in the given tiers (by default what pytest-benchmark times)."""
    if op not in CASES:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    unknown = [tier for tier in tiers if tier not in TIERS]
    if unknown:
        raise ValueError(f"tiers must be among {', '.join(TIERS)}, got {unknown}")
    return [case for case in CASES[op] if case.tier in tiers]
