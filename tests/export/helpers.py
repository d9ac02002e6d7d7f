"""What the export tests share: tiny configs, random head outputs with many candidates, and the
eager reference path's results (``backend="reference"``) with its kept stride-4 soft masks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from solo_fast.builder import build_model
from solo_fast.config import ModelConfig, get_preset
from solo_fast.models.decoupled_solo import DecoupledSOLOOutput
from solo_fast.models.solo import SOLOOutput
from solo_fast.models.solov2 import SOLOv2Output
from solo_fast.postprocess import build_postprocessor, prepare_cls_scores, select_candidates

# N=images, S=grid side, C=classes, K=max_per_img, H4, W4=stride-4 mask map

PRESETS = {"solo": "solo_r50_fpn_1x_coco", "decoupled_solo": "decoupled-solo_r50_fpn_1x_coco",
           "decoupled_solo_light": "decoupled-solo-light_r50_fpn_3x_coco",
           "solov2": "solov2_r50_fpn_1x_coco", "solov2_light": "solov2-light_r18_fpn_ms-3x_coco"}
FAMILIES = list(PRESETS)
GRIDS = (12, 10, 8, 6, 4)  # small grids: a few hundred candidates per image
TINY = {"backbone.depth": 18, "neck.out_channels": 32, "head.in_channels": 32,
        "head.feat_channels": 32, "head.stacked_convs": 2, "head.norm_groups": 8,
        "head.mask_feat_channels": 16, "head.mask_out_channels": 16, "num_classes": 3,
        "num_grids": GRIDS}
MASK_ATOL = 1e-6  # SOLOv2: a GEMM here, a 1x1 convolution on the reference path


def detecting_model(cfg: ModelConfig) -> torch.nn.Module:
    """``cfg``'s model in eval mode with random weights that give detections: class probability
    0.5 everywhere at the start, and mask logits far from 0 (their init std is 0.01: every mask
    would be a coin toss at 0.5)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.nn.init.zeros_(model.head.cls_pred.bias)
    for name, param in model.head.named_parameters():
        if name.startswith("mask_pred") and name.endswith("weight"):
            torch.nn.init.normal_(param, std=1.0)
    return model


def tiny_config(family: str, **overrides: Any) -> ModelConfig:
    """A family's preset with small channels and grids (``family``: a key of PRESETS)."""
    return get_preset(PRESETS[family], **{**TINY, **overrides})


def random_outputs(cfg: ModelConfig, *, canvas: tuple[int, int], batch: int, seed: int,
                   ties: bool = False) -> Any:
    """Raw head outputs of ``cfg``'s family with plenty of candidates of sizeable masks.

    Args:
        ties: Class 1's logits copy class 0's: equal candidates that only order can separate.
    """
    generator = torch.Generator().manual_seed(seed)
    grids, classes = cfg.head.num_grids, cfg.head.num_classes
    height, width = canvas[0] // 4, canvas[1] // 4
    cls = [torch.randn(batch, classes, s, s, generator=generator) - 1.0 for s in grids]
    if ties:
        for logits in cls:
            logits[:, 1] = logits[:, 0]

    def blobs(channels: int, size: tuple[int, int]) -> Tensor:  # smooth maps, big masks
        coarse = torch.randn(batch, channels, 3, 4, generator=generator) * 4
        return F.interpolate(coarse, size=size, mode="bilinear")

    sizes = [(height, width), (height, width), (height // 2, width // 2),
             (height // 4, width // 4), (height // 4, width // 4)]
    family = cfg.head.family
    if family == "solov2":
        channels = cfg.head.mask_out_channels
        kernels = [torch.randn(batch, channels, s, s, generator=generator) for s in grids]
        return SOLOv2Output(kernels, cls, blobs(channels, (height, width)).abs())
    if family == "solo":
        return SOLOOutput([blobs(s * s, size) for s, size in zip(grids, sizes)], cls)
    return DecoupledSOLOOutput([blobs(s, size) for s, size in zip(grids, sizes)],
                               [blobs(s, size) for s, size in zip(grids, sizes)], cls)


def reference(cfg: ModelConfig, raw: Any, image_sizes: list[tuple[int, int]]
              ) -> tuple[list[dict], list[Tensor], list[int], list[dict]]:
    """The eager reference path on ``raw``: (results, the kept instances' stride-4 soft masks per
    image, candidates per image, trace)."""
    processor = build_postprocessor(cfg, backend="reference")
    trace: list[dict] = []
    results = processor(raw, image_sizes, image_sizes, trace=trace)
    candidates = select_candidates(prepare_cls_scores(raw.cls_preds), cfg.head.num_grids,
                                   cfg.test.score_thr)
    soft = processor.candidate_masks(raw, candidates).reference_soft()  # (K_all, H4, W4)
    counts = torch.bincount(candidates.image, minlength=len(image_sizes)).tolist()
    kept = [soft_b[t["candidates"]["passes_area_filter"]][t["nms_output"]["keep_inds"]]
            for soft_b, t in zip(soft.split(counts), trace)]
    return results, kept, counts, trace


def tight_boxes(masks: Tensor, stride: int, image_size: tuple[int, int]) -> Tensor:
    """(K, 4) boxes of bool masks (K, H4, W4) pixel by pixel, times stride, clipped to (h, w)."""
    boxes = torch.zeros(len(masks), 4)
    for k, mask in enumerate(masks):
        ys, xs = mask.nonzero(as_tuple=True)
        if len(ys):
            box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * stride
            boxes[k] = torch.minimum(box, torch.tensor([image_size[1], image_size[0]] * 2))
    return boxes


def assert_matches_reference(detections: Any, cfg: ModelConfig, raw: Any,
                             image_sizes: list[tuple[int, int]]) -> list[dict]:
    """The graph's detections equal the reference path's on ``raw``; returns the trace."""
    results, kept, counts, trace = reference(cfg, raw, image_sizes)
    top = cfg.test.max_per_img
    assert detections.num_candidates.tolist() == counts
    for image, (result, soft) in enumerate(zip(results, kept)):
        num = len(result["labels"])
        assert int(detections.num_dets[image]) == num, f"image {image}"
        assert torch.equal(detections.labels[image, :num], result["labels"]), f"image {image}"
        torch.testing.assert_close(detections.scores[image, :num], result["scores"],
                                   rtol=1e-5, atol=0.0)
        torch.testing.assert_close(detections.masks[image, :num], soft, rtol=0.0,
                                   atol=MASK_ATOL)
        expected_boxes = tight_boxes(soft > cfg.test.mask_thr, 4, image_sizes[image])
        assert torch.equal(detections.boxes[image, :num], expected_boxes), f"image {image}"
        for name in ("scores", "labels", "boxes", "masks"):  # padding rows are zero
            assert not getattr(detections, name)[image, num:top].any(), f"{name} {image}"
    return trace
