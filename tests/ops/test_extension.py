"""The compiled library itself: how its CPU kernels are parallelised."""

import importlib

import pytest
import torch


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_kernels_run_their_tasks_on_every_thread(threads):
    # at::parallel_for runs tasks on one thread when the library is compiled without OpenMP,
    # and nothing else would notice: results are the same, only twice as slow on two cores.
    library = importlib.import_module("solo_fast._C")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert library.cpu_parallel_threads() == threads
    finally:
        torch.set_num_threads(previous)
