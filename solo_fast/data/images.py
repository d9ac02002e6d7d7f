"""Image files as tensors: the one decoder of the data sets and of prediction.

mmdetection's ``LoadImageFromFile`` decodes with ``mmcv.imfrombytes`` (OpenCV, flag
``'color'``), which turns an image upright by its EXIF orientation tag; Pillow does not, so
:func:`load_image` applies the tag itself (``ImageOps.exif_transpose``). Training, evaluation and
prediction all call it, so they see the same pixels for the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    try:
        with Image.open(path) as pil:
            array = np.asarray(ImageOps.exif_transpose(pil).convert("RGB"),
                               dtype=np.uint8)  # (H, W, 3)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
    # np.asarray of a PIL image is read-only; torch needs a writable buffer
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)
