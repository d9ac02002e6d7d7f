"""Evaluation keeps memory flat however many images it sees: 500 images of full-size masks.

The evaluator may keep only the compact form of each prediction (COCO RLE strings, boxes,
scores); a list of the predicted bool masks would grow by 1.2 MB per image here.
"""

import numpy as np
import torch
from pycocotools.coco import COCO

from solo_fast.engine.evaluate import CocoEvaluator, evaluate_model
from tests.ops.helpers import resident_memory

NUM_IMAGES = 500
HEIGHT, WIDTH = 480, 640
BOXES = [(40, 30, 200, 180), (260, 60, 420, 300), (100, 250, 300, 450), (450, 100, 620, 400)]


def _coco_ground_truth() -> COCO:
    images, annotations = [], []
    for image_id in range(1, NUM_IMAGES + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT,
                       "file_name": f"{image_id}.jpg"})
        for label, (x1, y1, x2, y2) in enumerate(BOXES):
            polygon = [x1, y1, x2, y1, x2, y2, x1, y2]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": 10 + label, "segmentation": [polygon],
                                "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1]})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": 10 + i, "name": f"c{i}"} for i in range(len(BOXES))]}
    coco.createIndex()
    return coco


class _Batch:
    def __init__(self, image_ids):
        self.images = torch.zeros(len(image_ids), 3, 32, 32)
        self.image_ids = image_ids
        self.image_sizes = [(HEIGHT, WIDTH)] * len(image_ids)
        self.original_sizes = [(HEIGHT, WIDTH)] * len(image_ids)


class _GroundTruthModel(torch.nn.Module):
    """Predicts every image's ground-truth rectangles as fresh full-size bool masks."""

    def forward(self, images):
        return images

    def predict(self, outputs, image_sizes, original_sizes, *, mask_format="bool"):
        del mask_format  # bool masks whatever is asked: the evaluator's own encoding is tested
        predictions = []
        for _ in image_sizes:
            masks = torch.zeros(len(BOXES), HEIGHT, WIDTH, dtype=torch.bool)
            for index, (x1, y1, x2, y2) in enumerate(BOXES):
                # pycocotools rasterises the polygon's right and bottom edges inclusively
                masks[index, y1:y2 + 1, x1:x2 + 1] = True
            boxes = torch.tensor(BOXES, dtype=torch.float32) + torch.tensor([0, 0, 1, 1])
            predictions.append({"masks": masks, "labels": torch.arange(len(BOXES)),
                                "scores": torch.ones(len(BOXES)), "boxes": boxes})
        return predictions


def test_memory_stays_flat_over_500_images():
    evaluator = CocoEvaluator(coco_gt=_coco_ground_truth(),
                              label_to_category_id=[10 + i for i in range(len(BOXES))])
    batch_ids = np.arange(1, NUM_IMAGES + 1).reshape(-1, 4).tolist()  # batches of 4 images
    resident = {}

    def loader():
        for index, image_ids in enumerate(batch_ids):
            if index == 25:  # after 100 images: allocator and encoder warmed up
                resident["warm"] = resident_memory()
            yield _Batch(image_ids)
        resident["end"] = resident_memory()

    metrics = evaluate_model(_GroundTruthModel(), loader(), evaluator)
    mask_bytes_per_image = len(BOXES) * HEIGHT * WIDTH
    growth = resident["end"] - resident["warm"]
    # 400 more images' masks would be 491 MB; their RLE strings and records take a few MB
    assert growth < 0.03 * 400 * mask_bytes_per_image, f"grew by {growth / 2**20:.1f} MiB"
    assert metrics["segm/AP"] > 0.99 and metrics["bbox/AP"] > 0.99
