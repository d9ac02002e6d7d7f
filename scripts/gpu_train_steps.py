"""One training step per model family on each loss backend, checked against the reference losses.

Run by ``scripts/gpu_check.sh`` on a GPU: ``PYTHONPATH=. python scripts/gpu_train_steps.py``.
Per family (the presets of ``benchmarks/bench_model.py``, its inputs: 2 images with 6 instances
each that reach every FPN level), one model is stepped with its criterion's fused losses on each
backend (``cuda``, ``triton``; ``cpu`` on CPU) and on ``reference`` (mmdetection's computation):
every loss and every parameter's gradient must agree with the reference path's. Prints a markdown
table (time of a step, peak memory, the largest differences) and exits 1 on a disagreement or an
error. ``--device cpu --size 96 --families solov2_light`` runs the same code without a GPU.
"""

# N=images, H, W=image size

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.bench_model import TRAIN_PRESETS, make_targets
from solo_fast import build_model
from solo_fast.bench.measure import peak_memory_mb, synchronize
from solo_fast.ops import available_backends

LOSS_RTOL = 1e-4  # the fused losses sum in another order than the reference's: float rounding
GRAD_RTOL = 1e-3  # relative to each gradient's largest magnitude, through the whole backbone


def _step(model, images, targets, device: str) -> tuple[dict[str, float], list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    losses = model.loss(model(images), targets)
    sum(losses.values()).backward()
    synchronize(device)
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for p in model.parameters()]
    return {name: value.item() for name, value in losses.items()}, grads


def _relative(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-12)


def check_family(family: str, *, device: str, size: int, repeats: int) -> tuple[list[str], bool]:
    """Steps one family on every backend; returns its table rows and whether all agreed."""
    torch.manual_seed(0)
    model = build_model(TRAIN_PRESETS[family]).train().to(device)
    images = torch.randn(2, 3, size, size).to(device)  # (N, 3, H, W)
    targets = [{key: value.to(device) for key, value in target.items()}
               for target in make_targets(2, size, size)]
    backends = [b for b in available_backends(device) if not (device == "cpu" and b == "triton")]
    rows, ok, expected = [], True, None
    for backend in backends:
        model.criterion.dice_backend = backend
        try:
            losses, grads = _step(model, images, targets, device)
            if expected is None:
                expected = (losses, grads)
            loss_error = max(_relative(losses[k], expected[0][k]) for k in expected[0])
            grad_error = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                             for g, r in zip(grads, expected[1], strict=True) if r.numel())
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                _step(model, images, targets, device)
                times.append(time.perf_counter() - start)
            peak = peak_memory_mb(lambda: _step(model, images, targets, device), device)
        except Exception as error:  # noqa: BLE001 -- reported; the next backend still runs
            rows.append(f"| {family} | {backend} | FAILED: {type(error).__name__}: {error} "
                        "| | | | |")
            ok = False
            continue
        agreed = loss_error <= LOSS_RTOL and grad_error <= GRAD_RTOL
        ok &= agreed
        shown = ", ".join(f"{k} {v:.6f}" for k, v in losses.items())
        rows.append(f"| {family} | {backend} | {sorted(times)[len(times) // 2] * 1e3:.1f} | "
                    f"{peak:.0f} | {loss_error:.1e} | {grad_error:.1e} | "
                    f"{'yes' if agreed else '**NO**'} ({shown}) |")
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", type=int, default=512, help="square image side (512)")
    parser.add_argument("--families", nargs="+", choices=list(TRAIN_PRESETS),
                        default=list(TRAIN_PRESETS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per backend (3)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        # TF32 and non-deterministic convolution algorithms would make the two paths' gradients
        # differ by more than the losses' rounding does
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    print(f"training step, 2 x {args.size} x {args.size}, {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}; "
          f"losses within {LOSS_RTOL:g} and gradients within {GRAD_RTOL:g} of the reference path\n")
    print("| family | loss backend | step ms (median) | peak MiB | max loss error | "
          "max grad error | agrees (losses) |")
    print("|---|---|---|---|---|---|---|")
    all_ok = True
    for family in args.families:
        rows, ok = check_family(family, device=args.device, size=args.size,
                                repeats=args.repeats)
        print("\n".join(rows), flush=True)
        all_ok &= ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
