"""Deployment without torch: run a solo_fast ONNX export with numpy and onnxruntime.

    from solo_fast.deploy import OnnxPredictor
    predictor = OnnxPredictor("model.onnx", providers=["CPUExecutionProvider"])
    results = predictor([image0, image1])  # uint8 (H, W, 3) RGB arrays of any sizes

Nothing here imports torch or another part of solo_fast that does; Pillow is imported only to
decode image files and onnxruntime only when a model file is opened.
"""

from solo_fast.deploy.masks import masks_to_boxes, paste_masks, resize_bilinear
from solo_fast.deploy.metadata import METADATA_KEY, ExportMetadata
from solo_fast.deploy.predictor import OnnxPredictor, load_image
from solo_fast.deploy.preprocess import preprocess, rescale_size, resize_image, to_rgb

__all__ = [
    "METADATA_KEY",
    "ExportMetadata",
    "OnnxPredictor",
    "load_image",
    "masks_to_boxes",
    "paste_masks",
    "preprocess",
    "rescale_size",
    "resize_bilinear",
    "resize_image",
    "to_rgb",
]
