"""Checkpoints that are never half-written, and the random state that makes a resume exact."""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["load_checkpoint", "restore_rng_state", "rng_state", "save_atomically",
           "write_atomically", "write_json_atomically"]


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
    """Every random generator a training step can draw from, as tensors and plain containers
    only, so that a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, words, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "position": int(position), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "python": {"version": int(version), "words": list(words), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["words"]),
                     python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """A checkpoint file loaded without unpickling anything but tensors and plain containers
    (``torch.load(weights_only=True)``): a file someone hands you cannot run code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty, truncated, not a torch file, or holds other objects (a
            pickle of arbitrary classes); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # no class or function refused: not a pickle
            raise ValueError(f"{what} {str(path)!r} is not a readable torch file (empty, "
                             f"truncated or of another format): {error}") from None
        raise ValueError(
            f"{what} {str(path)!r} holds objects other than tensors and plain containers, so "
            f"it is not loaded (loading it could run code from the file; solo_fast writes only "
            f"tensors and plain containers): {_unsupported_global(str(error))}") from None
    except (EOFError, RuntimeError, OSError) as error:
        raise ValueError(f"{what} {str(path)!r} is not a readable torch file (empty, truncated "
                         f"or of another format): {error}") from None


def _unsupported_global(message: str) -> str:
    """The line of torch's weights-only error that names the refused class or function."""
    lines = [line.strip() for line in message.splitlines() if "GLOBAL" in line]
    return (lines[0] if lines else "an unsupported object")[:200]
