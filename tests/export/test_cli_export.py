"""``solo-fast export``: a checkpoint (solo-fast convert's format) to an ONNX file."""

from __future__ import annotations

import json

import onnx
import torch

from solo_fast import cli
from solo_fast.builder import build_model
from tests.export.helpers import PRESETS, TINY


def _checkpoint(tmp_path):
    overrides = {**TINY, "num_grids": list(TINY["num_grids"])}
    model = build_model(PRESETS["solov2_light"], **overrides)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "preset": PRESETS["solov2_light"],
                "overrides": overrides}, path)
    return path


def test_export_a_checkpoint_with_overrides(tmp_path, capsys):
    output = tmp_path / "model.onnx"
    code = cli.main(["export", "--checkpoint", str(_checkpoint(tmp_path)), "--set",
                     "max_per_img=20", "--graph", "postprocess", "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    proto = onnx.load(str(output))
    meta = json.loads(proto.metadata_props[0].value)
    assert meta["preset"] == PRESETS["solov2_light"] and meta["max_per_img"] == 20
    assert meta["graph"] == "postprocess" and meta["num_classes"] == 3
    assert [o.name for o in proto.graph.output][1] == "scores"
    assert proto.graph.output[1].type.tensor_type.shape.dim[1].dim_value == 20
    assert str(output) in capsys.readouterr().out


def test_export_refuses_what_it_cannot_do(tmp_path, capsys):
    output = str(tmp_path / "model.onnx")
    assert cli.main(["export", "--output", output]) == 2
    assert "give --preset, --checkpoint or both" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(_checkpoint(tmp_path)), "--preset",
                     "solo_r50_fpn_1x_coco", "--output", output]) == 2
    assert "disagrees with the checkpoint's preset" in capsys.readouterr().err
    assert cli.main(["export", "--preset", "solo_r50_fpn_1x_coco", "--max-candidates", "9",
                     "--output", output]) == 2
    assert "max_candidates caps a static graph" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()
