"""The solo-fast command line, end to end on the synthetic data set."""

import json

import pytest
import torch

from solo_fast import cli


def test_make_shapes_then_train_then_resume(tmp_path, capsys):
    assert cli.main(["make-shapes", str(tmp_path / "shapes"), "--num-train", "4",
                     "--num-val", "2"]) == 0
    shapes = tmp_path / "shapes"
    arguments = ["train", "--preset", "solov2-light_r18_fpn_ms-3x_coco",
                 "--train-annotations", str(shapes / "annotations" / "instances_train.json"),
                 "--train-images", str(shapes / "train"), "--work-dir", str(tmp_path / "run"),
                 "--set", "train_scales=((160, 128),)", "--batch-size", "2", "--workers", "0",
                 "--device", "cpu"]
    assert cli.main([*arguments, "--max-iters", "1"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["overrides"]["num_classes"] == len(run["category_names"]) == 5
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=False)["iteration"] == 1
    assert cli.main([*arguments, "--max-iters", "2"]) == 0  # resumes at iteration 1
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in log] == [1, 2]
    assert "trained to iteration 2" in capsys.readouterr().out

    checkpoint = str(tmp_path / "run" / "latest.pt")
    metrics_file = tmp_path / "metrics.json"
    assert cli.main(["eval", "--checkpoint", checkpoint, "--workers", "0",
                     "--annotations", str(shapes / "annotations" / "instances_val.json"),
                     "--images", str(shapes / "val"), "--metrics", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert {"segm/AP", "bbox/AP"} <= set(metrics) and 0 <= metrics["segm/AP"] <= 1
    assert cli.main(["predict", str(shapes / "val"), "--checkpoint", checkpoint,
                     "--output", str(tmp_path / "preds.json"),
                     "--overlays", str(tmp_path / "overlays")]) == 0
    assert isinstance(json.loads((tmp_path / "preds.json").read_text()), list)
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2


def test_bad_override_is_reported(tmp_path, capsys):
    code = cli.main(["train", "--preset", "solov2-light_r18_fpn_ms-3x_coco",
                     "--train-annotations", str(tmp_path / "missing.json"),
                     "--train-images", str(tmp_path), "--work-dir", str(tmp_path / "run"),
                     "--set", "nmu_classes=3"])
    assert code == 2
    assert "nmu_classes" in capsys.readouterr().err


def test_make_shapes_easy_writes_the_demo_set(tmp_path):
    assert cli.main(["make-shapes", str(tmp_path / "shapes"), "--num-train", "2",
                     "--num-val", "1", "--easy"]) == 0
    manifest = json.loads((tmp_path / "shapes" / "manifest.json").read_text())
    assert manifest["object_style"] == "flat" and manifest["class_colours"] is True
    assert manifest["max_objects"] == 4


def test_a_checkpoint_with_a_weight_average_is_loaded_with_it(tmp_path):
    from solo_fast import build_model

    overrides = {"num_classes": 3}
    raw = build_model("solov2-light_r18_fpn_ms-3x_coco", **overrides).state_dict()
    averaged = {name: value + 1 if value.dtype.is_floating_point else value
                for name, value in raw.items()}
    torch.save({"model": raw, "ema": {"module": averaged, "updates": 7}}, tmp_path / "latest.pt")
    (tmp_path / "run.json").write_text(json.dumps(
        {"preset": "solov2-light_r18_fpn_ms-3x_coco", "overrides": overrides}))
    model, _, _ = cli._load_checkpoint(str(tmp_path / "latest.pt"), "cpu")
    for name, value in model.state_dict().items():
        assert torch.equal(value, averaged[name]), name


def test_predict_with_an_onnx_export_writes_coco_json_and_overlays(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_util

    from tests.deploy.fake_model import LABELS, METADATA, SCORES, write_fake_model
    from tests.deploy.test_predictor import make_images, torch_path

    model = write_fake_model(tmp_path / "fake.onnx")
    images = make_images([(150, 211), (97, 60), (130, 130)], seed=4)
    folder = tmp_path / "images"
    folder.mkdir()
    for n, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{n}.png")
    assert cli.main(["predict", str(folder), "--onnx", str(model), "--batch-size", "2",
                     "--output", str(tmp_path / "preds.json"),
                     "--overlays", str(tmp_path / "overlays"), "--device", "cpu"]) == 0
    records = json.loads((tmp_path / "preds.json").read_text())
    # batches of 2 then 1: image n of a batch has 5 - n % 2 instances
    expected = (torch_path(model, images[:2], tuple(METADATA["test_scale"]))
                + torch_path(model, images[2:], tuple(METADATA["test_scale"])))
    counts = [5, 4, 5]
    assert len(records) == sum(counts)
    start = 0
    for n, count in enumerate(counts):
        mine = records[start:start + count]
        start += count
        assert {r["file_name"] for r in mine} == {str(folder / f"{n}.png")}
        assert [r["category_id"] for r in mine] == LABELS[:count].tolist()
        np.testing.assert_allclose([r["score"] for r in mine], SCORES[:count])
        decoded = mask_util.decode([r["segmentation"] for r in mine]).transpose(2, 0, 1)
        np.testing.assert_array_equal(decoded.astype(bool), expected[n]["masks"])
        boxes = expected[n]["boxes"]
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        np.testing.assert_array_equal([r["bbox"] for r in mine], xywh)
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*.png")) == ["0.png", "1.png",
                                                                            "2.png"]
    assert "14 instances in 3 images" in capsys.readouterr().out


def test_predict_needs_exactly_one_model(tmp_path, capsys):
    for models in ([], ["--onnx", "a.onnx", "--checkpoint", "b.pt"]):
        with pytest.raises(SystemExit):
            cli.main(["predict", str(tmp_path), "--output", str(tmp_path / "p.json"), *models])
    assert "--checkpoint" in capsys.readouterr().err
