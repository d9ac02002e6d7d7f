"""A tour of the fused ops: every backend available here against the reference, and its speed.

Run by ``solo-fast bench``. Sizes are the canonical COCO ones of
``benchmarks/RESULTS.md`` (K = 200 masks or positives of 200x272).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from solo_fast.ops import (
    available_backends,
    cuda_compiled,
    decoupled_dice_loss,
    dice_loss,
    dynamic_mask_dice_loss,
    has_ops,
)

__all__ = ["BackendReport", "main", "showcase_decoupled_dice_loss", "showcase_dice_loss",
           "showcase_dynamic_mask_dice_loss"]


@dataclass(frozen=True)
class BackendReport:
    backend: str
    device: str
    max_loss_error: float  # largest |loss - reference| / |reference|
    max_grad_error: float  # largest |grad - reference| / max |reference grad|
    forward_backward_ms: float


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-call dispatch, Triton compilation, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _compare(run, *, device: str, backends: list[str], repeats: int) -> list[BackendReport]:
    """``run(backend) -> (loss, grads)`` on each backend against the reference, timed."""
    reference_loss, reference_grads = run("reference")
    reports = []
    for backend in backends:
        loss, grads = run(backend)
        grad_error = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                         for g, r in zip(grads, reference_grads))
        reports.append(BackendReport(
            backend=backend, device=device,
            max_loss_error=((loss - reference_loss).abs() / reference_loss.abs()).max().item(),
            max_grad_error=grad_error,
            forward_backward_ms=_median_ms(lambda b=backend: run(b), repeats)))
    return reports


def showcase_dice_loss(*, num_masks: int = 200, height: int = 200, width: int = 272,
                       repeats: int = 5, device: str = "cpu",
                       backends: list[str] | None = None) -> list[BackendReport]:
    """Runs the dice loss forward and backward on each backend; returns agreement and timing.

    Args:
        num_masks, height, width: the problem size, (K, H, W).
        repeats: timed runs per backend (the median is reported).
        device: where the tensors live.
        backends: which to run (default: every backend available on ``device``).
    """
    generator = torch.Generator().manual_seed(0)
    pred = (torch.randn(num_masks, height, width, generator=generator) * 3).to(device)
    target = (torch.rand(num_masks, height, width, generator=generator) > 0.7).to(device)
    weights = torch.rand(num_masks, generator=generator).to(device)
    pred.requires_grad_(True)

    def run(backend):
        pred.grad = None
        loss = dice_loss(pred, target, backend=backend)
        (loss * weights).sum().backward()
        return loss.detach(), [pred.grad]

    return _compare(run, device=device, repeats=repeats,
                    backends=backends or available_backends(device))


def showcase_decoupled_dice_loss(*, grids: int = 40, num_positives: int = 200, height: int = 200,
                                 width: int = 272, repeats: int = 5, device: str = "cpu",
                                 backends: list[str] | None = None) -> list[BackendReport]:
    """Runs the Decoupled SOLO product dice forward and backward on each backend.

    One image's level: X and Y logits (1, S, H, W), K positives in 3x3 blocks of cells (sharing
    rows and columns, as SOLO's centre regions do), (K, H, W) targets.
    """
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(1, grids, height, width, generator=generator) * 3).to(device)
    y = (torch.randn(1, grids, height, width, generator=generator) * 3).to(device)
    centres = torch.randint(1, grids - 1, (max(1, num_positives // 6), 2), generator=generator)
    chosen = centres[torch.randint(len(centres), (num_positives,), generator=generator)]
    offsets = torch.randint(-1, 2, (num_positives, 2), generator=generator)
    cells = (chosen + offsets).to(device)  # (K, 2): row, column
    pos_image = torch.zeros(num_positives, dtype=torch.int64, device=device)
    target = (torch.rand(num_positives, height, width, generator=generator) > 0.7).to(device)
    weights = torch.rand(num_positives, generator=generator).to(device)
    x.requires_grad_(True)
    y.requires_grad_(True)

    def run(backend):
        x.grad = y.grad = None
        loss = decoupled_dice_loss(x, y, pos_image, cells[:, 0], cells[:, 1], target,
                                   backend=backend)
        (loss * weights).sum().backward()
        return loss.detach(), [x.grad, y.grad]

    return _compare(run, device=device, repeats=repeats,
                    backends=backends or available_backends(device))


def showcase_dynamic_mask_dice_loss(*, num_positives: int = 200, channels: int = 256,
                                    height: int = 200, width: int = 272, repeats: int = 5,
                                    device: str = "cpu",
                                    backends: list[str] | None = None) -> list[BackendReport]:
    """Runs SOLOv2's dynamic mask convolution + dice forward and backward on each backend.

    One image's mask features (1, E, H, W) and K kernels (K, E) scaled so that the logits spread
    over both sigmoid tails; (K, H, W) targets.
    """
    generator = torch.Generator().manual_seed(0)
    mask_feats = torch.randn(1, channels, height, width, generator=generator).to(device)
    kernels = (torch.randn(num_positives, channels, generator=generator)
               * (3 / channels ** 0.5)).to(device)
    pos_image = torch.zeros(num_positives, dtype=torch.int64, device=device)
    target = (torch.rand(num_positives, height, width, generator=generator) > 0.7).to(device)
    weights = torch.rand(num_positives, generator=generator).to(device)
    kernels.requires_grad_(True)
    mask_feats.requires_grad_(True)

    def run(backend):
        kernels.grad = mask_feats.grad = None
        loss = dynamic_mask_dice_loss(kernels, mask_feats, pos_image, target, backend=backend)
        (loss * weights).sum().backward()
        return loss.detach(), [kernels.grad, mask_feats.grad]

    return _compare(run, device=device, repeats=repeats,
                    backends=backends or available_backends(device))


def main(*, repeats: int = 5) -> None:
    """Prints the build and a table of backends per fused op at the canonical sizes."""
    print(f"solo_fast build: compiled ops {'yes' if has_ops() else 'NO'}, "
          f"CUDA kernels {'compiled' if cuda_compiled() else 'not compiled'}, "
          f"CUDA device {'yes' if torch.cuda.is_available() else 'none'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    showcases = [
        ("dice_loss, forward + backward, K=200 masks of 200x272, fp32", showcase_dice_loss),
        ("decoupled_dice_loss, forward + backward, S=40, K=200 positives, 200x272, fp32",
         showcase_decoupled_dice_loss),
        ("dynamic_mask_dice_loss, forward + backward, K=200 positives, E=256, 200x272, fp32",
         showcase_dynamic_mask_dice_loss),
    ]
    for title, showcase in showcases:
        print(f"\n{title}")
        print(f"{'backend':<10} {'device':<6} {'max rel. loss err':>18} "
              f"{'max rel. grad err':>18} {'median ms':>10} {'speed-up':>9}")
        for device in devices:
            # The Triton interpreter runs on CPU but is a correctness tool, too slow to time here.
            backends = [backend for backend in available_backends(device)
                        if not (device == "cpu" and backend == "triton")]
            reports = showcase(device=device, repeats=repeats, backends=backends)
            baseline = next(r.forward_backward_ms for r in reports if r.backend == "reference")
            for r in reports:
                print(f"{r.backend:<10} {r.device:<6} {r.max_loss_error:>18.2e} "
                      f"{r.max_grad_error:>18.2e} {r.forward_backward_ms:>10.1f} "
                      f"{baseline / r.forward_backward_ms:>8.1f}x")
