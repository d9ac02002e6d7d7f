"""Grid target assignment against mmdetection 3.3's ``_get_targets_single`` golden outputs."""

# N=images, S=grid side, G=S*S cells, M=gt instances, K=positives of a level

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from solo_fast.targets import (
    LevelTargets,
    TargetConfig,
    decoupled_solo_targets,
    downsample_gt_masks,
    solo_targets,
    solov2_targets,
)

FIXTURES = Path(__file__).parent / "fixtures" / "mmdet"
HEADS = ("solo", "decoupled_solo", "solov2")
TARGET_FUNCTIONS = {
    "solo": solo_targets, "decoupled_solo": decoupled_solo_targets, "solov2": solov2_targets}
CASE_NAMES = ("empty_256x256", "single_256x256", "crowded_320x448", "tiny_128x128",
              "border_320x480")


@functools.cache
def _load(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=False)


def _gt_case(name: str) -> dict:
    (case,) = [c for c in _load("targets_gt")["cases"] if c["name"] == name]
    return {"masks": case["masks"], "labels": case["labels"], "boxes": case["bboxes"]}


def _golden(head: str, name: str) -> dict:
    (case,) = [c for c in _load(f"targets_{head}")["cases"] if c["name"] == name]
    return case["outputs"]


def _config(head: str) -> TargetConfig:
    hparams = _load(f"targets_{head}")["head_hparams"]
    return TargetConfig(
        num_grids=tuple(hparams["num_grids"]), scale_ranges=tuple(hparams["scale_ranges"]),
        strides=tuple(hparams["strides"]), pos_scale=hparams["pos_scale"],
        num_classes=hparams["num_classes"], mask_stride=hparams.get("mask_stride", 4))


def _as_mmdet(levels: list[LevelTargets], image: int) -> dict[str, list[torch.Tensor]]:
    """One image's targets in the fixtures' (mmdetection's) per-level representation."""
    out: dict[str, list[torch.Tensor]] = {
        "labels": [], "pos_masks": [], "pos_mask_targets": [], "pos_indexes": [],
        "xy_pos_indexes": []}
    for level in levels:
        mine = level.pos_image == image  # (K,)
        pos_masks = torch.zeros(level.grid_size**2, dtype=torch.bool)  # (G,)
        pos_masks[level.pos_cell[mine]] = True
        out["labels"].append(level.labels[image])
        out["pos_masks"].append(pos_masks)
        out["pos_mask_targets"].append(
            level.gt_masks[level.pos_instance[mine]].to(torch.uint8))  # (K_image, h, w)
        out["pos_indexes"].append(level.pos_cell[mine])
        out["xy_pos_indexes"].append(
            torch.stack([level.pos_row[mine], level.pos_col[mine]], dim=1))  # (K_image, 2)
    return out


def _assert_identical(mine: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    assert mine.dtype == golden.dtype, f"{what}: dtype {mine.dtype} != {golden.dtype}"
    assert mine.shape == golden.shape, f"{what}: shape {tuple(mine.shape)} != {tuple(golden.shape)}"
    assert torch.equal(mine, golden), f"{what}: values differ"


def _assert_matches_golden(head: str, name: str, levels: list[LevelTargets], image: int) -> None:
    golden = _golden(head, name)
    mine = _as_mmdet(levels, image)
    # Decoupled's mask targets are SOLO's (the fixture stores them once, in targets_solo.pt)
    mask_targets = _golden("solo", name) if head == "decoupled_solo" else golden
    for level in range(5):
        _assert_identical(mine["labels"][level], golden["labels"][level], f"{name} L{level} labels")
        _assert_identical(mine["pos_mask_targets"][level], mask_targets["pos_mask_targets"][level],
                          f"{name} L{level} mask targets")
        if head == "decoupled_solo":
            _assert_identical(mine["xy_pos_indexes"][level], golden["xy_pos_indexes"][level],
                              f"{name} L{level} xy_pos_indexes")
        else:
            _assert_identical(mine["pos_masks"][level], golden["pos_masks"][level],
                              f"{name} L{level} pos_masks")
        if head == "solov2":
            _assert_identical(mine["pos_indexes"][level], golden["pos_indexes"][level],
                              f"{name} L{level} pos_indexes")
        else:  # one positive per cell, in ascending cell order
            _assert_identical(mine["pos_indexes"][level],
                              golden["labels"][level].flatten().ne(80).nonzero().squeeze(1),
                              f"{name} L{level} positive cells")


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("head", HEADS)
def test_single_image_matches_mmdet(head: str, name: str) -> None:
    levels = TARGET_FUNCTIONS[head]([_gt_case(name)], config=_config(head))
    _assert_matches_golden(head, name, levels, image=0)
    golden = _golden(head, name)
    for level, targets in zip(range(5), levels):
        # num_pos counts distinct positive cells, also where SOLOv2 keeps duplicate targets
        assert int(targets.num_pos) == int(golden["labels"][level].ne(80).sum())


@pytest.mark.parametrize("head", HEADS)
def test_batch_matches_mmdet_per_image(head: str) -> None:
    """Mixed batches (same canvas): empty and non-empty images, and repeated images."""
    batches = [["single_256x256", "empty_256x256", "single_256x256"],
               ["crowded_320x448", "crowded_320x448"], ["tiny_128x128", "tiny_128x128"],
               ["border_320x480", "border_320x480"]]
    for names in batches:
        levels = TARGET_FUNCTIONS[head]([_gt_case(n) for n in names], config=_config(head))
        for image, name in enumerate(names):
            _assert_matches_golden(head, name, levels, image)


def test_crowded_solov2_keeps_duplicates_and_float32_boundary_cell() -> None:
    levels = solov2_targets([_gt_case("crowded_320x448")], config=_config("solov2"))
    duplicates = sum(int(t.pos_cell.numel() - t.num_pos) for t in levels)
    assert duplicates == 13  # tests/fixtures/mmdet/README.md §4
    # GT 4's mass-centre row 208.0 lands in cell row 25 in float32 (exact arithmetic says 26),
    # so with the 3x3 clamp its level-0 rows are 24..26
    rows = levels[0].pos_row[levels[0].pos_instance == 4]
    assert sorted(set(rows.tolist())) == [24, 25, 26]


def _head_fixture(variant: str) -> dict:
    return torch.load(FIXTURES / f"head_{variant}.pt", weights_only=False)


@pytest.mark.parametrize("variant", ["solo", "decoupled_solo", "decoupled_solo_light", "solov2"])
def test_two_image_head_batch_matches_mmdet(variant: str) -> None:
    """The small-head fixtures' 2-image batch: 4 classes, and the Light scale ranges."""
    fixture = _head_fixture(variant)
    head_cfg = fixture["head_cfg"]
    config = TargetConfig(
        num_grids=tuple(head_cfg["num_grids"]), scale_ranges=tuple(head_cfg["scale_ranges"]),
        strides=tuple(head_cfg["strides"]), pos_scale=head_cfg["pos_scale"],
        num_classes=head_cfg["num_classes"])
    gts = [{"masks": g["masks"], "labels": g["labels"], "boxes": g["bboxes"]}
           for g in fixture["inputs"]["batch_gt_instances"]]
    function = solov2_targets if variant == "solov2" else decoupled_solo_targets
    levels = function(gts, config=config)
    assert sum(int(t.num_pos) for t in levels) == fixture["train"]["num_pos"]
    for image, golden in enumerate(fixture["train"]["targets"]):
        mine = _as_mmdet(levels, image)
        for level in range(5):
            _assert_identical(mine["labels"][level], golden["labels"][level], f"L{level} labels")
            for key in ("pos_masks", "xy_pos_indexes", "pos_indexes"):
                if key in golden:
                    _assert_identical(mine[key][level], golden[key][level], f"L{level} {key}")
            targets = mine["pos_mask_targets"][level]  # (K_image, h, w)
            assert len(targets) == golden["num_pos_mask_targets"][level]
            empty = int((targets.flatten(1).sum(1) == 0).sum())
            assert empty == golden["num_empty_pos_mask_targets"][level]


def _empty_image(height: int, width: int) -> dict:
    return {"masks": torch.zeros(0, height, width, dtype=torch.bool),
            "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


@pytest.mark.parametrize("head", HEADS)
def test_images_without_gt(head: str) -> None:
    levels = TARGET_FUNCTIONS[head]([_empty_image(64, 96)] * 2, config=TargetConfig())
    for targets, grid, factor in zip(levels, (40, 36, 24, 16, 12), (4, 4, 8, 16, 16)):
        if head == "solov2":
            factor = 4
        assert torch.equal(targets.labels, torch.full((2, grid, grid), 80))
        for name in ("pos_image", "pos_cell", "pos_instance"):
            assert getattr(targets, name).shape == (0,)
            assert getattr(targets, name).dtype == torch.int64
        assert targets.gt_masks.shape == (0, 64 // factor, 96 // factor)
        assert targets.gt_masks.dtype == torch.bool
        assert int(targets.num_pos) == 0


def _random_image(generator: torch.Generator, num: int, height: int, width: int) -> dict:
    """Random boxes of all scales with elliptical masks inside them; some share cells."""
    size = torch.exp(torch.empty(num, 2).uniform_(1.5, 5.8, generator=generator))  # (M, 2) h, w
    size = torch.minimum(size, torch.tensor([height - 1.0, width - 1.0]))
    corner = torch.rand(num, 2, generator=generator) * (torch.tensor([height, width]) - size)
    boxes = torch.cat([corner.flip(1), (corner + size).flip(1)], dim=1)  # (M, 4) xyxy
    rows = torch.arange(height)[None, :, None] + 0.5  # (1, H, 1)
    cols = torch.arange(width)[None, None, :] + 0.5  # (1, 1, W)
    centre = corner + size / 2  # (M, 2)
    masks = (((rows - centre[:, 0, None, None]) / (size[:, 0, None, None] / 2)) ** 2
             + ((cols - centre[:, 1, None, None]) / (size[:, 1, None, None] / 2)) ** 2) <= 1
    labels = torch.randint(0, 80, (num,), generator=generator)
    return {"masks": masks, "labels": labels, "boxes": boxes}


def _random_batch(counts: tuple[int, ...]) -> list[dict]:
    generator = torch.Generator().manual_seed(sum(counts))
    return [_random_image(generator, n, 256, 320) for n in counts]


@pytest.mark.parametrize("head", HEADS)
def test_batch_equals_per_image_calls(head: str) -> None:
    images = _random_batch((30, 20))
    images.insert(1, _empty_image(256, 320))
    function = TARGET_FUNCTIONS[head]
    batched = function(images, config=TargetConfig())
    offset = 0
    for image, gt in enumerate(images):
        alone = function([gt], config=TargetConfig())
        for together, single in zip(batched, alone):
            mine = together.pos_image == image  # (K,)
            assert torch.equal(together.labels[image], single.labels[0])
            assert torch.equal(together.pos_cell[mine], single.pos_cell)
            assert torch.equal(together.pos_instance[mine] - offset, single.pos_instance)
            assert torch.equal(together.gt_masks[offset:offset + len(gt["labels"])],
                               single.gt_masks)
        offset += len(gt["labels"])
    assert sum(len(t.pos_cell) for t in batched) > 50  # the random batch does exercise positives


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head", HEADS)
def test_op_count_does_not_grow_with_instances(head: str) -> None:
    """No per-instance Python loop: 4 and 50 instances dispatch the same number of ops."""
    calls = []
    for counts in ((3, 1), (30, 20)):
        images = _random_batch(counts)
        with _CountOps() as counter:
            TARGET_FUNCTIONS[head](images, config=TargetConfig())
        calls.append(counter.calls)
    assert calls[0] == calls[1]


def test_downsample_rule_on_every_2x2_pattern() -> None:
    """OpenCV bilinear 1/s on 0/1 masks: 1 iff >= 2 of the block's central 2x2 pixels are 1."""
    for factor in (2, 4, 8, 16):
        patterns = torch.arange(16)[:, None].bitwise_right_shift(torch.arange(4)) & 1  # (16, 4)
        masks = torch.zeros(16, factor, factor, dtype=torch.bool)
        centre = factor // 2 - 1
        masks[:, centre:centre + 2, centre:centre + 2] = patterns.view(16, 2, 2).bool()
        expected = (patterns.sum(1) >= 2).view(16, 1, 1)
        assert torch.equal(downsample_gt_masks(masks, factor), expected)
        # the other pixels of the block do not matter
        assert torch.equal(downsample_gt_masks(masks | ~_centre_window(factor), factor), expected)


def _centre_window(factor: int) -> torch.Tensor:
    window = torch.zeros(factor, factor, dtype=torch.bool)
    centre = factor // 2 - 1
    window[centre:centre + 2, centre:centre + 2] = True
    return window


def test_config_validation_and_canvas_checks() -> None:
    with pytest.raises(ValueError, match="one entry per level"):
        TargetConfig(num_grids=(40, 36))
    with pytest.raises(TypeError):
        TargetConfig((40, 36, 24, 16, 12))  # keyword-only
    with pytest.raises(ValueError, match="multiple"):
        solo_targets([_empty_image(72, 96)])  # 72 is not a multiple of 16
    with pytest.raises(ValueError, match="batch canvas"):
        solo_targets([_empty_image(64, 64), _empty_image(64, 96)])
