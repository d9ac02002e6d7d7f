"""A tour of the fused ops: every backend available here against the reference, and its speed.

Run by ``solo-fast demo`` until the trainer lands. Sizes are the canonical COCO ones of
``benchmarks/RESULTS.md`` (K = 200 masks of 200x272 for the dice loss).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from solo_fast.ops import available_backends, cuda_compiled, dice_loss, has_ops

__all__ = ["BackendReport", "showcase_dice_loss", "main"]


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
        return loss.detach(), pred.grad

    reference_loss, reference_grad = run("reference")
    grad_scale = reference_grad.abs().max().clamp_min(1e-30)
    reports = []
    for backend in backends or available_backends(device):
        loss, grad = run(backend)
        reports.append(BackendReport(
            backend=backend, device=device,
            max_loss_error=((loss - reference_loss).abs() / reference_loss.abs()).max().item(),
            max_grad_error=((grad - reference_grad).abs().max() / grad_scale).item(),
            forward_backward_ms=_median_ms(lambda b=backend: run(b), repeats)))
    return reports


def main(*, repeats: int = 5) -> None:
    """Prints the build and a table of backends for the dice loss at the canonical size."""
    print(f"solo_fast build: compiled ops {'yes' if has_ops() else 'NO'}, "
          f"CUDA kernels {'compiled' if cuda_compiled() else 'not compiled'}, "
          f"CUDA device {'yes' if torch.cuda.is_available() else 'none'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\ndice_loss, forward + backward, K=200 masks of 200x272, fp32")
    print(f"{'backend':<10} {'device':<6} {'max rel. loss err':>18} {'max rel. grad err':>18} "
          f"{'median ms':>10} {'speed-up':>9}")
    for device in devices:
        # The Triton interpreter runs on CPU but is a correctness tool, far too slow to time here.
        backends = [backend for backend in available_backends(device)
                    if not (device == "cpu" and backend == "triton")]
        reports = showcase_dice_loss(device=device, repeats=repeats, backends=backends)
        baseline = next(r.forward_backward_ms for r in reports if r.backend == "reference")
        for r in reports:
            print(f"{r.backend:<10} {r.device:<6} {r.max_loss_error:>18.2e} "
                  f"{r.max_grad_error:>18.2e} {r.forward_backward_ms:>10.1f} "
                  f"{baseline / r.forward_backward_ms:>8.1f}x")
