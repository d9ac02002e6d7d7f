"""Shared by the op tests and the benchmarks: input makers, the references, backend and
closeness checks, loss-and-gradient runs, memory measurement.

The input makers and the memory measurement live in ``solo_fast.bench`` (``solo-fast bench``
runs the benchmarks' cases from an installed package); they are re-exported here.
"""

from __future__ import annotations

import pytest
import torch

from solo_fast.bench.cases import Case, cases
from solo_fast.bench.inputs import make_dice_inputs
from solo_fast.bench.measure import (
    peak_memory_increase,
    peak_memory_mb,
    providers,
    resident_memory,
)
from solo_fast.ops import available_backends, choose_backend
from solo_fast.ops.reference import dice_loss_reference

__all__ = ["assert_close_scaled", "benchmark_case", "benchmark_cases", "benchmark_op",
           "benchmark_parameters", "dice_loss_reference", "loss_and_grads", "make_dice_inputs",
           "peak_memory_increase", "peak_memory_mb", "require_backend", "resident_memory",
           "skip_bfloat16_triton"]


def require_backend(op: str, backend: str, device: str = "cpu") -> None:
    """Fails unless ``backend`` really runs ``op`` on ``device``."""
    # A backend that fell back to the reference would compare the reference with itself.
    assert choose_backend(op, torch.device(device), backend) == backend, (
        f"backend {backend} is not available on {device}: {available_backends(device)}")


def skip_bfloat16_triton(backend: str, dtype: torch.dtype) -> None:
    """Skips a CPU test of Triton on bfloat16, which its interpreter does not have."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 Triton runs only on a GPU (the GPU test covers it): the "
                    "interpreter has no bfloat16")


def assert_close_scaled(actual, expected, rtol):
    """assert_close with the tolerance relative to the expected tensor's largest magnitude:
    gradients have entries that are ~0."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30)


def loss_and_grads(loss_fn, inputs, weights, *, num_grads: int, **kwargs):
    """(loss, *gradients) of ``sum(weights * loss_fn(*inputs, **kwargs))`` with respect to the
    first ``num_grads`` inputs (fresh leaves; zeros where the loss does not use them)."""
    leaves = [tensor.detach().clone().requires_grad_(True) for tensor in inputs[:num_grads]]
    loss = loss_fn(*leaves, *inputs[num_grads:], **kwargs)
    # No item: the op is still in the graph, and the gradients are zeros.
    total = (loss * weights).sum() if loss.numel() else loss.sum()
    grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
    return (loss.detach(), *grads)


def benchmark_cases() -> list[tuple[str, str]]:
    """(device, backend) pairs a benchmark times here: every backend of every device present,
    except Triton on CPU (its interpreter is a correctness tool, not a speed)."""
    return providers()


def benchmark_op(benchmark, *, device: str, mode: str, loss, leaves, rounds: int = 10) -> None:
    """Times one op in one mode with pytest-benchmark and records its peak memory.

    Args:
        benchmark: pytest-benchmark's fixture.
        device: ``"cpu"`` or ``"cuda"`` (CUDA is synchronised after each timed call).
        mode: ``"forward"`` (no autograd), ``"backward"`` (the forward runs untimed in the
            setup) or ``"full"`` (forward and backward).
        loss: A function returning the op's summed loss (a 0-d tensor) on its inputs.
        leaves: The inputs that get gradients; they are cleared before every backward.
        rounds: Timed calls (after one warm-up); fewer for references that take seconds.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def clear():
        for leaf in leaves:
            leaf.grad = None

    def full():
        clear()
        loss().backward()
        sync()

    if mode == "forward":
        def forward():
            with torch.no_grad():
                loss()
            sync()
        benchmark.extra_info["peak_mb"] = peak_memory_mb(forward, device)
        benchmark.pedantic(forward, rounds=rounds, warmup_rounds=1)
    elif mode == "backward":
        def setup():
            clear()
            return (loss(),), {}

        def backward(value):
            value.backward()
            sync()
        benchmark.extra_info["peak_mb"] = peak_memory_mb(full, device)
        benchmark.pedantic(backward, setup=setup, rounds=rounds, warmup_rounds=1)
    elif mode == "full":
        benchmark.extra_info["peak_mb"] = peak_memory_mb(full, device)
        benchmark.pedantic(full, rounds=rounds, warmup_rounds=1)
    else:
        raise ValueError(f"mode must be forward, backward or full, got {mode!r}")


def benchmark_parameters(op: str):
    """The parametrisation of ``benchmarks/bench_<op>.py``'s one test: every (device, backend)
    of :func:`benchmark_cases` times every (case, mode) of ``solo_fast.bench.cases.cases(op)``."""
    backends = pytest.mark.parametrize("device,provider", benchmark_cases(),
                                       ids=lambda value: str(value))
    sizes = pytest.mark.parametrize(
        "case,mode", [(case, mode) for case in cases(op) for mode in case.modes],
        ids=lambda value: getattr(value, "name", value))
    return lambda test: backends(sizes(test))


def benchmark_case(benchmark, case: Case, *, mode: str, device: str, provider: str) -> None:
    """Times one case of ``solo_fast.bench.cases`` on one backend in one mode with
    pytest-benchmark (:func:`benchmark_op`).

    Run a file with ``python -m pytest benchmarks/bench_<op>.py`` (add ``--benchmark-json
    out.json`` to keep the figures). One group per (op, size, mode, device); the ``provider``
    axis holds every backend that runs on this machine's devices. ``extra_info["peak_mb"]`` is
    the resident-memory peak of one call above what the inputs already hold (CPU, after trimming
    the C heap; GPU peaks come from the CUDA allocator).
    """
    benchmark.group = f"{case.op} {case.size} {mode} ({device})"
    benchmark.extra_info.update(provider=provider, device=device, mode=mode)
    if case.variant:
        benchmark.extra_info["variant"] = case.variant
    problem = case.make(device)
    benchmark_op(benchmark, device=device, mode=mode, leaves=list(problem.leaves.values()),
                 loss=lambda: problem.loss(provider), rounds=case.rounds)
