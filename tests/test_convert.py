"""mmdetection checkpoints -> solo_fast: key maps against real mmdetection models' key lists."""

import ast
from pathlib import Path

import pytest
import torch

import solo_fast
from solo_fast import cli
from solo_fast.convert import convert_mmdet_state_dict

KEY_LISTS = Path(__file__).resolve().parent / "fixtures" / "mmdet" / "state_dict_keys"
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def fake_mmdet_state_dict(config_name: str) -> dict:
    """Random tensors under the keys and shapes of an mmdetection detector's state dict."""
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for line in (KEY_LISTS / f"{config_name}.txt").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        shape = ast.literal_eval(shape)
        if DTYPES[dtype] == torch.int64:
            state_dict[key] = torch.randint(0, 100, shape, generator=generator)
        else:
            state_dict[key] = torch.randn(shape, generator=generator)
    return state_dict


def _loads_strictly(state_dict, preset, **overrides):
    with torch.device("meta"):
        model = solo_fast.build_model(preset, **overrides)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


CONFIGS = sorted(path.stem for path in KEY_LISTS.glob("*.txt"))


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_mmdetection_key_converts_and_loads(config_name):
    mmdet = fake_mmdet_state_dict(config_name)
    converted = convert_mmdet_state_dict({"state_dict": mmdet, "meta": {}}, config_name)
    assert len(converted) == len(mmdet)
    model = _loads_strictly(converted, config_name)
    # Values travel unchanged: every converted tensor is one of the inputs.
    inputs = {id(tensor) for tensor in mmdet.values()}
    assert all(id(tensor) in inputs for tensor in converted.values())
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], mmdet["backbone.conv1.weight"])


def test_mismatches_are_listed():
    mmdet = fake_mmdet_state_dict("solov2_r50_fpn_1x_coco")
    del mmdet["neck.fpn_convs.0.conv.weight"]
    mmdet["mask_head.not_a_layer.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        convert_mmdet_state_dict(mmdet, "solov2_r50_fpn_1x_coco")
    message = str(error.value)
    assert "1 missing key(s)" in message and "neck.output_convs.0.weight" in message
    assert "1 unexpected key(s)" in message and "mask_head.not_a_layer.weight" in message


def test_wrong_class_count_is_a_shape_mismatch():
    mmdet = fake_mmdet_state_dict("solov2_r50_fpn_1x_coco")
    with pytest.raises(ValueError, match=r"(?s)wrong shape.*head.cls_pred.weight"):
        convert_mmdet_state_dict(mmdet, "solov2_r50_fpn_1x_coco", num_classes=3)


def test_model_entry_and_bad_checkpoints():
    mmdet = fake_mmdet_state_dict("solov2-light_r18_fpn_ms-3x_coco")
    assert convert_mmdet_state_dict({"model": mmdet}, "solov2-light_r18_fpn_ms-3x_coco")
    with pytest.raises(ValueError, match="no state dict found"):
        convert_mmdet_state_dict({"meta": {"epoch": 3}}, "solov2-light_r18_fpn_ms-3x_coco")


def test_cli_convert_writes_a_loadable_checkpoint(tmp_path, capsys):
    source = tmp_path / "mmdet.pth"
    torch.save({"state_dict": fake_mmdet_state_dict("solov2-light_r18_fpn_ms-3x_coco"),
                "meta": {"epoch": 36}}, source)
    destination = tmp_path / "out" / "solo_fast.pt"
    assert cli.main(["convert", str(source), str(destination),
                     "--preset", "solov2-light_r18_fpn_ms-3x_coco"]) == 0
    written = torch.load(destination, weights_only=True)
    assert written["preset"] == "solov2-light_r18_fpn_ms-3x_coco"
    _loads_strictly(written["state_dict"], written["preset"])
    assert sorted(p.name for p in destination.parent.iterdir()) == ["solo_fast.pt"]  # no temp


def test_cli_convert_failure_writes_nothing(tmp_path, capsys):
    source = tmp_path / "mmdet.pth"
    torch.save({"state_dict": fake_mmdet_state_dict("solov2-light_r18_fpn_ms-3x_coco")}, source)
    destination = tmp_path / "solo_fast.pt"
    code = cli.main(["convert", str(source), str(destination),
                     "--preset", "solov2_r50_fpn_1x_coco"])
    assert code == 2 and not destination.exists()
    assert "does not fit preset 'solov2_r50_fpn_1x_coco'" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "absent.pth"), str(destination),
                     "--preset", "solov2_r50_fpn_1x_coco"]) == 2
    assert "does not exist" in capsys.readouterr().err
