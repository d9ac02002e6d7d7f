"""The training loop: schedule, exact resume, atomic checkpoints, the non-finite guard, DDP."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import solo_fast
from solo_fast.engine.train import (
    NonFiniteLossError,
    RunSettings,
    Trainer,
    WeightAverage,
    lr_factor,
)
from tests.engine.toy import toy_loader, toy_model

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CFG = solo_fast.get_preset("solov2-light_r18_fpn_ms-3x_coco").train


def test_lr_factor_is_mmdetections_schedule():
    schedule = dict(iters_per_epoch=100, warmup_iters=500, warmup_ratio=0.001,
                    milestones=(8, 11), gamma=0.1)
    assert lr_factor(0, **schedule) == pytest.approx(0.001)
    assert lr_factor(250, **schedule) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(500, **schedule) == 1.0
    assert lr_factor(799, **schedule) == 1.0  # epoch index 7
    assert lr_factor(800, **schedule) == pytest.approx(0.1)  # epoch index 8: first milestone
    assert lr_factor(1100, **schedule) == pytest.approx(0.01)


def _trainer(work_dir, **settings):
    settings = RunSettings(work_dir=str(work_dir), progress=False, **settings)
    return Trainer(model=toy_model(), train_cfg=TRAIN_CFG, loader=toy_loader(2),
                   settings=settings)


def test_resume_continues_with_the_same_losses(tmp_path):
    uninterrupted = _trainer(tmp_path / "a", epochs=2).fit()
    assert [r["iteration"] for r in uninterrupted] == [1, 2, 3, 4]
    # Killed after iteration 3, inside the second epoch; a new process resumes from latest.pt.
    first = _trainer(tmp_path / "b", epochs=2, max_iters=3).fit()
    assert len(first) == 3 and (tmp_path / "b" / "latest.pt").is_file()
    second = _trainer(tmp_path / "b", epochs=2).fit()
    assert [r["iteration"] for r in second] == [4]
    for a, b in zip(uninterrupted, first + second):
        for name in ("loss_mask", "loss_cls", "lr"):
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (name, a, b)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4]
    assert (tmp_path / "a" / "epoch_1.pt").is_file() and (tmp_path / "a" / "epoch_2.pt").is_file()


def test_epoch_checkpoints_can_be_left_out(tmp_path):
    _trainer(tmp_path, epochs=2, keep_epoch_checkpoints=False).fit()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["latest.pt"]


def test_non_finite_loss_stops_with_its_name_and_keeps_the_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, epochs=2, checkpoint_interval=1)
    trainer.fit()
    saved = (tmp_path / "latest.pt").read_bytes()
    trainer = _trainer(tmp_path, epochs=3)
    healthy = trainer.model.criterion.forward

    def broken(outputs, targets):
        losses = healthy(outputs, targets)
        return {**losses, "loss_cls": losses["loss_cls"] * float("nan")}

    trainer.model.criterion.forward = broken
    with pytest.raises(NonFiniteLossError, match=r"loss_cls is nan at epoch 3, iteration 5"):
        trainer.fit()
    assert (tmp_path / "latest.pt").read_bytes() == saved  # untouched by the failed step
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest.pt")]


def test_two_process_ddp_matches_one_process_with_the_whole_batch(tmp_path):
    single = _trainer(tmp_path / "single", epochs=2)
    single.loader = toy_loader(4)
    single.iters_per_epoch = len(single.loader)
    expected = single.fit()
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", str(ROOT / "tests" / "engine" / "toy.py"),
                          str(tmp_path / "ddp"), str(out)], env=env, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    distributed = json.loads(out.read_text())
    assert len(distributed) == len(expected) == 2
    for a, b in zip(expected, distributed):
        for name in ("loss_mask", "loss_cls"):
            assert a[name] == pytest.approx(b[name], rel=1e-4), (name, a, b)


def _averaged_trainer(work_dir, **settings):
    settings = RunSettings(work_dir=str(work_dir), progress=False, **settings)
    train_cfg = dataclasses.replace(TRAIN_CFG, ema_decay=0.5)
    return Trainer(model=toy_model(), train_cfg=train_cfg, loader=toy_loader(2),
                   settings=settings)


def test_weight_average_follows_its_formula():
    model = torch.nn.BatchNorm1d(3)
    average = WeightAverage(model, decay=0.9)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    for step in range(1, 4):
        with torch.no_grad():
            model.weight.add_(1.0)
            model.running_mean.add_(2.0)
        model.num_batches_tracked += 1
        keep = min(0.9, (1 + step) / (10 + step))  # 0.18, 0.27, 0.33: the early ramp
        for name, value in model.state_dict().items():
            expected[name] = (keep * expected[name] + (1 - keep) * value
                              if value.dtype.is_floating_point else value.clone())
        average.update(model)
    for name, value in average.module.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    assert average.module.num_batches_tracked.item() == 3
    assert not average.module.training and not average.module.weight.requires_grad


def test_resume_restores_the_weight_average(tmp_path):
    uninterrupted = _averaged_trainer(tmp_path / "a", epochs=2)
    uninterrupted.fit()
    _averaged_trainer(tmp_path / "b", epochs=2, max_iters=3).fit()
    resumed = _averaged_trainer(tmp_path / "b", epochs=2)
    resumed.fit()
    assert resumed.average.updates == uninterrupted.average.updates == 4
    averaged = uninterrupted.average.module.state_dict()
    for name, value in resumed.average.module.state_dict().items():
        torch.testing.assert_close(value, averaged[name], rtol=1e-5, atol=1e-7)
    # the average is not the model: the test would pass vacuously if the two were one
    assert any(not torch.equal(value, averaged[name])
               for name, value in uninterrupted.model.state_dict().items()
               if value.dtype.is_floating_point)


def test_resuming_without_an_average_in_the_checkpoint_says_so(tmp_path):
    _trainer(tmp_path, epochs=1).fit()
    with pytest.raises(ValueError, match="has no weight average .* without ema_decay"):
        _averaged_trainer(tmp_path, epochs=2).fit()


def test_ema_decay_must_lie_in_the_open_unit_interval():
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \(0, 1\) or None, got 1.0"):
        solo_fast.get_preset("solov2-light_r18_fpn_ms-3x_coco", ema_decay=1.0)
