"""solo-fast demo end to end at a toy size: data, training, evaluation, overlays, resume."""

import json

from solo_fast import cli
from solo_fast.demo import DemoSettings, run_demo


def test_demo_runs_the_whole_loop_and_resumes(tmp_path, capsys):
    settings = DemoSettings(work_dir=tmp_path, num_train=4, num_val=2, num_overlays=2, workers=0,
                            overrides={"epochs": 1, "lr_steps": (1,)})
    summary = run_demo(settings)
    assert summary["iterations"] == 2  # 4 images, batch 2, one epoch
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert set(json.loads((tmp_path / "metrics.json").read_text())) >= {"segm/AP", "bbox/AP"}
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["000001.png",
                                                                         "000002.png"]
    assert (tmp_path / "train" / "latest.pt").is_file()
    assert "mask AP" in capsys.readouterr().out

    again = run_demo(settings)  # the finished run is reused, not repeated
    assert again["iterations"] is None
    assert again["metrics"] == summary["metrics"]


def test_demo_command_reports_bad_overrides(tmp_path, capsys):
    code = cli.main(["demo", "--work-dir", str(tmp_path), "--set", "no_such_field=1"])
    assert code == 2
    assert "no_such_field" in capsys.readouterr().err
