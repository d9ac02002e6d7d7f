"""Drawing predictions: translucent masks, outlines, boxes and "name score" labels (Pillow)."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["class_color", "draw_instances", "save_overlay"]

# K=instances, H/W=image height/width


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed RGB colour per class: hues a golden-ratio step apart, so neighbours differ."""
    hue = (int(label) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _to_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()  # (H, W, 3)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or a uint8 (3, H, W) tensor/array, got "
                         f"{image.dtype} {image.shape}")
    return np.ascontiguousarray(image.transpose(1, 2, 0))  # (H, W, 3)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _outline(mask: np.ndarray) -> np.ndarray:
    # pixels of the mask with a 4-neighbour outside it (or on the image border)
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return mask & ~inner


def draw_instances(image: Any, prediction: Mapping[str, Any], category_names: Sequence[str], *,
                   score_thr: float = 0.3, alpha: float = 0.5) -> Image.Image:
    """Draws the instances scoring at least ``score_thr`` over a copy of ``image``.

    Lower scores are drawn first, so the most confident instance ends on top.

    Args:
        image: A PIL image or a uint8 ``(3, H, W)`` RGB tensor or array at the size of the masks.
        prediction: ``{"masks": bool (K, H, W), "labels": int (K,), "scores": float (K,)}`` and
            optionally ``"boxes"`` float (K, 4) xyxy (``model.predict`` output for one image).
        category_names: ``category_names[label]``; labels beyond it are drawn as their number.
        score_thr: Instances below this are not drawn.
        alpha: Opacity of the mask fill.

    Returns:
        A new RGB ``PIL.Image`` of size ``(W, H)``.

    Raises:
        ValueError: an image that is not uint8 (3, H, W), or masks of another size.
    """
    canvas = _to_array(image).astype(np.float32)  # (H, W, 3)
    height, width = canvas.shape[:2]
    masks = _numpy(prediction["masks"])
    if masks.ndim != 3 or masks.shape[-2:] != (height, width):
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not fit the {height}x{width} "
                         f"(h x w) image; expected (K, {height}, {width})")
    masks = masks.astype(bool)  # (K, H, W)
    labels = _numpy(prediction["labels"]).astype(np.int64).reshape(-1)
    scores = _numpy(prediction["scores"]).astype(np.float64).reshape(-1)
    boxes = _numpy(prediction["boxes"]).reshape(-1, 4) if "boxes" in prediction else None
    order = [k for k in np.argsort(scores, kind="stable") if scores[k] >= score_thr]

    for k in order:
        color = np.array(class_color(labels[k]), dtype=np.float32)
        canvas[masks[k]] = (1.0 - alpha) * canvas[masks[k]] + alpha * color
        canvas[_outline(masks[k])] = color
    result = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8), mode="RGB")

    draw = ImageDraw.Draw(result)
    font = ImageFont.load_default()
    for k in order:
        color = class_color(labels[k])
        if boxes is not None:
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
        else:  # tight box of the mask
            ys, xs = np.nonzero(masks[k])
            if ys.size == 0:
                continue
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        # xyxy boxes have exclusive x2/y2; Pillow's rectangle includes its far corner
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=color, width=2)
        label = int(labels[k])
        name = category_names[label] if 0 <= label < len(category_names) else str(label)
        text = f"{name} {scores[k]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        # above the box, or inside it when the box touches the top edge
        tx = min(max(0.0, x1), max(0.0, width - text_w - 2))
        ty = y1 - text_h - 3 if y1 - text_h - 3 >= 0 else y1
        draw.rectangle((tx, ty, tx + text_w + 2, ty + text_h + 2), fill=color)
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0), font=font)
    return result


def save_overlay(path: str | os.PathLike, image: Any, prediction: Mapping[str, Any],
                 category_names: Sequence[str], *, score_thr: float = 0.3,
                 alpha: float = 0.5) -> Path:
    """Draws the instances (:func:`draw_instances`) and saves the picture.

    Args:
        path: Output file; its extension picks the format (``.png``, ``.jpg``). Parent folders
            are created.
        image: As for :func:`draw_instances`.
        prediction: As for :func:`draw_instances`.
        category_names: As for :func:`draw_instances`.
        score_thr: As for :func:`draw_instances`.
        alpha: As for :func:`draw_instances`.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_instances(image, prediction, category_names, score_thr=score_thr,
                   alpha=alpha).save(path)
    return path
