"""pytest-benchmark: whole-model training steps and predictions, fused path against reference path.

Run: ``python -m pytest benchmarks/bench_model.py`` (``-k train`` or ``-k predict`` for one half).
One group per (family, task); ``provider`` is ``fused`` (the default ops: the fused dice, Decoupled
and SOLOv2 mask losses, and the fused post-processing) or ``reference`` (every op on its PyTorch
reference, mmdetection's computation). ``extra_info`` holds the peak resident memory of one step
above what the model and inputs hold, and the step's losses (the two paths must agree to float
rounding; tests/test_losses.py asserts it).

* Training step: forward, losses, backward, at 512 x 512, batch 2, CPU, with 6 instances per image
  of sizes that reach every FPN level.
* Prediction: forward and post-processing of one 800 x 1088 image (COCO's canonical padded size).
  The weights are random, so the head's class scores are pushed up (a bias on the class logits)
  until about 1,000 candidates pass score_thr, as a trained model's do on a busy image, and SOLO's
  and Decoupled SOLO's mask biases are set so that a candidate's mask covers some 15-30 % of the
  map (SOLOv2's dynamic masks already cover some of it).

``PYTHONPATH=. python benchmarks/bench_model.py`` instead alternates fused and reference training
steps of SOLOv2 and Decoupled SOLO and prints the mean paired difference with its standard error:
the loss is a small part of a CPU step, so the difference is only visible paired.
"""

# N=images, M=instances per image, C=classes, H, W=image size

from __future__ import annotations

import pytest
import torch

from solo_fast import build_model
from tests.ops.helpers import peak_memory_mb

TRAIN_PRESETS = {"solo": "solo_r50_fpn_1x_coco",
                 "decoupled_solo": "decoupled-solo_r50_fpn_1x_coco",
                 "decoupled_solo_light": "decoupled-solo-light_r50_fpn_3x_coco",
                 "solov2": "solov2_r50_fpn_1x_coco",
                 "solov2_light": "solov2-light_r18_fpn_ms-3x_coco"}
PROVIDERS = ("fused", "reference")


def make_targets(num_images: int, height: int, width: int, *, num_instances: int = 6,
                 num_classes: int = 80, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Rectangles of side 1/16 to 2/3 of the image, so every FPN level gets positives."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(num_images):
        masks = torch.zeros(num_instances, height, width, dtype=torch.bool)
        boxes = torch.zeros(num_instances, 4)
        for index in range(num_instances):
            fraction = (1 / 16) * (10.6 ** (index / max(1, num_instances - 1)))  # 1/16 .. 2/3
            box_h, box_w = int(height * fraction), int(width * fraction)
            y = int(torch.randint(0, height - box_h + 1, (), generator=generator))
            x = int(torch.randint(0, width - box_w + 1, (), generator=generator))
            masks[index, y:y + box_h, x:x + box_w] = True
            boxes[index] = torch.tensor([x, y, x + box_w, y + box_h], dtype=torch.float32)
        labels = torch.randint(0, num_classes, (num_instances,), generator=generator)
        targets.append({"masks": masks, "labels": labels, "boxes": boxes})
    return targets


def use_path(model, provider: str) -> None:
    """Every op of the model's criterion and post-processing on the fused or reference path."""
    backend = None if provider == "fused" else "reference"
    model.criterion.dice_backend = backend
    if hasattr(model.postprocess, "backend"):
        model.postprocess.backend = backend


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("family", TRAIN_PRESETS)
def test_train_step(benchmark, family, provider):
    benchmark.group = f"train step {family} 2x512x512 (cpu)"
    benchmark.extra_info.update(provider=provider, preset=TRAIN_PRESETS[family])
    torch.manual_seed(0)
    model = build_model(TRAIN_PRESETS[family]).train()
    use_path(model, provider)
    images = torch.randn(2, 3, 512, 512)
    targets = make_targets(2, 512, 512)
    losses = {}

    def step():
        model.zero_grad(set_to_none=True)
        values = model.loss(model(images), targets)
        sum(values.values()).backward()
        losses.update({k: v.item() for k, v in values.items()})

    step()  # warm-up: first-touch of the weights' gradients, allocator growth
    benchmark.extra_info["peak_mb"] = peak_memory_mb(step, "cpu")
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)
    benchmark.extra_info.update(losses)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("family", TRAIN_PRESETS)
def test_predict(benchmark, family, provider):
    benchmark.group = f"predict {family} 1x800x1088 (cpu)"
    benchmark.extra_info.update(provider=provider, preset=TRAIN_PRESETS[family])
    model, images = _predict_model(family, provider)
    counts = {}

    def predict():
        with torch.no_grad():
            (prediction,) = model.predict(model(images), [(800, 1088)], [(800, 1088)])
        counts["kept"] = len(prediction["scores"])

    predict()
    benchmark.extra_info["peak_mb"] = peak_memory_mb(predict, "cpu")
    benchmark.pedantic(predict, rounds=3, warmup_rounds=0)
    benchmark.extra_info.update(counts)


def _predict_model(family: str, provider: str):
    """A random-weight model in eval mode whose class-logit bias is raised until about 1,000
    candidates pass score_thr on ``images`` (as a trained model's do on a busy image), so that
    the timed call is the whole prediction: forward and post-processing."""
    torch.manual_seed(0)
    model = build_model(TRAIN_PRESETS[family]).eval()
    use_path(model, provider)
    images = torch.randn(1, 3, 800, 1088)
    with torch.no_grad():
        outputs = model(images)
        shift = _candidate_shift(outputs.cls_preds, wanted=1000)
        model.head.cls_pred.bias += shift
        _give_masks(model.head, outputs)
    return model, images


# The fraction of a mask map that a random-weight SOLO / Decoupled SOLO candidate covers after
# _give_masks: near-constant logits would give every candidate an empty mask (Decoupled: a
# product of two ~0.5 probabilities) or half the map, and the timed call would skip the NMS and
# the final resize or overload them.
MASK_FRACTION = 0.15


def _give_masks(head, outputs) -> None:
    """Shifts the biases of SOLO's and Decoupled SOLO's mask convolutions, channel by channel,
    so that each candidate's mask covers about MASK_FRACTION of the map (SOLOv2's masks come from
    dynamic kernels and are left as they are)."""
    if hasattr(head, "mask_pred_x"):  # Decoupled: X and Y each above 0.75 on sqrt(fraction)
        pairs = [(head.mask_pred_x, outputs.mask_preds_x), (head.mask_pred_y, outputs.mask_preds_y)]
        quantile, target = 1 - MASK_FRACTION ** 0.5, 1.1  # sigmoid(1.1)^2 = 0.56 > mask_thr
    elif hasattr(head, "mask_pred"):  # SOLO: one channel per cell, sigmoid > mask_thr
        pairs, quantile, target = [(head.mask_pred, outputs.mask_preds)], 1 - MASK_FRACTION, 0.0
    else:
        return
    for convs, levels in pairs:
        for conv, logits in zip(convs, levels):
            per_channel = logits.transpose(0, 1).flatten(1)  # (channels, N * h * w)
            spread = per_channel.std(1).clamp_min(1e-6)
            scale = 2.0 / spread  # logits of unit-ish spread: soft masks with soft edges
            conv.weight *= scale[:, None, None, None]
            conv.bias *= scale
            conv.bias += target - torch.quantile(per_channel * scale[:, None], quantile, dim=1)


def _candidate_shift(cls_preds, *, wanted: int) -> float:
    """The shift of the class logits that lets about ``wanted`` (cell, class) pairs score above
    0.1 after points NMS, found by bisection."""
    from solo_fast.postprocess import prepare_cls_scores

    low, high = -20.0, 20.0
    for _ in range(40):
        shift = (low + high) / 2
        count = sum(int((s > 0.1).sum()) for s in prepare_cls_scores(
            [c + shift for c in cls_preds]))
        low, high = (shift, high) if count < wanted else (low, shift)
    return high


def interleaved_train_steps(families=("solov2", "decoupled_solo"), pairs: int = 15) -> None:
    """Fused and reference training steps of one model, alternating step by step, so that the
    load of a shared machine falls on both alike. Prints per family the mean paired difference
    (reference - fused) with its standard error, and checks the losses agree."""
    import statistics
    import time

    for family in families:
        torch.manual_seed(0)
        model = build_model(TRAIN_PRESETS[family]).train()
        images = torch.randn(2, 3, 512, 512)
        targets = make_targets(2, 512, 512)
        times: dict[str, list[float]] = {"fused": [], "reference": []}
        losses: dict[str, dict[str, float]] = {}
        for round_index in range(pairs + 1):  # round 0 warms up
            for provider in (("fused", "reference") if round_index % 2 else
                             ("reference", "fused")):
                use_path(model, provider)
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                values = model.loss(model(images), targets)
                sum(values.values()).backward()
                elapsed = time.perf_counter() - start
                if round_index:
                    times[provider].append(elapsed)
                losses[provider] = {k: v.item() for k, v in values.items()}
        differences = [r - f for r, f in zip(times["reference"], times["fused"])]
        mean = statistics.mean(differences)
        error = statistics.stdev(differences) / len(differences) ** 0.5
        print(f"{family}: fused {statistics.median(times['fused']):.3f} s, reference "
              f"{statistics.median(times['reference']):.3f} s (medians of {pairs}); reference - "
              f"fused = {mean * 1e3:.0f} +- {error * 1e3:.0f} ms (mean +- standard error); "
              f"losses fused {losses['fused']} reference {losses['reference']}")


if __name__ == "__main__":  # PYTHONPATH=. python benchmarks/bench_model.py
    interleaved_train_steps()
