"""Export graphs of the SOLO family: plain-torch modules with the post-processing inside, batched,
for any canvas size and empty-safe, and their ONNX export.

``common.py`` holds the batched post-processing every family shares (candidates, maskness,
matrix NMS, padded outputs); ``solo.py``, ``decoupled_solo.py`` and ``solov2.py`` each give their
family's candidate soft masks; ``graphs.py`` builds the ``raw``, ``postprocess`` and ``end2end``
graphs of a model; ``onnx.py`` exports one with its metadata and checks it on ONNX Runtime.
Imports run one way: common <- families <- graphs <- onnx <- this file. onnx, onnxscript and
onnxruntime (the ``export`` extra) are imported only when an export or a check runs.
"""

from __future__ import annotations

from solo_fast.export.common import Detections, GraphMasks, PostprocessGraph
from solo_fast.export.decoupled_solo import DecoupledGraphMasks
from solo_fast.export.graphs import GRAPHS, End2EndGraph, RawGraph, build_graph, io_names
from solo_fast.export.onnx import OPSETS, SHAPES, check_onnx, example_inputs, export_onnx
from solo_fast.export.solo import SOLOGraphMasks
from solo_fast.export.solov2 import SOLOv2GraphMasks

__all__ = [
    "GRAPHS",
    "OPSETS",
    "SHAPES",
    "DecoupledGraphMasks",
    "Detections",
    "End2EndGraph",
    "GraphMasks",
    "PostprocessGraph",
    "RawGraph",
    "SOLOGraphMasks",
    "SOLOv2GraphMasks",
    "build_graph",
    "check_onnx",
    "example_inputs",
    "export_onnx",
    "io_names",
]
