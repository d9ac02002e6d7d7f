"""Checkpoints hold only tensors and plain containers and load with ``weights_only=True``: a file
someone hands solo_fast cannot run code at any of the places it loads one (train's resume,
eval's and predict's ``--checkpoint``); the random state round-trips exactly."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import solo_fast
from solo_fast import cli
from solo_fast.engine.checkpoint import (
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_atomically,
)
from solo_fast.engine.train import RunSettings, Trainer
from tests.engine.toy import toy_loader, toy_model

TRAIN_CFG = solo_fast.get_preset("solov2-light_r18_fpn_ms-3x_coco").train



class _Planted:
    """A pickle that, once unpickled, writes the file named by the environment variable
    SOLO_FAST_PLANTED: the proof that code ran."""

    def __reduce__(self):
        return (os.system, ('touch "$SOLO_FAST_PLANTED"',))


def _plant(path, monkeypatch, tmp_path):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SOLO_FAST_PLANTED", str(marker))
    torch.save({"model": _Planted()}, path)  # an ordinary pickle: torch.save does not check
    return marker


def _draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_random_state_round_trips_through_a_weights_only_file(tmp_path):
    np.random.randn(1)  # a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    save_atomically(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt"))
    assert _draws() == expected


def test_a_trainer_checkpoint_loads_weights_only(tmp_path):
    # a work_dir given as a Path (as the demo gives it) is written as its string
    settings = RunSettings(work_dir=tmp_path, progress=False, max_iters=1)
    Trainer(model=toy_model(), train_cfg=TRAIN_CFG, loader=toy_loader(2), settings=settings).fit()
    state = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert state["iteration"] == 1 and "rng" in state and "optimizer" in state
    assert state["settings"]["work_dir"] == str(tmp_path)


def test_resume_refuses_a_planted_pickle(tmp_path, monkeypatch):
    marker = _plant(tmp_path / "latest.pt", monkeypatch, tmp_path)
    settings = RunSettings(work_dir=str(tmp_path), progress=False, max_iters=1)
    trainer = Trainer(model=toy_model(), train_cfg=TRAIN_CFG, loader=toy_loader(2),
                      settings=settings)
    with pytest.raises(ValueError, match="latest.pt.* holds objects other than tensors"):
        trainer.fit()
    assert not marker.exists()


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_predict_and_eval_refuse_a_planted_pickle(command, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "model.pt"
    marker = _plant(checkpoint, monkeypatch, tmp_path)
    image = tmp_path / "image.png"
    image.write_bytes(b"")
    arguments = ([str(image), "--output", str(tmp_path / "out.json")] if command == "predict"
                 else ["--annotations", str(tmp_path / "a.json"), "--images", str(tmp_path)])
    code = cli.main([command, "--checkpoint", str(checkpoint), *arguments])
    assert code == 2 and not marker.exists()
    error = capsys.readouterr().err
    assert f"solo-fast {command}: error: checkpoint" in error
    assert "holds objects other than tensors and plain containers" in error


@pytest.mark.parametrize("content", [b"", b"not a torch file", None])
def test_unreadable_checkpoints_name_the_file(content, tmp_path):
    path = tmp_path / "broken.pt"
    if content is None:  # a real checkpoint cut in half
        torch.save({"weights": torch.arange(10_000.0)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.pt.* is not a readable torch file"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
