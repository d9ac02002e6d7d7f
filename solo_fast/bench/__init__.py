"""``solo-fast bench``: every backend of every fused op against its reference, and its speed.

It runs the cases of :mod:`solo_fast.bench.cases`, the same that ``benchmarks/bench_<op>.py``
times with pytest-benchmark (the figures of record), with a small timer of its own: per backend,
the error of each output (and gradient) against the reference, the median time of the case's
fullest mode (forward + backward for a loss, forward otherwise) and its peak memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from solo_fast.bench.cases import CASES, OPS, Case, relative_error
from solo_fast.bench.measure import median_ms, peak_memory_mb, providers
from solo_fast.ops import cuda_compiled, has_ops

__all__ = ["BackendReport", "main", "run_case"]

# --size -> the tiers of cases it runs
SIZES: dict[str, tuple[str, ...]] = {"quick": ("quick",), "canonical": ("canonical",),
                                     "all": ("canonical", "extra")}


@dataclass(frozen=True, kw_only=True)
class BackendReport:
    """One backend on one case: its errors against the reference, its time and memory."""

    op: str
    case: str
    mode: str
    device: str
    backend: str
    errors: dict[str, float]  # output name -> relative_error against the reference's
    median_ms: float
    peak_mb: float
    failure: str = ""  # the exception the backend raised, if it did

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=math.inf if self.failure else 0.0)


def run_case(case: Case, *, device: str, backends: list[str], repeats: int = 5,
             memory: bool = True) -> list[BackendReport]:
    """Runs ``case`` on each backend on ``device`` against the reference.

    Args:
        case: What to run (:data:`solo_fast.bench.cases.CASES`).
        device: ``"cpu"`` or ``"cuda"``; the inputs are made there.
        backends: Backends to run, in order (``"reference"`` gives zero errors and the time
            the speed-ups are taken against).
        repeats: Timed calls per backend, after one warm-up; the median is reported.
        memory: Also measure each backend's peak memory (one more call).

    Returns:
        One report per backend; a backend that raises gets a report with ``failure`` set and
        the others still run.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    problem = case.make(device)
    expected = problem.results("reference")
    mode = case.modes[-1]
    reports = []
    for backend in backends:
        try:
            actual = problem.results(backend)
            errors = {name: relative_error(actual[name], value)
                      for name, value in expected.items()}
            step = problem.step(backend, mode)
            peak = peak_memory_mb(step, device) if memory else math.nan
            time_ms = median_ms(step, device=device, repeats=repeats)
        except Exception as error:  # noqa: BLE001 -- reported, and the next backend runs
            reports.append(BackendReport(op=case.op, case=case.name, mode=mode, device=device,
                                         backend=backend, errors={}, median_ms=math.nan,
                                         peak_mb=math.nan,
                                         failure=f"{type(error).__name__}: {error}"))
            continue
        reports.append(BackendReport(op=case.op, case=case.name, mode=mode, device=device,
                                     backend=backend, errors=errors, median_ms=time_ms,
                                     peak_mb=peak))
    return reports


def _print_reports(case: Case, reports: list[BackendReport]) -> None:
    mode = "forward + backward" if case.modes[-1] == "full" else case.modes[-1]
    print(f"\n{case.op} {case.name}, {mode}")
    print(f"{'device':<6} {'backend':<10} {'median ms':>10} {'speed-up':>9} {'peak MiB':>9}  "
          "error against the reference")
    baseline = {r.device: r.median_ms for r in reports if r.backend == "reference"}
    for r in reports:
        if r.failure:
            print(f"{r.device:<6} {r.backend:<10} FAILED: {r.failure}")
            continue
        errors = ", ".join(f"{name} {value:.1e}" for name, value in r.errors.items())
        speed_up = baseline.get(r.device, math.nan) / r.median_ms
        print(f"{r.device:<6} {r.backend:<10} {r.median_ms:>10.3f} {speed_up:>8.1f}x "
              f"{r.peak_mb:>9.1f}  {errors}")


def main(*, size: str = "quick", ops: list[str] | None = None,
         devices: list[str] | None = None, repeats: int = 5,
         max_error: float | None = None) -> int:
    """Prints the build and, per op and case, every backend against the reference.

    Args:
        size: ``"quick"`` (small odd sizes, seconds), ``"canonical"`` (COCO's sizes, the
            figures of record) or ``"all"`` (every size the benchmarks time).
        ops: Which ops (default all seven).
        devices: ``["cpu"]``, ``["cuda"]`` or both (default: every device present).
        repeats: Timed calls per backend.
        max_error: Fail (return 1) when an error exceeds it.

    Returns:
        0 when every backend ran (and stayed within ``max_error``), else 1.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    unknown = [op for op in ops or [] if op not in CASES]
    if unknown:
        raise ValueError(f"ops must be among {', '.join(OPS)}, got {unknown}")
    for device in devices or []:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"devices must be cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    print(f"solo_fast build: compiled ops {'yes' if has_ops() else 'NO'}, "
          f"CUDA kernels {'compiled' if cuda_compiled() else 'not compiled'}, "
          f"CUDA device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("error: max |backend - reference| / max |reference| per output (for masks: the "
          "fraction of pixels that differ); time and peak memory of one call")
    pairs = providers(devices)
    status = 0
    for op in ops or OPS:
        for case in CASES[op]:
            if case.tier not in SIZES[size]:
                continue
            reports = []
            for device in dict.fromkeys(device for device, _ in pairs):
                backends = [backend for d, backend in pairs if d == device]
                reports += run_case(case, device=device, backends=backends, repeats=repeats)
            _print_reports(case, reports)
            if any(r.failure for r in reports) or (
                    max_error is not None and any(r.max_error > max_error for r in reports)):
                status = 1
    if status and max_error is not None:
        print(f"\nFAILED: a backend raised or an error exceeded {max_error:g}")
    elif status:
        print("\nFAILED: a backend raised")
    return status
