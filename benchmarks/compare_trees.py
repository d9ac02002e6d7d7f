"""The fused post-processing of whichever solo_fast tree is first on the path, timed on
bench_postprocess.py's inputs: one warm-up, then ``rounds`` calls per family; prints one JSON line
``{family: [median ms, min ms]}``.

Two trees cannot be imported in one process, so compare them in alternating processes (the load
of a shared machine then falls on both alike), e.g. with a checkout of the older commit in OLD:

    for i in 1 2 3; do
      (cd OLD && PYTHONPATH=. python /path/to/benchmarks/compare_trees.py 9)
      PYTHONPATH=. python benchmarks/compare_trees.py 9
    done
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from benchmarks import bench_postprocess


def main(rounds: int) -> dict[str, list[float]]:
    times_ms = {}
    with torch.no_grad():
        for family in bench_postprocess.FAMILIES:
            outputs = bench_postprocess._outputs(family)
            processor = bench_postprocess._processor(family, None)
            sizes = (bench_postprocess.IMAGE_SIZES, bench_postprocess.ORIGINAL_SIZES)
            processor(outputs, *sizes)  # warm-up
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                processor(outputs, *sizes)
                times.append(time.perf_counter() - start)
            times_ms[family] = [round(statistics.median(times) * 1e3, 1),
                                round(min(times) * 1e3, 1)]
    return times_ms


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)))
