"""Measuring one call: its time (median of repeats) and its peak memory, on CPU or CUDA."""

from __future__ import annotations

import ctypes
import re
import time

import torch

from solo_fast.ops import available_backends

__all__ = ["median_ms", "peak_memory_increase", "peak_memory_mb", "providers",
           "resident_memory", "synchronize"]


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


def synchronize(device: str) -> None:
    """Waits for the device's queued kernels (CUDA runs asynchronously; CPU needs nothing)."""
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, *, device: str, repeats: int) -> float:
    """Median wall time of fn() in milliseconds over ``repeats`` calls after one warm-up call
    (first-call dispatch, Triton compilation, page faults), the device synchronised each time."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def providers(devices: list[str] | None = None) -> list[tuple[str, str]]:
    """(device, backend) pairs a benchmark times: every backend of every device present (or of
    ``devices``), except Triton on CPU (its interpreter is a correctness tool, not a speed)."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(device, backend) for device in devices for backend in available_backends(device)
            if not (device == "cpu" and backend == "triton")]
