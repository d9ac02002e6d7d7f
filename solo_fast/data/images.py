"""Image files as tensors: the one decoder of the data sets and of prediction.

mmdetection's ``LoadImageFromFile`` decodes with ``mmcv.imfrombytes`` (OpenCV, flag
``'color'``), which turns an image upright by its EXIF orientation tag; Pillow does not, so
:func:`load_image` applies the tag itself (``ImageOps.exif_transpose``, in the torch-free
``solo_fast.deploy.load_image`` that it wraps). Training, evaluation, prediction and the ONNX
predictor all decode through it, so they see the same pixels for the same file.
"""

from __future__ import annotations

import os

import torch

from solo_fast.deploy import load_image as decode_image

__all__ = ["load_image"]

# H/W=image height/width after the EXIF rotation


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as an RGB tensor, turned upright by its EXIF orientation tag.

    Args:
        path: Any format Pillow decodes (JPEG, PNG, BMP, ...); grey, palette and RGBA images are
            converted to RGB.

    Returns:
        uint8 ``(3, H, W)``, contiguous.

    Raises:
        FileNotFoundError: ``path`` is not a file (the message names it).
        ValueError: Pillow cannot decode the file (the message names it and gives Pillow's
            reason).
    """
    # one decoder for the data sets, torch prediction and the torch-free ONNX predictor
    array = decode_image(path)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)
