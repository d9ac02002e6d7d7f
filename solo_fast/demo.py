"""``solo-fast demo``: the whole loop on the embedded synthetic data set, no download.

1. Writes the shapes COCO data set (:func:`solo_fast.data.make_shapes`) in its easier variant,
   :data:`DEMO_SHAPES`.
2. Trains a preset on its training split (Light SOLOv2 R18 by default) with the settings of
   :data:`DEMO_OVERRIDES`: the backbone trained from scratch (there are no pretrained weights
   without a download, so nothing is frozen and BatchNorm learns), one small training scale,
   quarter-width neck and head, AdamW, bf16 mixed precision on CPU.
3. Evaluates COCO mask and box AP on the held-out split (streaming RLE evaluation), at twice
   the training scale.
4. Writes overlay pictures of held-out images and a summary (``summary.json``).

Every step reuses what is on disk: a finished data set is not rewritten, and training resumes from
``work_dir/train/latest.pt`` (a finished run is not repeated), so an interrupted demo continues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_OVERRIDES", "DEMO_SHAPES", "DemoSettings", "run_demo"]

# Shapes images are 192-320 px a side; the demo trains at 256 x 192, which made a step
# 0.73x as long as at 320 x 256 and, in the same 15 minutes, gave mask AP 0.342 against 0.282
# (more steps beat resolution here; benchmarks/NOTES.md, "The CPU demo"). The neck and head are
# a quarter of the preset's width (64 channels): at 128 the category and kernel towers, which run
# on all 3,872 grid cells of an image, cost more than the backbone; at 64 a step takes ~0.7x as
# long and the model learned faster per step as well (mask AP 0.208 against 0.173 after 600
# steps).
DEMO_OVERRIDES: dict[str, Any] = {
    "frozen_stages": -1,  # no pretrained weights: every stage learns
    "norm_eval": False,  # ... and BatchNorm learns its statistics
    "train_scales": ((256, 192),),
    # Tested at twice the training scale: the stride-4 masks get twice the resolution. The same
    # weights gave mask AP 0.420 at 256 x 192, 0.476 at 320 x 256, 0.501 at 448 x 336 and 0.513
    # here (APs 0.24 -> 0.42); evaluation takes seconds either way.
    "test_scale": (512, 384),
    "out_channels": 64,
    "in_channels": 64,
    "feat_channels": 64,
    "mask_feat_channels": 64,
    "mask_out_channels": 64,
    # From scratch on a small set AdamW learns far faster than the presets' SGD: mask AP 0.19
    # after 900 steps where SGD (lr 0.02) was at 0.001 after 600; lr 5e-4 beat 1e-3, 2e-3 and
    # 3e-3 (benchmarks/NOTES.md, "The CPU demo").
    "optimizer": "adamw",
    "lr": 5e-4,
    "weight_decay": 0.05,
    "warmup_iters": 100,
    "epochs": 36,
    "lr_steps": (32,),
}


# The demo's data set (make_shapes arguments): flat objects in class colours on the usual textured
# backgrounds, at most 4 per image, 20 px and up. The default textured set, where only the outline
# tells the class, is far harder: trained from scratch on 2 CPU cores it stayed at mask AP 0.003
# after 300 steps.
DEMO_SHAPES: dict[str, Any] = {
    "object_style": "flat",
    "class_colours": True,
    "max_objects": 4,
    "min_object_size": 20.0,
    "max_object_fraction": 0.7,
}


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What the demo trains and where it writes.

    Attributes:
        work_dir: Everything goes here: ``shapes/`` (the data set), ``train/`` (checkpoints,
            logs), ``overlays/``, ``results.json``, ``metrics.json``, ``summary.json``.
        preset: Any buildable preset (a family is one option away).
        overrides: Config overrides applied on top of :data:`DEMO_OVERRIDES`.
        num_train, num_val: Synthetic images per split.
        batch_size: Images per step.
        workers: Data-loading processes.
        device: ``"cpu"`` or ``"cuda"``; None: CUDA when a GPU is visible.
        amp: Mixed precision (bf16 on CPU, where it makes a step 1.8x faster; fp16 on CUDA).
        num_overlays: Held-out images drawn with their predictions.
        seed: Data set, initialisation and shuffling seed.
    """

    work_dir: Path = Path("solo_fast_demo")
    preset: str = "solov2-light_r18_fpn_ms-3x_coco"
    overrides: dict[str, Any] = field(default_factory=dict)
    num_train: int = 200
    num_val: int = 50
    batch_size: int = 2
    workers: int = 1
    device: str | None = None
    amp: bool = True
    num_overlays: int = 8
    seed: int = 0


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Runs the four steps and prints what it did; returns the summary it writes.

    Returns:
        ``{"preset", "overrides", "train_seconds", "eval_seconds", "iterations", "final_loss",
        "metrics", "overlays", "work_dir"}``.
    """
    from solo_fast.data import (
        CocoInstances,
        build_eval_loader,
        build_eval_transform,
        load_image,
        make_shapes,
    )
    from solo_fast.engine.checkpoint import write_json_atomically
    from solo_fast.engine.evaluate import CocoEvaluator, evaluate_model
    from solo_fast.engine.predict import predict_images
    from solo_fast.engine.train import RunSettings, train_on_coco
    from solo_fast.engine.visualize import save_overlay

    work_dir = Path(settings.work_dir)
    overrides = {**DEMO_OVERRIDES, **settings.overrides}
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"solo-fast demo: {settings.preset} on synthetic shapes, {device}, "
          f"{torch.get_num_threads()} threads; everything goes to {work_dir}/")

    started = time.perf_counter()
    shapes = make_shapes(work_dir / "shapes", num_train=settings.num_train,
                         num_val=settings.num_val, seed=settings.seed, **DEMO_SHAPES)
    print(f"[1/4] data: {settings.num_train} training and {settings.num_val} held-out images "
          f"in {shapes.root} ({time.perf_counter() - started:.0f} s)")

    started = time.perf_counter()
    run_settings = RunSettings(work_dir=work_dir / "train", device=device, amp=settings.amp,
                               checkpoint_interval=200, keep_epoch_checkpoints=False,
                               log_interval=50)
    print("[2/4] training (resumes from train/latest.pt when present)")
    model, records = train_on_coco(
        preset=settings.preset, overrides=overrides,
        annotation_file=str(shapes.train_annotations), image_dir=str(shapes.train_images),
        settings=run_settings, batch_size=settings.batch_size, num_workers=settings.workers,
        seed=settings.seed)
    train_seconds = time.perf_counter() - started
    last = records[-1] if records else {}

    started = time.perf_counter()
    test_scale = tuple(overrides["test_scale"])
    dataset = CocoInstances(annotation_file=str(shapes.val_annotations),
                            image_dir=str(shapes.val_images), train=False,
                            transform=build_eval_transform(scale=test_scale))
    evaluator = CocoEvaluator(coco_gt=dataset.coco,
                              label_to_category_id=dataset.label_to_category_id,
                              output_file=work_dir / "results.json")
    loader = build_eval_loader(dataset, batch_size=settings.batch_size,
                               num_workers=settings.workers)
    print(f"[3/4] COCO evaluation on the {len(dataset)} held-out images")
    metrics = evaluate_model(model, loader, evaluator, device=device)
    write_json_atomically(metrics, work_dir / "metrics.json")
    eval_seconds = time.perf_counter() - started

    names = list(dataset.category_names)
    files = sorted(Path(shapes.val_images).iterdir())[:settings.num_overlays]
    overlays = []
    for path, prediction in predict_images(model, files, test_scale=test_scale, device=device,
                                           batch_size=settings.batch_size, category_names=names):
        overlays.append(str(save_overlay(work_dir / "overlays" / f"{path.stem}.png",
                                         load_image(path), prediction, names)))
    print(f"[4/4] {len(overlays)} overlays in {work_dir / 'overlays'}")

    summary = {"preset": settings.preset, "overrides": {k: _jsonable(v)
                                                         for k, v in overrides.items()},
               "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
               "iterations": last.get("iteration"), "final_loss": last.get("loss"),
               "metrics": metrics, "overlays": overlays, "work_dir": str(work_dir)}
    write_json_atomically(summary, work_dir / "summary.json")
    print(f"\nmask AP {metrics['segm/AP']:.3f} (AP50 {metrics['segm/AP50']:.3f}), box AP "
          f"{metrics['bbox/AP']:.3f} on the held-out split; training {train_seconds / 60:.1f} "
          f"min, evaluation {eval_seconds:.0f} s. Summary: {work_dir / 'summary.json'}")
    return summary


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
