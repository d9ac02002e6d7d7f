"""solo_fast: the SOLO family of instance segmentation models (SOLO, Decoupled SOLO, SOLOv2) with
fused CPU, CUDA and Triton kernels.

    model = solo_fast.build_model("solov2_r50_fpn_1x_coco", num_classes=80)
    mmdet = torch.load("solov2_r50_fpn_1x_coco.pth")
    state_dict = solo_fast.convert_mmdet_state_dict(mmdet, "solov2_r50_fpn_1x_coco")
    model.load_state_dict(state_dict)
"""

from solo_fast import ops
from solo_fast.config import PRESETS, ModelConfig, get_preset
from solo_fast.convert import convert_mmdet_state_dict
from solo_fast.builder import build_model

__version__ = "0.1.0"

__all__ = ["PRESETS", "ModelConfig", "__version__", "build_model", "convert_mmdet_state_dict",
           "get_preset", "ops"]
