"""Padding to a multiple of 32, aspect-ratio grouping, and the loader builders."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

from solo_fast.data import (
    Batch,
    CocoInstances,
    GroupedBatchSampler,
    Normalize,
    Sample,
    aspect_ratio_groups,
    build_eval_loader,
    build_eval_transform,
    build_train_loader,
    build_train_transform,
    collate,
    make_shapes,
)

# N=images, M=instances, Hp/Wp=padded canvas


def _sample(h, w, m, image_id):
    image, _ = Normalize()(torch.randint(0, 256, (3, h, w), dtype=torch.uint8), {})
    masks = torch.ones(m, h, w, dtype=torch.bool)
    target = {"masks": masks, "boxes": torch.zeros(m, 4), "labels": torch.arange(m)}
    return Sample(image=image, target=target, image_id=image_id, original_size=(h // 2, w // 2))


def test_collate_pads_to_multiple_of_32_with_zeros():
    samples = [_sample(50, 70, 2, 7), _sample(65, 33, 0, 8), _sample(64, 64, 1, 9)]
    batch = collate(samples)
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.images.shape == (3, 3, 96, 96) and batch.images.dtype == torch.float32
    assert batch.image_sizes == [(50, 70), (65, 33), (64, 64)]
    assert batch.original_sizes == [(25, 35), (32, 16), (32, 32)]
    assert batch.image_ids == [7, 8, 9]
    for n, sample in enumerate(samples):
        h, w = batch.image_sizes[n]
        assert torch.equal(batch.images[n, :, :h, :w], sample.image)
        # every padded pixel is exactly 0 (normalised space), every padded mask pixel False
        padded = torch.ones(96, 96, dtype=torch.bool)
        padded[:h, :w] = False
        assert bool((batch.images[n][:, padded] == 0).all())
        masks = batch.targets[n]["masks"]
        assert masks.shape == (sample.target["masks"].shape[0], 96, 96)
        assert masks.dtype == torch.bool
        assert not bool(masks[:, padded].any())
        assert bool(masks[:, :h, :w].all())
        assert torch.equal(batch.targets[n]["labels"], sample.target["labels"])
    # an exact multiple is not padded further
    assert collate([_sample(64, 32, 1, 0)]).images.shape == (1, 3, 64, 32)
    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images) and moved.image_ids == batch.image_ids
    with pytest.raises(ValueError):
        collate([])


def test_aspect_ratio_groups():
    assert aspect_ratio_groups([(10, 20), (20, 10), (10, 10)]) == [1, 0, 1]


def _check_epoch(batches, expected_indices, groups, batch_size):
    flat = [i for b in batches for i in b]
    assert Counter(flat) == Counter(expected_indices)
    assert all(len(b) <= batch_size for b in batches)
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only the final leftovers may mix orientations
    assert all(len(b) == batch_size for b in batches[:-1] if b not in mixed)


@pytest.mark.parametrize("drop_last", [False, True])
def test_grouped_sampler_covers_each_index_once(drop_last):
    n, batch_size = 37, 4
    groups = [(i * 7) % 3 == 0 for i in range(n)]
    groups = [int(g) for g in groups]
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=5)
    batch_sampler = GroupedBatchSampler(sampler=sampler, group_ids=groups,
                                        batch_size=batch_size, drop_last=drop_last)
    epochs = []
    for epoch in range(3):
        batch_sampler.set_epoch(epoch)
        batches = list(batch_sampler)
        assert len(batches) == len(batch_sampler)
        if not drop_last:
            _check_epoch(batches, range(n), groups, batch_size)
        else:
            assert all(len(b) == batch_size for b in batches)
            assert len(set(i for b in batches for i in b)) == len(batches) * batch_size
        epochs.append(batches)
        batch_sampler.set_epoch(epoch)
        assert list(batch_sampler) == batches  # deterministic given the epoch
    assert epochs[0] != epochs[1]


def test_grouped_sampler_with_distributed_shards():
    n, world, batch_size = 23, 3, 2
    groups = [i % 2 for i in range(n)]
    seen = Counter()
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                     seed=0)
        sampler.set_epoch(4)
        shard = list(sampler)
        batch_sampler = GroupedBatchSampler(sampler=sampler, group_ids=groups,
                                            batch_size=batch_size)
        batch_sampler.set_epoch(4)
        batches = list(batch_sampler)
        _check_epoch(batches, shard, groups, batch_size)
        seen.update(i for b in batches for i in b)
    # the shards cover every index; DistributedSampler pads 23 to 24 by repeating one index
    assert set(seen) == set(range(n)) and sum(seen.values()) == 24


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=5, seed=3)


def test_build_train_loader(shapes):
    dataset = CocoInstances(annotation_file=shapes.train_annotations,
                            image_dir=shapes.train_images, train=True,
                            transform=build_train_transform(scales=((160, 96), (160, 128))))
    loader = build_train_loader(dataset, batch_size=3, seed=1)
    loader.set_epoch(0)
    first = [batch.image_ids for batch in loader]
    assert sorted(i for ids in first for i in ids) == sorted(dataset.image_ids)
    loader.set_epoch(0)
    again = list(loader)
    assert [b.image_ids for b in again] == first
    batch = again[0]
    assert batch.images.shape[0] == len(batch.targets) == len(batch.image_sizes)
    assert batch.images.shape[-1] % 32 == 0 and batch.images.shape[-2] % 32 == 0
    for target in batch.targets:
        assert target["masks"].shape[-2:] == batch.images.shape[-2:]
        assert target["labels"].dtype == torch.int64
        assert target["boxes"].dtype == torch.float32
    loader.set_epoch(1)
    second = list(loader)
    assert [b.image_ids for b in second] != first
    # worker processes give the same batches: transforms are seeded by (seed, epoch, index)
    workers = build_train_loader(dataset, batch_size=3, seed=1, num_workers=2)
    workers.set_epoch(1)
    for a, b in zip(workers, second, strict=True):
        assert a.image_ids == b.image_ids and torch.equal(a.images, b.images)
        assert all(torch.equal(x["masks"], y["masks"]) for x, y in zip(a.targets, b.targets))


def test_build_eval_loader(shapes):
    dataset = CocoInstances(annotation_file=shapes.val_annotations, image_dir=shapes.val_images,
                            train=False, transform=build_eval_transform(scale=(160, 96)))
    loader = build_eval_loader(dataset)
    ids = [batch.image_ids[0] for batch in loader]
    assert ids == dataset.image_ids
    shards = [[b.image_ids[0] for b in build_eval_loader(dataset, rank=r, world_size=2)]
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(dataset.image_ids)
    with pytest.raises(ValueError):
        build_eval_loader(dataset, rank=2, world_size=2)
