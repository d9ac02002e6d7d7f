"""Shared by the op tests and the benchmarks: input makers, the references, backend and
closeness checks, loss-and-gradient runs, memory measurement."""

from __future__ import annotations

import ctypes
import re

import pytest
import torch

from solo_fast.ops import available_backends, choose_backend
from solo_fast.ops.reference import dice_loss_reference

__all__ = ["assert_close_scaled", "benchmark_cases", "benchmark_op", "dice_loss_reference",
           "loss_and_grads", "make_dice_inputs", "peak_memory_increase", "peak_memory_mb",
           "require_backend", "resident_memory", "skip_bfloat16_triton"]


def require_backend(op: str, backend: str, device: str = "cpu") -> None:
    """Fails unless ``backend`` really runs ``op`` on ``device``."""
    # A backend that fell back to the reference would compare the reference with itself.
    assert choose_backend(op, torch.device(device), backend) == backend, (
        f"backend {backend} is not available on {device}: {available_backends(device)}")


def skip_bfloat16_triton(backend: str, dtype: torch.dtype) -> None:
    """Skips a CPU test of Triton on bfloat16, which its interpreter does not have."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 Triton runs only on a GPU (the GPU test covers it): the "
                    "interpreter has no bfloat16, KERNELS.md section 3")


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


def make_dice_inputs(num_masks: int, pixels: tuple[int, ...], *, dtype=torch.float32,
                     target_dtype=torch.bool, logits: bool = True, seed: int = 0,
                     device: str = "cpu"):
    """Random (pred, target) for the dice loss: pred (N, *pixels), target of pred's shape.

    Logits are spread over [-6, 6] so both sigmoid tails are exercised; probabilities lie in
    [0, 1]. Target row 0 is all zero when N > 1 (the loss is then 1 whatever pred is).
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (num_masks, *pixels)
    if logits:
        pred = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    else:
        pred = torch.rand(shape, generator=generator, dtype=torch.float64)
    target = torch.rand(shape, generator=generator) > 0.6
    if num_masks > 1:
        target[0] = False
    pred = pred.to(dtype=dtype, device=device)
    target = target.to(dtype=target_dtype, device=device)
    return pred, target


def _memory_status() -> tuple[int, int]:
    with open("/proc/self/status") as status:
        text = status.read()
    peak = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024
    current = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024
    return peak, current


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def resident_memory() -> int:
    """Bytes the process holds in RAM now, after handing free C-heap pages back (Linux)."""
    _trim_heap()
    return _memory_status()[1]


def peak_memory_increase(fn) -> int:
    """Bytes by which the process's resident-set peak rises above its current size during fn().

    torch's CPU allocator keeps no statistics and tracemalloc does not see it, so this resets the
    kernel's high-water mark (/proc/self/clear_refs, Linux) and reads it back. It counts every
    allocation fn makes and keeps or frees, torch's and the kernels' own.

    glibc serves allocations below its mmap threshold (which grows to 32 MiB after large frees)
    from heap pages the process already holds, which would hide them from the resident-set peak:
    ``malloc_trim(0)`` hands those pages back first, and again afterwards, so that what fn frees
    cannot hide a later measurement's allocations either.
    """
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        _, before = _memory_status()
        fn()
        peak, _ = _memory_status()
    finally:
        _trim_heap()
    return max(0, peak - before)


def benchmark_cases() -> list[tuple[str, str]]:
    """(device, backend) pairs a benchmark times here: every backend of every device present,
    except Triton on CPU (its interpreter is a correctness tool, not a speed)."""
    cases = [("cpu", backend) for backend in available_backends("cpu") if backend != "triton"]
    if torch.cuda.is_available():
        cases += [("cuda", backend) for backend in available_backends("cuda")]
    return cases


def peak_memory_mb(fn, device: str) -> float:
    """Peak memory of fn() in MiB: the CUDA allocator's statistics on GPU, the resident-set
    peak (:func:`peak_memory_increase`) on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return peak_memory_increase(fn) / 2**20


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
