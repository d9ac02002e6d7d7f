""":class:`OnnxPredictor`: images in, instances out, through an exported ``end2end`` ONNX graph,
with numpy and onnxruntime only.

    predictor = OnnxPredictor("solov2.onnx", providers=["CPUExecutionProvider"])
    for result in predictor([image0, image1]):  # uint8 (H0, W0, 3) RGB arrays
        result["masks"], result["labels"], result["scores"], result["boxes"]

The graph takes ``images`` float32 (N, 3, Hp, Wp) and ``image_sizes`` int64 (N, 2) and returns,
per image, up to K instances: ``num_dets`` (N,), ``scores`` (N, K), ``labels`` (N, K) and
``masks`` (N, K, Hp / stride, Wp / stride) soft masks; rows past ``num_dets`` are padding. The
images are prepared as ``solo-fast predict`` prepares them (:mod:`.preprocess`) and the masks
pasted back as ``model.predict`` does (:mod:`.masks`).
"""

# N=images, K=instances of an image, H0/W0=original size, Hp/Wp=padded canvas, H4/W4=mask map

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from solo_fast.deploy.masks import paste_masks
from solo_fast.deploy.metadata import METADATA_KEY, ExportMetadata
from solo_fast.deploy.preprocess import preprocess, to_rgb

__all__ = ["OnnxPredictor", "load_image"]

INPUTS = ("images", "image_sizes")
OUTPUTS = ("num_dets", "scores", "labels", "masks")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as a uint8 ``(H0, W0, 3)`` RGB array, turned upright by its EXIF tag (as
    mmdetection's OpenCV decoding does; Pillow does not by itself): the one image decoder of the
    package (``solo_fast.data.load_image``, for training, evaluation and prediction, wraps it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file Pillow cannot decode (the message names it).
    """
    # Pillow only for files: arrays need nothing beyond numpy
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    try:
        with Image.open(path) as pil:
            return np.asarray(ImageOps.exif_transpose(pil).convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error


class OnnxPredictor:
    """Runs an ``end2end`` solo_fast ONNX export on images.

    Args:
        model: The ``.onnx`` file, or an onnxruntime ``InferenceSession`` (anything with its
            ``get_modelmeta``, ``get_inputs``, ``get_outputs`` and ``run``) already made.
        providers: onnxruntime execution providers (``InferenceSession(providers=...)``); None:
            onnxruntime's default. Only with a file.
        session_options: An ``onnxruntime.SessionOptions``. Only with a file.

    Attributes:
        metadata: The export's :class:`~.metadata.ExportMetadata`.
        session: The onnxruntime session.
        source: The file (or session) named in error messages.
        batch_limit: The batch size a static export fixes, else None.
        canvas: The ``(Hp, Wp)`` a static export fixes, else None (each batch is padded to its
            largest image).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a solo_fast ``end2end`` export (missing or malformed metadata, another
            graph, missing inputs or outputs); the message names the file. A file onnxruntime
            cannot load raises onnxruntime's own error, which names it too.
    """

    def __init__(self, model: str | os.PathLike | Any, *, providers: Sequence[Any] | None = None,
                 session_options: Any = None) -> None:
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"ONNX model {path} not found")
            # onnxruntime on first use: the pre- and post-processing need only numpy
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), sess_options=session_options,
                                                   providers=providers)
            self.source = str(path)
        else:
            if providers is not None or session_options is not None:
                raise ValueError("providers and session_options apply to a model file, "
                                 "not to a session already made")
            session = model
            self.source = f"the session {type(model).__name__}"
        self.session = session
        props = session.get_modelmeta().custom_metadata_map
        self.metadata = ExportMetadata.from_json(props.get(METADATA_KEY), source=self.source)
        if self.metadata.graph != "end2end":
            raise ValueError(f"{self.source} holds the {self.metadata.graph!r} graph; "
                             f"OnnxPredictor runs the 'end2end' one (images -> instances)")
        inputs = {node.name: node for node in session.get_inputs()}
        outputs = {node.name for node in session.get_outputs()}
        missing = [f"input {n}" for n in INPUTS if n not in inputs]
        missing += [f"output {n}" for n in OUTPUTS if n not in outputs]
        if missing:
            raise ValueError(f"{self.source} lacks {', '.join(missing)} of an end2end export")
        shape = list(inputs["images"].shape)
        # static exports fix the batch and/or the canvas: pad to them and split batches
        self.batch_limit = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        fixed = all(isinstance(d, int) and d > 0 for d in shape[2:4])
        self.canvas = (shape[2], shape[3]) if len(shape) == 4 and fixed else None

    def __repr__(self) -> str:
        meta = self.metadata
        return (f"OnnxPredictor({self.source!r}, preset={meta.preset!r}, "
                f"num_classes={meta.num_classes}, test_scale={meta.test_scale}, "
                f"shapes={meta.shapes!r})")

    def __call__(self, images: Iterable[np.ndarray | str | os.PathLike], *,
                 batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
        """Predicts instances on images.

        Args:
            images: uint8 RGB ``(H0, W0, 3)`` arrays of any sizes, or image files. Grey
                ``(H0, W0)`` / ``(H0, W0, 1)`` arrays are repeated into 3 channels and RGBA
                ``(H0, W0, 4)`` arrays lose their alpha channel (:func:`~.preprocess.to_rgb`).
            batch_size: Images per run of the graph; None: all at once (or the export's fixed
                batch size).

        Returns:
            Per image, in order: ``{"masks": bool (K, H0, W0), "labels": int64 (K,),
            "scores": float32 (K,), "boxes": float32 (K, 4) xyxy, x2/y2 exclusive}``.

        Raises:
            TypeError: an image that is neither an array nor a path.
            ValueError: an image of another dtype or shape (the message names its index), or
                ``batch_size < 1``.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        images = list(images)
        step = min(batch_size or len(images), self.batch_limit or len(images)) or 1
        results: list[dict[str, np.ndarray]] = []
        for start in range(0, len(images), step):  # files are read a batch at a time
            arrays = [load_image(im) if isinstance(im, (str, os.PathLike)) else im
                      for im in images[start:start + step]]
            results += self.predict_tensors(*self._preprocess(arrays, first=start))
        return results

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
        """Image arrays -> ``(images, image_sizes, original_sizes)`` for :meth:`predict_tensors`
        (:func:`~.preprocess.to_rgb`, then :func:`~.preprocess.preprocess` with the export's
        scale, normalisation and padding)."""
        return self._preprocess(images, first=0)

    def _preprocess(self, images: Sequence[np.ndarray], *, first: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # first: the index of images[0] among the caller's images, for the error messages
        meta = self.metadata
        images = [to_rgb(image, f"images[{first + i}]") for i, image in enumerate(images)]
        return preprocess(images, scale=meta.test_scale, mean=meta.mean, std=meta.std,
                          size_divisor=meta.size_divisor, canvas=self.canvas)

    def predict_tensors(self, images: np.ndarray, image_sizes: np.ndarray,
                        original_sizes: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Runs the graph on a prepared batch and pastes the masks back.

        Args:
            images: float32 ``(N, 3, Hp, Wp)`` normalised, zero-padded batch.
            image_sizes: int ``(N, 2)`` ``(h, w)`` of each resized image in the canvas.
            original_sizes: int ``(N, 2)`` ``(H0, W0)`` to paste the masks back to.

        Returns:
            As :meth:`__call__`.

        Raises:
            ValueError: arrays of the wrong dtype or shape, sizes outside the canvas, or a batch
                a static export does not take.
        """
        images, image_sizes, original_sizes = _check_batch(images, image_sizes, original_sizes)
        batch = len(images)
        if self.batch_limit is not None and batch > self.batch_limit:
            raise ValueError(f"{self.source} takes batches of {self.batch_limit} images, got "
                             f"{batch}")
        if self.canvas is not None and tuple(images.shape[2:]) != self.canvas:
            raise ValueError(f"{self.source} takes {self.canvas[0]}x{self.canvas[1]} images, "
                             f"got {images.shape[2]}x{images.shape[3]}")
        if self.batch_limit is not None and batch < self.batch_limit:
            # a fixed-batch export: repeat the last image, drop its results
            extra = self.batch_limit - batch
            images = np.concatenate([images, np.repeat(images[-1:], extra, 0)])
            image_sizes = np.concatenate([image_sizes, np.repeat(image_sizes[-1:], extra, 0)])
        values = self.session.run(list(OUTPUTS), {"images": images, "image_sizes": image_sizes})
        outputs = dict(zip(OUTPUTS, values))
        masks = np.asarray(outputs["masks"])
        if masks.ndim != 4 or masks.shape[0] < batch:
            raise ValueError(f"{self.source} returned masks of shape {masks.shape}, expected "
                             f"(N, K, Hp / {self.metadata.mask_stride}, "
                             f"Wp / {self.metadata.mask_stride})")
        stride = self.metadata.mask_stride
        canvas = (masks.shape[2] * stride, masks.shape[3] * stride)
        results = []
        for n in range(batch):
            count = min(max(int(outputs["num_dets"][n]), 0), masks.shape[1])
            binary, boxes = paste_masks(np.asarray(masks[n, :count], dtype=np.float32),
                                        canvas=canvas, image_size=tuple(image_sizes[n]),
                                        original_size=tuple(original_sizes[n]),
                                        mask_thr=self.metadata.mask_thr)
            results.append({"masks": binary,
                            "labels": np.asarray(outputs["labels"][n, :count], dtype=np.int64),
                            "scores": np.asarray(outputs["scores"][n, :count], dtype=np.float32),
                            "boxes": boxes})
        return results


def _check_batch(images: Any, image_sizes: Any,
                 original_sizes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(images, np.ndarray) or images.dtype != np.float32 or images.ndim != 4 \
            or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be a float32 (N, 3, Hp, Wp) array with N >= 1, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} "
                         f"{getattr(images, 'shape', '')}")
    sizes = []
    for name, value in (("image_sizes", image_sizes), ("original_sizes", original_sizes)):
        array = np.asarray(value)
        if array.shape != (len(images), 2) or not np.issubdtype(array.dtype, np.integer) \
                or (array < 1).any():
            raise ValueError(f"{name} must be {len(images)} positive (h, w) integer pairs, "
                             f"got {array.dtype} {array.shape}")
        sizes.append(array.astype(np.int64))
    if (sizes[0] > np.asarray(images.shape[2:])).any():
        raise ValueError(f"image_sizes {sizes[0].tolist()} must fit the canvas "
                         f"{tuple(images.shape[2:])}")
    return images, sizes[0], sizes[1]
