"""solo-fast bench: the fused ops: every backend agrees with the reference."""

import pytest

from solo_fast import bench, cli

SMALL = {bench.showcase_dice_loss: dict(num_masks=6),
         bench.showcase_decoupled_dice_loss: dict(num_positives=12, grids=5),
         bench.showcase_dynamic_mask_dice_loss: dict(num_positives=9, channels=7)}


@pytest.mark.parametrize("run", list(SMALL), ids=lambda run: run.__name__)
def test_backends_agree_with_the_reference(run):
    kwargs = SMALL[run]
    reports = run(height=17, width=23, repeats=1, backends=["reference", "cpu"], **kwargs)
    assert [r.backend for r in reports] == ["reference", "cpu"]
    assert reports[0].max_loss_error == 0 and reports[0].max_grad_error == 0
    assert reports[1].max_loss_error < 1e-5 and reports[1].max_grad_error < 1e-5
    assert all(r.forward_backward_ms > 0 for r in reports)


def test_info_names_the_build(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compiled ops (solo_fast._C): loaded" in out and "backends on cpu tensors" in out
