"""Process groups for ``torchrun``: NCCL on GPUs, gloo on CPUs."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_from_environment", "is_main_process", "shutdown"]


def init_from_environment(device: str | None = None) -> tuple[int, int, str]:
    """Joins the process group that ``torchrun`` describes in the environment, if any.

    Args:
        device: ``"cpu"`` or ``"cuda"``; None picks CUDA when a GPU is visible.

    Returns:
        (rank, world size, this process's device): (0, 1, device) outside torchrun.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def is_main_process() -> bool:
    """Rank 0, or no process group at all."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown(*, wait: bool = True) -> None:
    """Leaves the process group, if any; with ``wait``, once every process has arrived.

    Without it the process exits with the communication threads still running, and the C++
    runtime aborts the process ("terminate called without an active exception"). After an error
    pass ``wait=False``: the other processes may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
