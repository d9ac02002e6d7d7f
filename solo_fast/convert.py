"""mmdetection checkpoints -> solo_fast state dicts.

mmdetection's SOLO-family detectors keep their weights under ``backbone.*``, ``neck.*`` and
``mask_head.*``; each family module of :mod:`solo_fast.models` has the key map of its head
(``mmdet_model_key_map``). The converter renames every key, then checks the result against the
model the preset builds (on the meta device: nothing is allocated), so that a wrong preset or a
truncated file fails here with the list of missing, unexpected and mis-shaped keys, not later in
``load_state_dict``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from solo_fast.config import ModelConfig, get_preset
from solo_fast.engine.checkpoint import save_atomically
from solo_fast.models import build_network, mmdet_key_map

__all__ = ["convert_mmdet_state_dict", "convert_mmdet_checkpoint", "extract_state_dict"]

# Bookkeeping entries of mmdetection models that hold no weights of the detector.
_IGNORED_PREFIXES = ("data_preprocessor.",)


def extract_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Tensor]:
    """The state dict inside an mmdetection checkpoint (``state_dict`` or ``model`` entry) or
    the checkpoint itself when it is a bare state dict."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    for entry in ("state_dict", "model"):
        if entry in checkpoint and isinstance(checkpoint[entry], Mapping):
            return checkpoint[entry]
    if checkpoint and all(isinstance(value, Tensor) for value in checkpoint.values()):
        return checkpoint
    raise ValueError(f"no state dict found: expected a 'state_dict' or 'model' entry or a dict "
                     f"of tensors, got keys {sorted(checkpoint)[:10]}")


def _config(preset: str | ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    if isinstance(preset, ModelConfig):
        return preset
    return get_preset(preset, **overrides)


def convert_mmdet_state_dict(mmdet_state_dict: Mapping[str, Any], preset: str | ModelConfig,
                             **overrides: Any) -> dict[str, Tensor]:
    """Rename an mmdetection SOLO-family state dict for ``solo_fast.build_model(preset)``.

    Args:
        mmdet_state_dict: mmdetection's ``model.state_dict()``, or a checkpoint dict holding it
            under ``state_dict`` (mmdetection's files) or ``model``.
        preset: A preset name (``"solov2_r50_fpn_1x_coco"``) or a :class:`ModelConfig`.
        **overrides: Config overrides for a preset name, e.g. ``num_classes=3``.

    Returns:
        A state dict that ``build_model(preset, **overrides).load_state_dict(..., strict=True)``
        accepts.

    Raises:
        ValueError: keys are missing, unexpected or of the wrong shape for the preset; the
            message lists them.
    """
    config = _config(preset, overrides)
    state_dict = extract_state_dict(mmdet_state_dict)
    key_map = mmdet_key_map(config.head.family)
    converted, unexpected = {}, []
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        try:
            converted[key_map(key)] = value
        except KeyError:
            unexpected.append(key)

    with torch.device("meta"):
        expected = build_network(config).state_dict()
    missing = [key for key in expected if key not in converted]
    unexpected += [key for key in converted if key not in expected]
    mis_shaped = [f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
                  for key, value in converted.items()
                  if key in expected and tuple(value.shape) != tuple(expected[key].shape)]
    if missing or unexpected or mis_shaped:
        raise ValueError(_mismatch_report(config.name, missing, unexpected, mis_shaped))
    return {key: converted[key] for key in expected}


def _mismatch_report(name: str, missing: list[str], unexpected: list[str],
                     mis_shaped: list[str]) -> str:
    lines = [f"the checkpoint does not fit preset {name!r}:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", mis_shaped)):
        if keys:
            shown = "\n    ".join(keys[:20])
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            lines.append(f"  {len(keys)} {title} key(s):\n    {shown}{more}")
    lines.append("  (a different preset, or overrides such as num_classes=..., may fit)")
    return "\n".join(lines)


def convert_mmdet_checkpoint(source: str | os.PathLike, destination: str | os.PathLike,
                             preset: str, *, trusted: bool = False,
                             **overrides: Any) -> dict[str, Any]:
    """Convert an mmdetection ``.pth`` file into a solo_fast checkpoint file.

    The output holds ``{"state_dict", "preset", "overrides"}``; it is written atomically.

    Args:
        source: The mmdetection checkpoint.
        destination: Where to write the solo_fast checkpoint.
        preset: The preset the weights belong to.
        trusted: Unpickle arbitrary objects in ``source`` (its ``meta`` entry may hold some).
            Only for files from a trusted origin: unpickling can run code.
        **overrides: Config overrides, e.g. ``num_classes=3``.

    Returns:
        What was written.
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint {str(source)!r} does not exist")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=not trusted)
    except Exception as error:  # pickle errors, truncated files, non-checkpoints
        hint = "" if trusted else (" (if the file is from a trusted origin and holds other "
                                   "Python objects, allow them with trusted=True / --trusted)")
        raise ValueError(f"{str(source)!r} is not a readable PyTorch checkpoint: "
                         f"{error}{hint}") from error
    state_dict = convert_mmdet_state_dict(checkpoint, preset, **overrides)
    output = {"state_dict": state_dict, "preset": preset, "overrides": dict(overrides)}
    save_atomically(output, destination)
    return output
