"""The exported ONNX files on ONNX Runtime (CPU) against the torch graph modules and the eager
reference path, at batch and canvas sizes other than the export example's; their metadata; the
arguments export_onnx refuses. One export per family and graph kind, shared by a module."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from solo_fast.export import Detections, build_graph, export_onnx, io_names
from solo_fast.export.common import flatten_outputs
from tests.export.helpers import (
    FAMILIES,
    assert_matches_reference,
    detecting_model,
    random_outputs,
    tiny_config,
)

# N=images, H, W=canvas

CLASS_NAMES = ["cat", "dog", "newt"]




def _run(path, feeds: list[torch.Tensor]) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), feeds, strict=True)}
    return [torch.from_numpy(np.asarray(out)) for out in session.run(None, inputs)]


def _images(batch: int, canvas: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *canvas, generator=torch.Generator().manual_seed(seed))


def _op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module", params=FAMILIES)
def end2end(request, tmp_path_factory):
    cfg = tiny_config(request.param)
    model = detecting_model(cfg)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    # export_onnx's own ONNX Runtime check once; the tests below compare more anyway
    export_onnx(model, path, cfg=cfg, class_names=CLASS_NAMES,
                check=request.param == "solov2")
    return cfg, build_graph(cfg, model, graph="end2end"), path


@pytest.mark.parametrize("batch, canvas, sizes", [
    (1, (320, 256), [(300, 256)]),
    (3, (192, 384), [(192, 384), (160, 300), (100, 384)]),
])
def test_end2end_matches_torch(end2end, batch, canvas, sizes):
    cfg, graph, path = end2end
    images, image_sizes = _images(batch, canvas, seed=batch), torch.tensor(sizes)
    got = Detections(*_run(path, [images, image_sizes]))
    with torch.no_grad():
        want = graph(images, image_sizes)
    assert (want.num_dets > 0).all()
    assert got.masks.shape == (batch, cfg.test.max_per_img, canvas[0] // 4, canvas[1] // 4)
    for name in ("num_dets", "labels", "num_candidates"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # the networks differ in the last bits (ONNX Runtime's convolutions and resizes), which can
    # flip a mask pixel at mask_thr: one pixel of an area-A mask moves maskness by ~1/A
    torch.testing.assert_close(got.scores, want.scores, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(got.masks, want.masks, rtol=0.0, atol=1e-4)
    torch.testing.assert_close(got.boxes, want.boxes, rtol=0.0, atol=0.0)


def test_end2end_metadata_and_ops(end2end):
    cfg, _, path = end2end
    proto = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["solo_fast"])
    assert meta == {
        "version": meta["version"], "preset": cfg.name, "family": cfg.head.family,
        "num_classes": 3, "class_names": CLASS_NAMES, "graph": "end2end", "shapes": "dynamic",
        "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "size_divisor": 32,
        "test_scale": list(cfg.train.test_scale), "score_thr": 0.1, "mask_thr": 0.5,
        "max_per_img": 100, "mask_stride": 4, "mask_output": "soft", "max_candidates": None}
    assert isinstance(meta["version"], str)
    assert [i.name for i in proto.graph.input] == ["images", "image_sizes"]
    assert [o.name for o in proto.graph.output] == list(Detections._fields)
    assert proto.opset_import[0].version == 20 or any(
        o.domain == "" and o.version == 20 for o in proto.opset_import)
    assert "Trilu" not in _op_types(path)
    # the candidate count is taken from the data (which a static graph must not do)
    assert not _topk_sizes_from_shapes(proto)


@pytest.fixture(scope="module", params=["solo", "decoupled_solo", "solov2"])
def postprocess(request, tmp_path_factory):
    # small caps so that random outputs saturate nms_pre and max_per_img
    cfg = tiny_config(request.param, nms_pre=25, max_per_img=7)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}_postprocess.onnx"
    export_onnx(detecting_model(cfg), path, cfg=cfg, graph="postprocess")
    return cfg, build_graph(cfg, graph="postprocess"), path


@pytest.mark.parametrize("batch, canvas", [(1, (64, 96)), (3, (128, 96))])
def test_postprocess_matches_torch_and_the_reference(postprocess, batch, canvas):
    cfg, graph, path = postprocess
    raw = random_outputs(cfg, canvas=canvas, batch=batch, seed=batch, ties=True)
    sizes = [(canvas[0] - 8 * i, canvas[1] - 16 * i) for i in range(batch)]
    if batch > 1:
        for logits in raw.cls_preds:
            logits[1] = -20.0  # an image without detections inside the batch
    got = Detections(*_run(path, [*flatten_outputs(raw), torch.tensor(sizes)]))
    with torch.no_grad():
        want = graph(flatten_outputs(raw), torch.tensor(sizes))
    for name in ("num_dets", "labels", "num_candidates", "boxes"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(got.masks, want.masks, rtol=0.0, atol=1e-6)
    trace = assert_matches_reference(got, cfg, raw, sizes)
    assert max(len(t["nms_input"]["labels"]) for t in trace) > cfg.test.nms_pre
    assert int(got.num_dets.max()) == cfg.test.max_per_img
    if batch > 1:
        assert got.num_dets[1] == 0 and not got.masks[1].any()


def test_postprocess_with_no_candidate_at_all(postprocess):
    cfg, _, path = postprocess
    raw = random_outputs(cfg, canvas=(96, 64), batch=2, seed=7)
    for logits in raw.cls_preds:
        logits.fill_(-20.0)
    got = Detections(*_run(path, [*flatten_outputs(raw), torch.tensor([(96, 64), (64, 64)])]))
    assert got.num_dets.tolist() == [0, 0] and got.num_candidates.tolist() == [0, 0]
    for name in ("scores", "labels", "boxes", "masks"):
        assert not getattr(got, name).any(), name
    assert got.masks.shape == (2, 7, 24, 16)
    assert "Trilu" not in _op_types(path)


def test_raw_graph_matches_torch(tmp_path):
    cfg = tiny_config("solov2_light")
    model = detecting_model(cfg)
    path = export_onnx(model, tmp_path / "raw.onnx", cfg=cfg, graph="raw", check=False)
    graph = build_graph(cfg, model, graph="raw")
    names = [o.name for o in onnx.load(str(path)).graph.output]
    assert names == io_names(cfg, "raw")[1]
    for batch, canvas in [(1, (384, 192)), (3, (128, 224))]:
        images = _images(batch, canvas, seed=batch)
        got = _run(path, [images])
        with torch.no_grad():
            want = graph(images)
        for name, a, b in zip(names, got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()),
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kwargs, message", [
    ({"opset": 21}, "opset 21 is not supported"),
    ({"shapes": "ragged"}, "shapes must be one of"),
    ({"graph": "backbone"}, "graph must be one of"),
    ({"example_size": (256, 256)}, "example_size must be two different multiples of 32"),
    ({"example_size": (250, 320)}, "example_size must be two different multiples of 32"),
    ({"batch": 1}, "batch must be >= 2"),
    ({"class_names": ["cat"]}, "class_names must name the 3 classes, got 1"),
    ({"max_candidates": 10}, "max_candidates caps a static graph"),
    ({"shapes": "static", "max_candidates": 4000}, r"must be in \[1, 3840\]"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    cfg = tiny_config("solo")
    with pytest.raises(ValueError, match=message):
        export_onnx(None, tmp_path / "x.onnx", cfg=cfg, **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_import_does_not_load_onnx():
    import subprocess
    import sys

    code = ("import sys, solo_fast.export; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ static shapes

# standard ops TensorRT runs without plugins (its ONNX operator support list)
STATIC_OPS = {
    "Add", "And", "Cast", "Clip", "Concat", "ConstantOfShape", "Conv", "Div", "Equal", "Exp",
    "Expand",
    "Gather", "GatherElements", "GatherND", "Greater", "GreaterOrEqual", "InstanceNormalization",
    "Less", "MatMul", "MaxPool", "Min", "Mod", "Mul", "Pow", "Range", "ReduceMax", "ReduceMin",
    "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice", "Squeeze", "Sub",
    "Tile", "TopK", "Transpose", "Unsqueeze", "Where"}
# ops through which a TopK's k may come from the input shapes without depending on the data
SHAPE_OPS = {"Shape", "Gather", "Reshape", "Concat", "Slice", "Squeeze", "Unsqueeze", "Cast",
             "Constant", "Add", "Sub", "Mul", "Div", "Min", "Max"}


def _topk_sizes_from_shapes(proto: onnx.ModelProto) -> bool:
    """Every TopK's k is computed from tensor shapes and constants only."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    constants = {init.name for init in proto.graph.initializer}

    def from_shapes(name: str) -> bool:
        if name in constants:
            return True
        node = producer.get(name)
        if node is None:  # a graph input: data
            return False
        if node.op_type == "Shape":
            return True
        return node.op_type in SHAPE_OPS and all(from_shapes(i) for i in node.input if i)

    return all(from_shapes(node.input[1]) for node in proto.graph.node if node.op_type == "TopK")


def _assert_static_graph(path) -> None:
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert _op_types(path) <= STATIC_OPS, _op_types(path) - STATIC_OPS
    assert _topk_sizes_from_shapes(proto)
    values = [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]
    assert all(v.type.tensor_type.elem_type != onnx.TensorProto.DOUBLE for v in values)
    assert not [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.DOUBLE]


def test_static_end2end_is_standard_ops_and_exact_under_its_cap(tmp_path):
    cfg = tiny_config("solov2")
    model = detecting_model(cfg)
    dynamic_graph = build_graph(cfg, model, graph="end2end")
    path = export_onnx(model, tmp_path / "static.onnx", cfg=cfg, shapes="static",
                       max_candidates=500, check=False)
    _assert_static_graph(path)
    meta = json.loads(onnx.load(str(path)).metadata_props[0].value)
    assert meta["shapes"] == "static" and meta["max_candidates"] == 500
    images, sizes = _images(3, (160, 224), seed=5), torch.tensor([(160, 224), (150, 200),
                                                                  (96, 224)])
    got = Detections(*_run(path, [images, sizes]))
    with torch.no_grad():
        want = dynamic_graph(images, sizes)  # every candidate: equal while under the cap
    assert int(want.num_candidates.max()) < 500 and (want.num_dets > 0).all()
    for name in ("num_dets", "labels", "num_candidates", "boxes"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.scores, want.scores, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(got.masks, want.masks, rtol=0.0, atol=1e-4)


def test_static_postprocess_over_its_cap(tmp_path):
    cfg = tiny_config("solo")
    path = export_onnx(detecting_model(cfg), tmp_path / "static.onnx", cfg=cfg,
                       graph="postprocess", shapes="static", max_candidates=40)
    _assert_static_graph(path)
    raw = random_outputs(cfg, canvas=(96, 128), batch=2, seed=8)
    sizes = torch.tensor([(96, 128), (90, 100)])
    got = Detections(*_run(path, [*flatten_outputs(raw), sizes]))
    with torch.no_grad():
        want = build_graph(cfg, graph="postprocess", cap=40)(flatten_outputs(raw), sizes)
    assert (got.num_candidates > 40).all()  # the cap was hit, and the output says so
    for name in ("num_dets", "labels", "num_candidates", "boxes"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(got.masks, want.masks, rtol=0.0, atol=1e-6)
