"""A tiny stand-in for an ``end2end`` export, built with onnx's helper API: the real inputs and
outputs, with outputs computed from the inputs by a few standard operators, and the metadata.

``masks[n, k] = sigmoid(avg_pool_4x4(images[n, 0]) + OFFSETS[k])``, so the soft masks follow the
image; image n has ``num_dets = K - n % 2`` instances with fixed scores and labels. Needs only
onnx and numpy (the no-torch test uses it too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K = 5
OFFSETS = np.array([-1.5, -0.4, 0.0, 0.7, 1.6], dtype=np.float32)  # (K,)
SCORES = np.array([0.9, 0.8, 0.6, 0.5, 0.4], dtype=np.float32)  # (K,)
LABELS = np.array([2, 0, 1, 2, 0], dtype=np.int64)  # (K,)
METADATA = {
    "version": "0.1.0", "preset": "fake", "family": "solov2", "num_classes": 3,
    "class_names": ["a", "b", "c"], "graph": "end2end", "shapes": "dynamic",
    "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "size_divisor": 32,
    "test_scale": [160, 96], "score_thr": 0.1, "mask_thr": 0.5, "max_per_img": K,
    "mask_stride": 4, "mask_output": "soft",
}


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def build_fake_model(*, metadata: dict[str, Any] | None = None,
                     static: tuple[int, int, int] | None = None,
                     drop_output: str | None = None) -> onnx.ModelProto:
    """The fake export.

    Args:
        metadata: The ``"solo_fast"`` entry (default :data:`METADATA`); None of it: ``{}``
            writes no entry.
        static: ``(N, Hp, Wp)`` fixed input shape instead of dynamic axes.
        drop_output: Leave this output out.
    """
    batch, height, width = static if static is not None else ("N", "Hp", "Wp")
    nodes = [
        _const("zero", np.array(0, np.int64)), _const("one", np.array(1, np.int64)),
        _const("two", np.array(2, np.int64)), _const("k", np.array(K, np.int64)),
        _const("k_1d", np.array([K], np.int64)), _const("four_1d", np.array([4], np.int64)),
        _const("offsets", OFFSETS.reshape(1, K, 1, 1)),
        _const("scores_row", SCORES.reshape(1, K)), _const("labels_row", LABELS.reshape(1, K)),
        _const("starts", np.array([0], np.int64)), _const("ends", np.array([1], np.int64)),
        _const("axis1", np.array([1], np.int64)),
        _const("box_zero", np.zeros((1, 1, 1), np.float32)),
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Slice", ["shape", "starts", "ends"], ["n_1d"]),
        helper.make_node("Range", ["zero", "n", "one"], ["index"]),
        helper.make_node("Mod", ["index", "two"], ["odd"]),
        helper.make_node("Sub", ["k", "odd"], ["num_dets"]),
        helper.make_node("Identity", ["num_dets"], ["num_candidates"]),
        helper.make_node("Concat", ["n_1d", "k_1d"], ["nk"], axis=0),
        helper.make_node("Concat", ["n_1d", "k_1d", "four_1d"], ["nk4"], axis=0),
        helper.make_node("Expand", ["scores_row", "nk"], ["scores"]),
        helper.make_node("Expand", ["labels_row", "nk"], ["labels"]),
        helper.make_node("Expand", ["box_zero", "nk4"], ["boxes"]),
        helper.make_node("Slice", ["images", "starts", "ends", "axis1"], ["red"]),
        helper.make_node("AveragePool", ["red"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Add", ["pooled", "offsets"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["masks"]),
    ]
    outputs = [("num_dets", TensorProto.INT64, [batch]),
               ("scores", TensorProto.FLOAT, [batch, K]),
               ("labels", TensorProto.INT64, [batch, K]),
               ("boxes", TensorProto.FLOAT, [batch, K, 4]),
               ("masks", TensorProto.FLOAT, [batch, K, None, None]),
               ("num_candidates", TensorProto.INT64, [batch])]
    graph = helper.make_graph(
        nodes, "fake_end2end",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, height, width]),
         helper.make_tensor_value_info("image_sizes", TensorProto.INT64, [batch, 2])],
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in outputs
         if name != drop_output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = METADATA if metadata is None else metadata
    if entry:
        text = entry if isinstance(entry, str) else json.dumps(entry)
        helper.set_model_props(model, {"solo_fast": text})
    onnx.checker.check_model(model)
    return model


def write_fake_model(path: Path, **kwargs: Any) -> Path:
    """Writes :func:`build_fake_model` to ``path`` and returns it."""
    onnx.save(build_fake_model(**kwargs), str(path))
    return path


class _Node:
    def __init__(self, name: str, shape: list[Any]) -> None:
        self.name, self.shape = name, shape


class _Meta:
    def __init__(self, props: dict[str, str]) -> None:
        self.custom_metadata_map = props


class FakeSession:
    """The fake export's graph in numpy, behind onnxruntime's ``InferenceSession`` interface."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.props = {"solo_fast": json.dumps(METADATA if metadata is None else metadata)}

    def get_modelmeta(self) -> _Meta:
        return _Meta(self.props)

    def get_inputs(self) -> list[_Node]:
        return [_Node("images", ["N", 3, "Hp", "Wp"]), _Node("image_sizes", ["N", 2])]

    def get_outputs(self) -> list[_Node]:
        return [_Node(name, []) for name in ("num_dets", "scores", "labels", "boxes", "masks",
                                             "num_candidates")]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        images = feeds["images"]
        n, _, height, width = images.shape
        pooled = images[:, :1].reshape(n, 1, height // 4, 4, width // 4, 4).mean((3, 5))
        masks = 1 / (1 + np.exp(-(pooled + OFFSETS.reshape(1, K, 1, 1))))  # (N, K, H4, W4)
        num_dets = K - np.arange(n) % 2
        outputs = {"num_dets": num_dets, "num_candidates": num_dets,
                   "scores": np.tile(SCORES, (n, 1)), "labels": np.tile(LABELS, (n, 1)),
                   "boxes": np.zeros((n, K, 4), np.float32), "masks": masks.astype(np.float32)}
        return [outputs[name] for name in names]
