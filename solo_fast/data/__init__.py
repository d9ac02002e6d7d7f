"""Data: image files, COCO-format instance data sets, transforms, loaders and the synthetic shapes
set.

    paths = make_shapes("/tmp/shapes")
    train = CocoInstances(annotation_file=paths.train_annotations, image_dir=paths.train_images,
                          transform=build_train_transform(scales=cfg.train.train_scales,
                                                          flip_prob=cfg.train.flip_prob),
                          train=True)
    loader = build_train_loader(train, batch_size=2, num_workers=2, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:  # a Batch: images (N, 3, Hp, Wp), targets, image_sizes, ...
            losses = model.loss(model(batch.images), batch.targets)
"""

from solo_fast.data.coco import (
    CocoAnnotationWarning,
    CocoFormatError,
    CocoInstances,
    ImageRecord,
    InstanceRecord,
)
from solo_fast.data.images import load_image
from solo_fast.data.loaders import (
    Batch,
    EpochDataLoader,
    GroupedBatchSampler,
    Sample,
    aspect_ratio_groups,
    build_eval_loader,
    build_train_loader,
    collate,
)
from solo_fast.data.synthetic import SHAPES_CATEGORIES, ShapesPaths, make_shapes
from solo_fast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomChoiceResize,
    RandomFlip,
    Resize,
    build_eval_transform,
    build_train_transform,
    rescale_size,
)

__all__ = [
    "Batch",
    "CocoAnnotationWarning",
    "CocoFormatError",
    "CocoInstances",
    "Compose",
    "EpochDataLoader",
    "GroupedBatchSampler",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageRecord",
    "InstanceRecord",
    "Normalize",
    "RandomChoiceResize",
    "RandomFlip",
    "Resize",
    "SHAPES_CATEGORIES",
    "Sample",
    "ShapesPaths",
    "aspect_ratio_groups",
    "build_eval_loader",
    "build_eval_transform",
    "build_train_loader",
    "build_train_transform",
    "collate",
    "load_image",
    "make_shapes",
    "rescale_size",
]
