"""``solo_fast.deploy`` where torch cannot be imported: a subprocess whose import system refuses
torch, torchvision and triton imports the package, predicts through a fake session and through
onnxruntime on the fake export, and its results are compared with the torch path here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from solo_fast.deploy import OnnxPredictor
from tests.deploy.fake_model import METADATA, FakeSession, write_fake_model
from tests.deploy.test_predictor import assert_same, make_images, torch_path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "triton"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let torch through")

    import numpy as np
    import solo_fast
    from solo_fast.deploy import OnnxPredictor
    from tests.deploy.fake_model import FakeSession

    data = np.load(sys.argv[1])
    images = [data[f"image{n}"] for n in range(int(data["count"]))]
    saved = {}
    for name, model in (("fake", FakeSession()), ("onnx", sys.argv[2])):
        for n, result in enumerate(OnnxPredictor(model)(images)):
            for key, value in result.items():
                saved[f"{name}_{n}_{key}"] = value
    np.savez(sys.argv[3], **saved)
    try:
        solo_fast.build_model
    except ImportError:
        print("build_model needs torch")
    print("modules:", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton")))
""")


def test_deploy_runs_without_torch(tmp_path):
    images = make_images([(150, 211), (97, 60)], seed=3)
    np.savez(tmp_path / "images.npz", count=len(images),
             **{f"image{n}": image for n, image in enumerate(images)})
    model = write_fake_model(tmp_path / "fake.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "images.npz"),
                           str(model), str(tmp_path / "results.npz")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "build_model needs torch" in done.stdout  # the blocker did block torch
    assert "modules: []" in done.stdout
    saved = np.load(tmp_path / "results.npz")
    keys = ("masks", "labels", "scores", "boxes")
    for name, expected in (("onnx", torch_path(model, images, tuple(METADATA["test_scale"]))),
                           ("fake", OnnxPredictor(FakeSession())(images))):
        results = [{key: saved[f"{name}_{n}_{key}"] for key in keys} for n in range(2)]
        assert_same(results, expected)
