"""COCO evaluation: perfect and empty predictions, shifted masks, compact storage, JSON, DDP."""

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from solo_fast.data import CocoInstances, make_shapes
from solo_fast.engine.evaluate import (
    METRIC_NAMES,
    CocoEvaluator,
    evaluate_model,
    xyxy_to_xywh,
)
from solo_fast.engine.visualize import class_color, draw_instances, save_overlay
from solo_fast.postprocess import encode_rle

KEYS = [f"{t}/{m}" for t in ("segm", "bbox") for m in METRIC_NAMES]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    paths = make_shapes(tmp_path_factory.mktemp("shapes"), num_train=2, num_val=6)
    return CocoInstances(annotation_file=paths.val_annotations, image_dir=paths.val_images,
                         train=False)


def _gt_predictions(dataset, shift=0):
    """The ground truth of every image as predictions with score 1, masks moved right."""
    for index in range(len(dataset)):
        sample = dataset[index]
        masks = sample.target["masks"]
        boxes = sample.target["boxes"].clone()
        if shift:
            masks = torch.roll(masks, shifts=shift, dims=-1)
            boxes[:, 0::2] += shift
        yield sample.image_id, {"masks": masks, "labels": sample.target["labels"],
                                "scores": torch.ones(len(masks)), "boxes": boxes}


def _evaluator(dataset, **kwargs):
    return CocoEvaluator(coco_gt=dataset.coco, label_to_category_id=dataset.label_to_category_id,
                         **kwargs)


def _run(dataset, shift=0, **kwargs):
    evaluator = _evaluator(dataset, **kwargs)
    for image_id, prediction in _gt_predictions(dataset, shift):
        evaluator.process([image_id], [prediction])
    return evaluator


def test_ground_truth_as_predictions_scores_one(dataset, tmp_path, capsys):
    metrics = _run(dataset, output_file=tmp_path / "sub" / "results.json").evaluate()
    assert list(metrics) == KEYS
    assert metrics["segm/AP"] == pytest.approx(1.0) and metrics["bbox/AP"] == pytest.approx(1.0)
    assert metrics["segm/AP50"] == pytest.approx(1.0) and metrics["bbox/AP75"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "AP50" in printed and "segm" in printed and "bbox" in printed


def test_no_detections_gives_zeros(dataset, tmp_path):
    evaluator = _evaluator(dataset, output_file=tmp_path / "results.json")
    assert evaluator.evaluate() == dict.fromkeys(KEYS, 0.0)  # nothing processed at all
    empty = {"masks": torch.zeros(0, 4, 4, dtype=torch.bool), "labels": torch.zeros(0).long(),
             "scores": torch.zeros(0), "boxes": torch.zeros(0, 4)}
    evaluator.process(dataset.image_ids[:2], [empty, empty])
    assert evaluator.evaluate() == dict.fromkeys(KEYS, 0.0)
    assert json.loads((tmp_path / "results.json").read_text()) == []


def test_shifted_masks_lower_ap(dataset):
    perfect = _run(dataset).evaluate()
    shifted = _run(dataset, shift=4).evaluate()
    for key in ("segm/AP", "bbox/AP", "segm/AP75"):
        assert shifted[key] < perfect[key] - 0.05, key


def test_reset_forgets_processed_images(dataset):
    evaluator = _run(dataset, shift=4)
    evaluator.reset()
    for image_id, prediction in _gt_predictions(dataset):
        evaluator.process([image_id], [prediction])
    assert evaluator.evaluate()["segm/AP"] == pytest.approx(1.0)


def test_only_processed_images_are_evaluated(dataset):
    # Images never processed must not count as missed detections (a shard of the data set).
    evaluator = _evaluator(dataset)
    for image_id, prediction in list(_gt_predictions(dataset))[:3]:
        evaluator.process([image_id], [prediction])
    assert evaluator.evaluate()["segm/AP"] == pytest.approx(1.0)


def test_evaluator_keeps_rle_strings_not_masks(dataset):
    evaluator = _run(dataset)
    results = evaluator._results
    assert len(results) == sum(len(r.instances) for r in dataset.records)
    for result in results:
        assert set(result) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert isinstance(result["segmentation"]["counts"], str)
        assert len(result["segmentation"]["counts"]) < 4096  # a few KB per instance at most
        assert all(isinstance(v, float) for v in result["bbox"] + [result["score"]])
    # nothing in the evaluator holds an array or tensor
    stack = [vars(evaluator)]
    while stack:
        value = stack.pop()
        assert not isinstance(value, (torch.Tensor, np.ndarray)), type(value)
        if isinstance(value, dict):
            stack.extend(v for k, v in value.items() if k != "coco_gt")
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_results_json_round_trips_through_load_res(dataset, tmp_path):
    output = tmp_path / "results.json"
    _run(dataset, output_file=output).evaluate()
    assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]  # no temp file left
    results = json.loads(output.read_text())
    assert len(results) == sum(len(r.instances) for r in dataset.records)
    assert {r["category_id"] for r in results} <= set(dataset.label_to_category_id)
    coco_dt = dataset.coco.loadRes(str(output))
    assert len(coco_dt.anns) == len(results)
    first = results[0]
    mask = dataset.coco.annToMask(coco_dt.anns[1])
    assert mask.sum() > 0 and first["bbox"][2] > 0 and first["bbox"][3] > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_encode_masks_and_boxes():
    masks = torch.zeros(2, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    rles = encode_rle(masks)
    assert [r["size"] for r in rles] == [[5, 7], [5, 7]]
    from pycocotools import mask as mask_utils
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()}
                                 for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
    assert encode_rle(torch.zeros(0, 5, 7, dtype=torch.bool)) == []
    np.testing.assert_allclose(xyxy_to_xywh(torch.tensor([[2.0, 1.0, 6.0, 3.0]])), [[2, 1, 4, 2]])


def test_bad_inputs_fail_clearly(dataset):
    evaluator = _evaluator(dataset)
    assert repr(evaluator).startswith("CocoEvaluator(images=6")
    with pytest.raises(KeyError, match="12345"):
        evaluator.process([12345], [next(_gt_predictions(dataset))[1]])
    with pytest.raises(ValueError, match="iou_types"):
        _evaluator(dataset, iou_types=("keypoints",))


def test_single_iou_type(dataset):
    metrics = _run(dataset, iou_types=("bbox",)).evaluate()
    assert list(metrics) == [f"bbox/{m}" for m in METRIC_NAMES] and metrics["bbox/AP"] == 1.0


class _Oracle(torch.nn.Module):
    """A "model" whose predictions are the ground truth of the images' ids."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = {image_id: p for image_id, p in _gt_predictions(dataset)}
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.ids = None

    def forward(self, images):
        assert not self.training and not torch.is_grad_enabled()
        return images

    def predict(self, outputs, image_sizes, original_sizes, *, mask_format="bool"):
        assert mask_format == "rle"  # evaluate_model asks for RLE: no full-size masks kept
        return [{**self.truth[i], "masks": encode_rle(self.truth[i]["masks"])}
                for i in self.ids.pop(0)]


def test_evaluate_model_loops_the_loader(dataset):
    from solo_fast.data import build_eval_loader, build_eval_transform
    loader_set = CocoInstances(annotation_file=dataset.annotation_file,
                               image_dir=dataset.image_dir, train=False,
                               transform=build_eval_transform(scale=(96, 64)))
    loader = build_eval_loader(loader_set, batch_size=4)
    model = _Oracle(dataset)
    model.ids = [list(batch.image_ids) for batch in loader]
    model.train()
    metrics = evaluate_model(model, loader, _evaluator(dataset))
    assert metrics["segm/AP"] == pytest.approx(1.0) and model.training


def _ddp_worker(rank, world_size, init_file, annotation_file, image_dir, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        dataset = CocoInstances(annotation_file=annotation_file, image_dir=image_dir,
                                train=False)
        evaluator = _evaluator(dataset)
        for index, (image_id, prediction) in enumerate(_gt_predictions(dataset)):
            if index % world_size == rank:
                evaluator.process([image_id], [prediction])
        queue.put((rank, evaluator.evaluate()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="no gloo")
def test_distributed_gathers_to_rank_zero(dataset, tmp_path):
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(_ddp_worker, nprocs=2, args=(2, str(tmp_path / "init"), str(dataset.annotation_file),
                                          str(dataset.image_dir), queue))
    results = dict(queue.get() for _ in range(2))
    assert results[1] == {}
    assert results[0]["segm/AP"] == pytest.approx(1.0)
    assert results[0]["bbox/AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------- visualisation


def test_draw_instances_changes_masked_pixels_only(dataset, tmp_path):
    sample = dataset[1]
    image = sample.image  # uint8 (3, H, W)
    _, prediction = list(_gt_predictions(dataset))[1]
    prediction["scores"] = torch.linspace(0.5, 1.0, len(prediction["labels"]))
    names = dataset.category_names
    drawn = draw_instances(image, prediction, names, score_thr=0.3)
    height, width = image.shape[1:]
    assert drawn.size == (width, height) and drawn.mode == "RGB"
    before = image.permute(1, 2, 0).numpy().astype(int)
    after = np.asarray(drawn).astype(int)
    union = prediction["masks"].any(0).numpy()
    changed = np.abs(after - before).sum(-1) > 0
    assert changed[union].mean() > 0.5  # masks are tinted
    # far from every box (labels and outlines sit on or next to the boxes) nothing changes
    near = np.zeros_like(union)
    for x1, y1, x2, y2 in prediction["boxes"].round().long().tolist():
        near[max(0, y1 - 16):y2 + 3, max(0, x1 - 3):x2 + 60] = True
    assert not changed[~near].any()

    same = draw_instances(Image.fromarray(before.astype(np.uint8)), prediction, names,
                          score_thr=0.3)
    assert np.array_equal(np.asarray(same), after)  # PIL and tensor input agree; deterministic
    blank = draw_instances(image, prediction, names, score_thr=2.0)
    assert np.array_equal(np.asarray(blank), before)  # nothing above the threshold
    assert class_color(3) == class_color(3) and class_color(3) != class_color(4)

    path = save_overlay(tmp_path / "vis" / "overlay.png", image, prediction, names)
    assert Image.open(path).size == (width, height)
    with pytest.raises(ValueError, match="do not fit"):
        draw_instances(image[:, :-1], prediction, names)


def test_nan_when_an_area_range_has_no_ground_truth(tmp_path):
    # One large square: no small or medium ground truth, so COCOeval reports -1 -> NaN.
    from pycocotools.coco import COCO
    mask = np.zeros((120, 120), dtype=bool)
    mask[10:110, 10:110] = True
    rle = encode_rle(mask[None])[0]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 120, "width": 120}],
            "categories": [{"id": 5, "name": "square"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "segmentation": rle,
                             "area": 10000, "bbox": [10, 10, 100, 100], "iscrowd": 0}]}
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    evaluator = CocoEvaluator(coco_gt=coco, label_to_category_id=[5])
    evaluator.process([1], [{"masks": torch.from_numpy(mask[None]), "labels": torch.tensor([0]),
                             "scores": torch.tensor([0.9]),
                             "boxes": torch.tensor([[10.0, 10.0, 110.0, 110.0]])}])
    metrics = evaluator.evaluate()
    assert metrics["segm/AP"] == pytest.approx(1.0) and metrics["bbox/APl"] == pytest.approx(1.0)
    assert math.isnan(metrics["segm/APs"]) and math.isnan(metrics["bbox/APm"])


def test_rle_masks_must_match_the_labels(dataset):
    image_id, prediction = next(_gt_predictions(dataset))
    evaluator = _evaluator(dataset)
    rles = encode_rle(prediction["masks"])[:-1]
    with pytest.raises(ValueError, match="RLE masks for"):
        evaluator.process([image_id], [{**prediction, "masks": rles}])
