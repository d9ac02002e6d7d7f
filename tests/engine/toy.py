"""A tiny in-memory data set and model for the engine tests (and a torchrun entry point)."""

import json
import sys

import torch
from torch.utils.data import Dataset

import solo_fast
from solo_fast.data.loaders import Sample, build_train_loader

HEIGHT, WIDTH = 64, 96


class ToyShapes(Dataset):
    """Normalised noise images with one or two rectangles each; deterministic per index."""

    def __init__(self, count: int = 4) -> None:
        self.count = count
        self.original_sizes = [(HEIGHT, WIDTH)] * count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(3, HEIGHT, WIDTH, generator=generator)
        masks = torch.zeros(2, HEIGHT, WIDTH, dtype=torch.bool)
        top, left = 4 + 3 * index, 6 + 5 * index
        masks[0, top:top + 30, left:left + 40] = True
        masks[1, 30:60, 50:90] = True
        boxes = torch.tensor([[left, top, left + 40, top + 30], [50, 30, 90, 60]],
                             dtype=torch.float32)
        labels = torch.tensor([index % 3, 2])
        return Sample(image, {"masks": masks, "labels": labels, "boxes": boxes}, index,
                      (HEIGHT, WIDTH))


def toy_model():
    torch.manual_seed(0)
    return solo_fast.build_model("solov2-light_r18_fpn_ms-3x_coco", num_classes=3)


def toy_loader(batch_size: int, rank: int = 0, world_size: int = 1):
    return build_train_loader(ToyShapes(), batch_size=batch_size, seed=0, rank=rank,
                              world_size=world_size)


if __name__ == "__main__":  # torchrun --nproc_per_node=2 tests/engine/toy.py WORK_DIR OUT.json
    from solo_fast.engine.distributed import init_from_environment, shutdown
    from solo_fast.engine.train import RunSettings, Trainer

    torch.set_num_threads(1)
    rank, world_size, device = init_from_environment("cpu")
    model = toy_model()
    settings = RunSettings(work_dir=sys.argv[1], epochs=2, progress=False, resume=False)
    cfg = solo_fast.get_preset("solov2-light_r18_fpn_ms-3x_coco").train
    trainer = Trainer(model=model, train_cfg=cfg, loader=toy_loader(4 // world_size, rank,
                                                                      world_size),
                      settings=settings)
    records = trainer.fit()
    if rank == 0:
        with open(sys.argv[2], "w") as out:
            json.dump(records, out)
    shutdown()
