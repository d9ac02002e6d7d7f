"""ONNX export of a model's graphs (:mod:`.graphs`) with ``torch.onnx.export(dynamo=True)``, its
metadata, and a check of the written file on ONNX Runtime against the torch graph.

onnx, onnxscript and onnxruntime are the optional ``export`` extra: they are imported inside the
functions that need them, so ``import solo_fast.export`` works without them.
"""

# N=images, H, W=the padded canvas (multiples of 32)

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from solo_fast.config import ModelConfig
from solo_fast.data.loaders import SIZE_DIVISOR
from solo_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from solo_fast.deploy.metadata import GRAPHS, METADATA_KEY, SHAPES
from solo_fast.export.common import mask_stride
from solo_fast.export.graphs import build_graph, io_names

__all__ = ["OPSETS", "SHAPES", "check_onnx", "example_inputs", "export_onnx", "sort_stable_to_topk"]

OPSETS = (20,)  # GroupNorm decomposes to InstanceNormalization here; opset 21's op is not in ORT
# TensorRT's TopK takes k <= 3840: the largest candidate cap of a static graph
MAX_STATIC_CAP = 3840
_MIN_SIDE32, _MAX_SIDE32 = 2, 128  # canvas sides 64 .. 4096 pixels, in units of 32


def export_onnx(model: nn.Module, path: str | Path, *, cfg: ModelConfig, graph: str = "end2end",
                shapes: str = "dynamic", opset: int = 20,
                example_size: tuple[int, int] = (256, 320), batch: int = 2,
                class_names: Sequence[str] | None = None, max_candidates: int | None = None,
                check: bool = True) -> Path:
    """Export one graph of a model to an ONNX file with dynamic batch, height and width.

    The file's ``metadata_props`` hold ``"solo_fast"``: a JSON object with ``version``,
    ``preset``, ``family``, ``num_classes``, ``class_names``, ``graph``, ``shapes``, ``mean``,
    ``std``, ``size_divisor``, ``test_scale``, ``score_thr``, ``mask_thr``, ``max_per_img``,
    ``mask_stride``, ``mask_output`` and ``max_candidates`` (the static graph's cap, else null):
    what a host needs to prepare images and read the outputs.

    Args:
        model: The detector (``solo_fast.build_model``), with its weights; put in eval mode.
        path: The ``.onnx`` file to write.
        cfg: The model's config.
        graph: ``"end2end"`` (images, image_sizes -> detections), ``"raw"`` (images -> head
            outputs) or ``"postprocess"`` (head outputs, image_sizes -> detections).
        shapes: ``"dynamic"`` (for ONNX Runtime): every candidate kept, a size taken from the
            data. ``"static"`` (for TensorRT and other runtimes that want sizes known from the
            input shapes): at most ``max_candidates`` candidates per image, the best by class
            score, exact while no image has more (``num_candidates`` tells); no NonZero, Loop,
            If, double tensors or top-k sizes taken from the data. Batch, height and width are
            dynamic in both.
        opset: The ONNX opset; only 20.
        example_size: (H, W) of the example canvas traced; multiples of 32, H != W so that
            neither side is specialised.
        batch: Images of the example batch; >= 2 so that the batch is not specialised.
        class_names: Names of the classes for the metadata (num_classes of them), or None.
        max_candidates: The candidate cap of a static graph (default: test.nms_pre), at most
            3840 (TensorRT's top-k limit); dynamic graphs take none.
        check: Run the file on ONNX Runtime on a random batch and compare with the torch graph.

    Returns:
        ``path``.

    Raises:
        ValueError: an unknown graph or shapes, an unsupported opset, a bad example size or
            batch, class names that do not match num_classes, or a candidate cap out of range
            (or given for a dynamic graph).
        RuntimeError: the exported file disagrees with the torch graph.
    """
    # the optional export extra (onnx, onnxscript, onnxruntime): imported only here
    import onnx

    _check_arguments(cfg, graph, shapes, opset, example_size, batch, class_names)
    cap = _candidate_cap(cfg, shapes, max_candidates)
    module = build_graph(cfg, model, graph=graph, cap=cap)
    inputs = example_inputs(cfg, model, graph, example_size, batch, seed=0)
    input_names, output_names = io_names(cfg, graph)
    with torch.no_grad():
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=_dynamic_shapes(cfg, graph, inputs),
            custom_translation_table={torch.ops.aten.sort.stable: sort_stable_to_topk},
            verbose=False)
    path = Path(path)
    program.save(str(path))
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(
        _metadata(cfg, graph, shapes, class_names) | {"max_candidates": cap})
    onnx.save(proto, str(path))
    if check:
        size = (example_size[0] + SIZE_DIVISOR, example_size[1] - SIZE_DIVISOR) \
            if example_size[1] > 2 * SIZE_DIVISOR else tuple(example_size)
        check_onnx(path, module, example_inputs(cfg, model, graph, size, batch + 1, seed=1))
    return path


def sort_stable_to_topk(self: Any, *, stable: bool | None = None, dim: int = -1,
                        descending: bool = False) -> Any:
    """ONNX for ``aten.sort.stable``: a ``TopK`` over the whole axis, which the ONNX spec orders
    by index among equal values, i.e. a stable sort (the exporter has no translation of it)."""
    from onnxscript import opset20 as op  # the optional export extra

    del stable  # TopK is stable by definition
    size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


def example_inputs(cfg: ModelConfig, model: nn.Module | None, graph: str, size: Sequence[int],
                   batch: int, *, seed: int) -> tuple[Any, ...]:
    """Random inputs of a graph: normal images of ``size`` (H, W) and image sizes inside the
    canvas (each image smaller than the one before); for ``"postprocess"``, the model's raw
    outputs of such images instead of the images.

    Args:
        cfg: The model's config.
        model: The detector; needed for ``"postprocess"`` only.
        graph: A graph name.
        size: (H, W) of the canvas.
        batch: N.
        seed: Seed of the random images.

    Returns:
        The graph's positional arguments.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = (int(v) for v in size)
    images = torch.randn(batch, 3, height, width, generator=generator)
    shrink = torch.arange(batch)[:, None] * torch.tensor([[SIZE_DIVISOR // 2, SIZE_DIVISOR]])
    image_sizes = (torch.tensor([[height, width]]) - shrink).clamp(min=SIZE_DIVISOR)
    if graph == "raw":
        return (images,)
    if graph == "end2end":
        return images, image_sizes
    with torch.no_grad():
        outputs = build_graph(cfg, model, graph="raw")(images)
    return outputs, image_sizes


def check_onnx(path: str | Path, module: nn.Module, inputs: tuple[Any, ...], *,
               rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Run an exported graph on ONNX Runtime (CPU) and compare with the torch graph module.

    Counts and labels must be equal; floating outputs close (``rtol``, ``atol``).

    Raises:
        RuntimeError: an output differs, naming it and by how much.
    """
    import onnxruntime  # the optional export extra

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flat = _flatten(inputs)
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), flat)}
    results = session.run(None, feeds)
    with torch.no_grad():
        expected = _flatten(module(*inputs))
    names = [out.name for out in session.get_outputs()]
    for name, got, want in zip(names, results, expected, strict=True):
        got = torch.from_numpy(got)
        if got.shape != want.shape:
            raise RuntimeError(f"{path}: output {name} has shape {tuple(got.shape)} on ONNX "
                               f"Runtime, {tuple(want.shape)} in torch")
        if want.is_floating_point():
            close = torch.isclose(got, want, rtol=rtol, atol=atol)
            if not bool(close.all()):
                worst = float((got - want).abs().max())
                raise RuntimeError(f"{path}: output {name} differs from torch by up to {worst:.3g}"
                                   f" ({int((~close).sum())} values beyond rtol={rtol}, "
                                   f"atol={atol})")
        elif not torch.equal(got, want):
            raise RuntimeError(f"{path}: output {name} differs from torch "
                               f"({int((got != want).sum())} values)")


def _flatten(values: Any) -> list[Tensor]:
    if isinstance(values, Tensor):
        return [values]
    return [t for v in values for t in _flatten(v)]


def _check_arguments(cfg: ModelConfig, graph: str, shapes: str, opset: int,
                     example_size: Sequence[int], batch: int,
                     class_names: Sequence[str] | None) -> None:
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")
    if opset not in OPSETS:
        raise ValueError(f"opset {opset} is not supported: use one of {OPSETS} (opset 21 turns "
                         f"GroupNorm into GroupNormalization, which ONNX Runtime lacks)")
    height, width = (int(v) for v in example_size)
    if height % SIZE_DIVISOR or width % SIZE_DIVISOR or height == width or \
            min(height, width) < _MIN_SIDE32 * SIZE_DIVISOR:
        raise ValueError(f"example_size must be two different multiples of {SIZE_DIVISOR}, "
                         f">= {_MIN_SIDE32 * SIZE_DIVISOR}, got {tuple(example_size)}")
    if batch < 2:
        raise ValueError(f"batch must be >= 2 (a batch of 1 would be fixed), got {batch}")
    if class_names is not None and len(class_names) != cfg.head.num_classes:
        raise ValueError(f"class_names must name the {cfg.head.num_classes} classes, got "
                         f"{len(class_names)} names")


def _candidate_cap(cfg: ModelConfig, shapes: str, max_candidates: int | None) -> int | None:
    if shapes == "dynamic":
        if max_candidates is not None:
            raise ValueError(f"max_candidates caps a static graph; shapes='dynamic' keeps every "
                             f"candidate, got max_candidates={max_candidates}")
        return None
    cap = cfg.test.nms_pre if max_candidates is None else int(max_candidates)
    if not 1 <= cap <= MAX_STATIC_CAP:
        raise ValueError(f"max_candidates of a static graph must be in [1, {MAX_STATIC_CAP}] "
                         f"(TensorRT's top-k limit; default test.nms_pre), got {cap}")
    return cap


def _dynamic_shapes(cfg: ModelConfig, graph: str, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    dim = torch.export.Dim
    images = dim("batch", min=1, max=1024)
    side_h = dim("height32", min=_MIN_SIDE32, max=_MAX_SIDE32)
    side_w = dim("width32", min=_MIN_SIDE32, max=_MAX_SIDE32)
    canvas = {0: images, 2: SIZE_DIVISOR * side_h, 3: SIZE_DIVISOR * side_w}
    if graph == "raw":
        return (canvas,)
    if graph == "end2end":
        return canvas, {0: images}
    # postprocess: the class and kernel grids are fixed; the mask maps follow the canvas
    names, _ = io_names(cfg, "postprocess")
    outputs = tuple({0: images, 2: dim.AUTO, 3: dim.AUTO} if name.startswith("mask_")
                    else {0: images} for name in names[:-1])
    return outputs, {0: images}


def _metadata(cfg: ModelConfig, graph: str, shapes: str,
              class_names: Sequence[str] | None) -> dict[str, Any]:
    try:
        version = metadata.version("solo_fast")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        version = None
    test = cfg.test
    return {"version": version, "preset": cfg.name, "family": cfg.head.family,
            "num_classes": cfg.head.num_classes,
            "class_names": list(class_names) if class_names is not None else None,
            "graph": graph, "shapes": shapes, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "size_divisor": SIZE_DIVISOR,
            "test_scale": list(cfg.train.test_scale), "score_thr": test.score_thr,
            "mask_thr": test.mask_thr, "max_per_img": test.max_per_img,
            "mask_stride": mask_stride(cfg), "mask_output": "soft"}
