"""Checks and fixture readers shared by the head tests against mmdetection's fixtures
(tests/fixtures/mmdet), and by tests/test_losses.py."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from solo_fast import build_model
from solo_fast.config import get_preset
from solo_fast.postprocess import points_nms
from solo_fast.targets import TargetConfig

# N=images, Q=output channels, h, w=map size, K=positives

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mmdet"
TOL = {"atol": 1e-5, "rtol": 1e-5}  # forward activations: the issue asks 1e-5 relative
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}
LOSS_TOL = {"atol": 0.0, "rtol": 1e-5}
BACKENDS = ["reference", None]  # None: the default, the C++ kernels on CPU tensors


def head_kwargs(fixture: dict) -> dict:
    """The constructor arguments of a SOLO / Decoupled head from a fixture's ``head_cfg``."""
    cfg = fixture["head_cfg"]
    return {"num_classes": cfg["num_classes"], "in_channels": cfg["in_channels"],
            "feat_channels": cfg["feat_channels"], "stacked_convs": cfg["stacked_convs"],
            "num_grids": cfg["num_grids"], "cls_down_index": cfg["cls_down_index"],
            "num_groups": cfg["norm_cfg"]["num_groups"]}


def target_config(fixture: dict) -> TargetConfig:
    cfg = fixture["head_cfg"]
    return TargetConfig(num_grids=tuple(cfg["num_grids"]),
                        scale_ranges=tuple(tuple(r) for r in cfg["scale_ranges"]),
                        strides=tuple(cfg["strides"]), pos_scale=cfg["pos_scale"],
                        num_classes=cfg["num_classes"])


def gt_instances(fixture: dict, *, empty: bool = False) -> list[dict]:
    keep = slice(0, 0) if empty else slice(None)
    return [{"masks": g["masks"][keep], "labels": g["labels"][keep], "boxes": g["bboxes"][keep]}
            for g in fixture["inputs"]["batch_gt_instances"]]


def one_instance_gt(fixture: dict) -> list[dict]:
    """The fixture's batch cut down to the first instance of image 0; image 1 without any."""
    gts = gt_instances(fixture)
    return [{key: value[:1] for key, value in gts[0].items()},
            gt_instances(fixture, empty=True)[1]]


def assert_losses_match_mmdet(criterion, outputs, gts: list[dict], expected: dict) -> dict:
    """The criterion's losses and its per-level dice terms against a fixture's ``train`` entry.

    mmdetection calls the dice loss once per level with positives; each call's per-mask losses
    are compared with the criterion's terms of that level.

    Returns:
        The criterion's ``{"loss_mask", "loss_cls"}``, still in the graph.
    """
    losses = criterion(outputs, gts)
    assert set(losses) == {"loss_mask", "loss_cls"}
    for name in ("loss_mask", "loss_cls"):
        torch.testing.assert_close(losses[name].detach(), expected["loss"][name], **LOSS_TOL)
    levels = criterion.assign(gts)
    assert sum(int(level.num_pos) for level in levels) == expected["num_pos"]
    terms = [t for t in criterion.mask_losses(outputs, levels) if t.shape[0]]  # (K_l,) each
    assert len(terms) == len(expected["dice_calls"])
    for term, call, level in zip(terms, expected["dice_calls"], levels):
        assert (term.shape[0], *level.gt_masks.shape[1:]) == tuple(call["pred_shape"])
        torch.testing.assert_close(term.detach(), call["loss_per_mask"], **LOSS_TOL)
    return losses


def assert_channel_subset(actual: Tensor, encoded: dict, *, atol: float, rtol: float,
                          zero_elsewhere: bool = False, msg: str = "") -> None:
    """``actual`` (N, Q, h, w) against a ``channel_subset`` encoding (fixtures README §0).

    The stored channels are compared value by value; the per-channel sum and sum of squares of
    every channel with the float64 statistics (tolerance scaled by the pixel count). With
    ``zero_elsewhere`` (gradients) every channel not stored must be exactly 0.
    """
    assert tuple(actual.shape) == tuple(encoded["shape"]), msg
    actual = actual.detach()
    for image, (channels, values) in enumerate(zip(encoded["channels"], encoded["values"])):
        torch.testing.assert_close(actual[image, channels], values, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{msg} image {image}: {m}")
        if zero_elsewhere:
            others = torch.ones(actual.shape[1], dtype=torch.bool)
            others[channels] = False
            assert torch.count_nonzero(actual[image, others]) == 0, f"{msg} image {image}"
    pixels = actual.shape[2] * actual.shape[3]
    wide = actual.double()
    torch.testing.assert_close(wide.sum((2, 3)), encoded["channel_sum"], atol=atol * pixels,
                               rtol=rtol, msg=lambda m: f"{msg} channel_sum: {m}")
    torch.testing.assert_close(wide.square().sum((2, 3)), encoded["channel_sq_sum"],
                               atol=atol * pixels, rtol=rtol,
                               msg=lambda m: f"{msg} channel_sq_sum: {m}")


def eval_probabilities(mask_preds: list[Tensor], cls_preds: list[Tensor]):
    """mmdetection's eval-mode forward extras on raw logits: sigmoid, then every mask map resized
    to level 0's size; class sigmoid with points NMS (docs/algorithms.md §5.2 step 3)."""
    size = mask_preds[0].shape[-2:]
    masks = [F.interpolate(m.sigmoid(), size=size, mode="bilinear", align_corners=False)
             for m in mask_preds]
    return masks, [points_nms(c.sigmoid()) for c in cls_preds]


def mmdet_keys(config: str) -> dict[str, tuple[list[int], str]]:
    keys = {}
    for line in (FIXTURES / "state_dict_keys" / f"{config}.txt").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        keys[key] = ([int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype)
    return keys


def assert_keys_match_mmdet(config: str, key_map) -> None:
    """The preset's model (built on the meta device) has exactly mmdetection's keys and shapes."""
    mmdet = mmdet_keys(config)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(get_preset(config))
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()}
    mapped = {key_map(k): k for k in mmdet}
    assert len(mapped) == len(mmdet)
    for key, mmdet_key in mapped.items():
        assert key in ours, f"{mmdet_key} -> {key} is not a key of solo_fast's model"
        assert ours[key] == mmdet[mmdet_key], f"{mmdet_key} -> {key}: {ours[key]}"
    assert set(ours) == set(mapped), f"unmatched solo_fast keys: {set(ours) - set(mapped)}"


def assert_total_gradients(head, feats, losses, expected, key_map, *, atol=1e-6, rtol=1e-4):
    """d(loss_mask + loss_cls) w.r.t. the output layers and the input features, as mmdetection.

    Clears earlier gradients of ``head`` and ``feats`` first, then back-propagates the total.
    """
    head.zero_grad()
    for feat in feats:
        feat.grad = None
    (losses["loss_mask"] + losses["loss_cls"]).backward()
    params = dict(head.named_parameters())
    for mmdet_name, grad in expected["grad_params_total"].items():
        torch.testing.assert_close(params[key_map(mmdet_name)].grad, grad, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{mmdet_name}: {m}")
    for level, (feat, grad) in enumerate(zip(feats, expected["grad_feats_total"])):
        torch.testing.assert_close(feat.grad, grad, atol=atol, rtol=rtol,
                                   msg=lambda m: f"features of level {level}: {m}")
