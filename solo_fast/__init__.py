"""solo_fast: the SOLO family of instance segmentation models (SOLO, Decoupled SOLO, SOLOv2) with
fused CPU, CUDA and Triton kernels.

    model = solo_fast.build_model("solov2_r50_fpn_1x_coco", num_classes=80)
    mmdet = torch.load("solov2_r50_fpn_1x_coco.pth")
    state_dict = solo_fast.convert_mmdet_state_dict(mmdet, "solov2_r50_fpn_1x_coco")
    model.load_state_dict(state_dict)

The public names are imported on first use (PEP 562), so that ``import solo_fast.deploy`` (the
ONNX predictor, numpy and onnxruntime only) works where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from solo_fast import ops
    from solo_fast.builder import build_model
    from solo_fast.config import PRESETS, ModelConfig, get_preset
    from solo_fast.convert import convert_mmdet_state_dict
    from solo_fast.export import export_onnx

__version__ = "0.1.0"

__all__ = ["PRESETS", "ModelConfig", "__version__", "build_model", "convert_mmdet_state_dict",
           "export_onnx", "get_preset", "ops"]

# public name -> the module that defines it (None: the name is that submodule itself)
_LAZY = {
    "PRESETS": "solo_fast.config",
    "ModelConfig": "solo_fast.config",
    "get_preset": "solo_fast.config",
    "build_model": "solo_fast.builder",
    "convert_mmdet_state_dict": "solo_fast.convert",
    "export_onnx": "solo_fast.export",
    "ops": None,
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'solo_fast' has no attribute {name!r}")
    source = _LAZY[name]
    value = (importlib.import_module(f"solo_fast.{name}") if source is None
             else getattr(importlib.import_module(source), name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
