"""Checkpoints that are never half-written, and the random state that makes a resume exact."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["restore_rng_state", "rng_state", "save_atomically", "write_atomically",
           "write_json_atomically"]


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs, renames it over ``path``.

    A crash or a kill at any moment leaves either the previous file or the new one, never a
    truncated one (the rename is atomic on POSIX file systems).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_atomically(obj: Any, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` through :func:`write_atomically`."""
    write_atomically(path, lambda file: torch.save(obj, file))


def write_json_atomically(data: Any, path: str | os.PathLike) -> None:
    """JSON of ``data`` to ``path`` through :func:`write_atomically`."""
    write_atomically(path, lambda file: file.write(json.dumps(data).encode()))


def rng_state() -> dict[str, Any]:
    """Every random generator a training step can draw from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
