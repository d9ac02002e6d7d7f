"""solo-fast bench: every case of every fused op, every backend against the reference."""

import math
import re

import pytest
import torch

from solo_fast import bench, cli
from solo_fast.bench.cases import CASES, Case, Problem, cases, relative_error

OPS = ["dice_loss", "decoupled_dice_loss", "dynamic_mask_dice_loss", "decoupled_mask_scores",
       "dynamic_mask_scores", "solo_mask_scores", "matrix_nms"]


def test_every_op_has_a_quick_and_a_canonical_case():
    assert sorted(CASES) == sorted(OPS)
    for op in OPS:
        tiers = {case.tier for case in CASES[op]}
        assert {"quick", "canonical"} <= tiers, op
        assert len({case.name for case in CASES[op]}) == len(CASES[op]), op
    assert [case.size for case in cases("dice_loss")] == ["K200_200x272", "K50_100x136"]


@pytest.mark.parametrize("op", OPS)
def test_quick_case_agrees_with_the_reference(op):
    (case,) = cases(op, ("quick",))
    reports = bench.run_case(case, device="cpu", backends=["reference", "cpu"], repeats=1)
    assert [(r.backend, r.failure) for r in reports] == [("reference", ""), ("cpu", "")]
    reference, fused = reports
    assert set(fused.errors) == set(reference.errors) and fused.errors
    assert all(value == 0 for value in reference.errors.values())
    assert fused.max_error < 1e-5, fused.errors
    if case.modes[-1] == "full":  # the gradients are compared too
        assert any(name.startswith("grad ") for name in fused.errors)
    assert all(r.median_ms > 0 for r in reports)


def test_a_wrong_backend_is_caught():
    (case,) = cases("dice_loss", ("quick",))
    made = case.make("cpu")
    # the same inputs with a loss off by one part in a thousand: the error must show it
    skewed = Problem(call=lambda backend: made.call("reference") * (
        1.001 if backend == "cpu" else 1.0), pick=made.pick, leaves=made.leaves)
    broken = Case(op=case.op, size=case.size, tier=case.tier, modes=case.modes,
                  make=lambda device: skewed)
    _, fused = bench.run_case(broken, device="cpu", backends=["reference", "cpu"], repeats=1,
                              memory=False)
    assert fused.errors["loss"] == pytest.approx(1e-3, rel=1e-3)
    assert fused.errors["grad pred"] == pytest.approx(1e-3, rel=1e-3)
    assert math.isnan(fused.peak_mb)


def test_a_backend_that_raises_is_reported_and_the_next_one_runs():
    (case,) = cases("matrix_nms", ("quick",))
    reports = bench.run_case(case, device="cpu", backends=["gpu", "cpu"], repeats=1)
    assert "backend must be one of" in reports[0].failure and reports[0].max_error == math.inf
    assert reports[1].failure == "" and reports[1].max_error == 0


def test_relative_error():
    expected = torch.tensor([2.0, -4.0])
    assert relative_error(torch.tensor([2.0, -3.0]), expected) == 0.25
    assert relative_error(torch.tensor([1.0]), expected) == math.inf
    assert relative_error(torch.tensor([True, True]), torch.tensor([True, False])) == 0.5
    assert relative_error(torch.zeros(0), torch.zeros(0)) == 0.0


def test_cli_runs_every_op_with_small_errors(capsys):
    assert cli.main(["bench", "--repeats", "1", "--max-error", "1e-5"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert re.search(rf"^{op} \S+, (forward|forward \+ backward)$", out, re.MULTILINE), op
    rows = re.findall(r"^cpu +(reference|cpu) +[\d.]+ +[\d.]+x +[\d.]+  (.+)$", out, re.MULTILINE)
    assert [backend for backend, _ in rows] == ["reference", "cpu"] * len(OPS)
    errors = [float(value) for _, text in rows for value in re.findall(r" (\S+e[+-]\d+)", text)]
    assert len(errors) >= 2 * 2 * len(OPS) and max(errors) < 1e-5
    assert "FAILED" not in out


@pytest.mark.parametrize("argv, message", [
    (["--size", "huge"], "argument --size: invalid choice: 'huge'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--repeats", "two"], "argument --repeats: invalid int value: 'two'"),
])
def test_cli_rejects_a_bad_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "repeats must be >= 1, got 0"),
    (["--op", "nms"], "ops must be among dice_loss, decoupled_dice_loss"),
])
def test_cli_rejects_a_bad_value(argv, message, capsys):
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a CUDA device")
def test_cli_names_a_missing_cuda_device(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "device cuda was asked for, but torch sees no CUDA device" in capsys.readouterr().err


def test_info_names_the_build(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compiled ops (solo_fast._C): loaded" in out and "backends on cpu tensors" in out
