"""Data loaders: the sample and batch types, zero padding to a multiple of 32, aspect-ratio
grouping, and the DataLoader builders.

mmdetection pads each batch to its largest image rounded up to the size divisor (32), bottom and
right, after normalisation with 0 (``DetDataPreprocessor``, ``stack_batch``), and pads the GT masks
to the same canvas with 0 (``pad_mask=True``). Training batches come from mmengine's
``DefaultSampler`` (a seeded permutation per epoch, sharded over ranks) through
``AspectRatioBatchSampler``; :class:`GroupedBatchSampler` and :func:`build_train_loader`
reproduce both (docs/algorithms.md §2.1, §2.2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

__all__ = [
    "Batch",
    "EpochDataLoader",
    "GroupedBatchSampler",
    "Sample",
    "aspect_ratio_groups",
    "build_eval_loader",
    "build_train_loader",
    "collate",
]

# N=images in the batch, M=instances of an image, h/w=image size, Hp/Wp=padded batch canvas

SIZE_DIVISOR = 32


class Sample(NamedTuple):
    """One image as a data set gives it (``CocoInstances[i]``) and :func:`collate` takes it."""

    image: torch.Tensor  # (3, h, w): uint8 as loaded, float32 after Normalize
    target: dict[str, torch.Tensor]  # masks bool (M, h, w), boxes float32 (M, 4), labels int64 (M,)
    image_id: Any  # the COCO image id
    original_size: tuple[int, int]  # (height, width) as loaded, before any transform


@dataclass
class Batch:
    """A padded batch, as ``model(images)``, ``model.loss`` and ``model.predict`` take it.

    Attributes:
        images: float32 ``(N, 3, Hp, Wp)``, zero-padded bottom/right; Hp, Wp multiples of 32.
        targets: Per image ``{"masks": bool (M, Hp, Wp), "labels": int64 (M,), "boxes": float32
            (M, 4) xyxy}``; masks padded with False.
        image_sizes: Per image ``(h, w)`` inside the canvas (after resizing, before padding).
        original_sizes: Per image ``(h, w)`` as loaded.
        image_ids: Per image COCO id.
    """

    images: torch.Tensor
    targets: list[dict[str, torch.Tensor]] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    image_ids: list[Any] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return Batch(images=self.images.to(device, non_blocking=non_blocking),
                     targets=[{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()}
                              for t in self.targets],
                     image_sizes=list(self.image_sizes), original_sizes=list(self.original_sizes),
                     image_ids=list(self.image_ids))

    def pin_memory(self) -> Batch:
        """A copy in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        return Batch(images=self.images.pin_memory(),
                     targets=[{k: v.pin_memory() for k, v in t.items()} for t in self.targets],
                     image_sizes=list(self.image_sizes), original_sizes=list(self.original_sizes),
                     image_ids=list(self.image_ids))

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(batch: Sequence[Any], size_divisor: int = SIZE_DIVISOR) -> Batch:
    """Pads and stacks samples (``collate_fn`` of the loaders).

    Args:
        batch: :class:`Sample` tuples ``(image, target, image_id,
            original_size)``; images ``(3, h, w)`` of one dtype (float32 after Normalize),
            targets with ``masks`` bool ``(M, h, w)``, ``boxes`` and ``labels``.
        size_divisor: Hp and Wp are the largest h and w rounded up to a multiple of this.

    Returns:
        A :class:`Batch`; padded image pixels are exactly 0 and padded mask pixels False.

    Raises:
        ValueError: an empty batch.
    """
    if not batch:
        raise ValueError("collate needs at least one sample")
    images = [sample[0] for sample in batch]
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    pad_h = math.ceil(max(h for h, _ in sizes) / size_divisor) * size_divisor
    pad_w = math.ceil(max(w for _, w in sizes) / size_divisor) * size_divisor
    padded = images[0].new_zeros((len(images), images[0].shape[0], pad_h, pad_w))  # (N, 3, Hp, Wp)
    targets = []
    for n, (image, (h, w)) in enumerate(zip(images, sizes)):
        padded[n, :, :h, :w] = image
        target = dict(batch[n][1])
        if "masks" in target:
            masks = target["masks"]
            canvas = masks.new_zeros((masks.shape[0], pad_h, pad_w))  # (M, Hp, Wp)
            canvas[:, :h, :w] = masks
            target["masks"] = canvas
        targets.append(target)
    return Batch(images=padded, targets=targets, image_sizes=sizes,
                 original_sizes=[tuple(sample[3]) for sample in batch],
                 image_ids=[sample[2] for sample in batch])


def aspect_ratio_groups(sizes: Iterable[tuple[int, int]]) -> list[int]:
    """mmdetection's ``AspectRatioBatchSampler`` buckets: 0 for portrait (w < h), else 1.

    Args:
        sizes: ``(h, w)`` per data set index, e.g. ``CocoInstances.original_sizes``.

    Returns:
        A group id per index.
    """
    return [0 if w < h else 1 for h, w in sizes]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches indices so that portrait and landscape images are not mixed.

    mmdetection's ``AspectRatioBatchSampler``: indices are taken in ``sampler`` order and put in
    their group's bucket; a full bucket is yielded as a batch. At the end of the epoch the
    leftovers of both buckets are concatenated (portrait first) and yielded in batches of
    ``batch_size``, so at most one batch per epoch mixes groups, and there are exactly
    ``ceil(len(sampler) / batch_size)`` batches (``floor`` with ``drop_last``).

    Every index the sampler yields appears in exactly one batch. With a
    ``DistributedSampler``-like sampler (a seeded shard of a permutation), each rank batches its
    own shard; :meth:`set_epoch` is forwarded to the sampler.
    """

    def __init__(self, *, sampler: Sampler[int] | Iterable[int], group_ids: Sequence[int],
                 batch_size: int, drop_last: bool = False) -> None:
        """Wraps an index sampler.

        Args:
            sampler: Yields data set indices (e.g. ``DistributedSampler``).
            group_ids: A group id per data set index (:func:`aspect_ratio_groups`).
            batch_size: Images per batch.
            drop_last: Drop the final short batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        """Forwards the epoch to the wrapped sampler (it picks the permutation)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        leftover = [i for group in sorted(buckets) for i in buckets[group]]
        for start in range(0, len(leftover), self.batch_size):
            chunk = leftover[start:start + self.batch_size]
            if len(chunk) == self.batch_size or not self.drop_last:
                yield chunk

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __repr__(self) -> str:
        return (f"GroupedBatchSampler(sampler={self.sampler!r}, batch_size={self.batch_size}, "
                f"drop_last={self.drop_last}, groups={sorted(set(self.group_ids))})")


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` with :meth:`set_epoch` for its batch sampler and data set."""

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch: picks the shuffle and the transforms' random draws."""
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int = 0,
                       seed: int = 0, rank: int = 0, world_size: int = 1,
                       drop_last: bool = False, pin_memory: bool = False) -> EpochDataLoader:
    """A shuffled, aspect-ratio grouped training loader (mmengine DefaultSampler + grouping).

    The permutation is ``torch.randperm(len(dataset))`` seeded with ``seed + epoch``, padded by
    wrapping around to a multiple of ``world_size`` and sharded ``indices[rank::world_size]``, as
    mmengine's ``DefaultSampler`` and torch's ``DistributedSampler`` both do. Call
    ``loader.set_epoch(epoch)`` before each epoch.

    Args:
        dataset: A map-style data set with ``original_sizes`` (e.g. ``CocoInstances``); without
            that attribute every image is put in one group.
        batch_size: Images per batch on this rank.
        num_workers: DataLoader worker processes.
        seed: Shuffle seed (the same on every rank).
        rank: This process's rank.
        world_size: Number of processes.
        drop_last: Drop each epoch's final short batch.
        pin_memory: Pin batches (for asynchronous copies to a GPU).

    Returns:
        An :class:`EpochDataLoader` yielding :class:`Batch`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    sizes = getattr(dataset, "original_sizes", None)
    groups = aspect_ratio_groups(sizes) if sizes is not None else [0] * len(dataset)
    batch_sampler = GroupedBatchSampler(sampler=sampler, group_ids=groups,
                                        batch_size=batch_size, drop_last=drop_last)
    return EpochDataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                           collate_fn=collate, pin_memory=pin_memory)


def build_eval_loader(dataset: Dataset, *, batch_size: int = 1, num_workers: int = 0,
                      rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False) -> DataLoader:
    """An in-order evaluation loader (mmdetection tests with batch size 1).

    With ``world_size > 1`` each rank gets the contiguous-stride shard ``indices[rank::world_size]``
    of the data set, without padding, so every image is evaluated exactly once.

    Args:
        dataset: A map-style data set.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        rank: This process's rank.
        world_size: Number of processes.
        pin_memory: Pin batches.

    Returns:
        A ``DataLoader`` yielding :class:`Batch`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    sampler: Sampler[int] | list[int]
    sampler = (SequentialSampler(dataset) if world_size == 1
               else list(range(rank, len(dataset), world_size)))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
                      drop_last=False)
