"""The op contracts (solo_fast/ops/_checks.py) and the check_index switch of the ops."""

from __future__ import annotations

import pytest
import torch

from solo_fast.ops import (
    MaskScores,
    decoupled_dice_loss,
    decoupled_mask_scores,
    dynamic_mask_dice_loss,
    dynamic_mask_scores,
    has_ops,
    solo_mask_scores,
)
from solo_fast.ops._checks import FLOATING, INDEX, MASK, Arg, Contract
from tests.ops.test_decoupled_dice_loss import make_decoupled_inputs
from tests.ops.test_decoupled_mask_scores import make_decoupled_score_inputs
from tests.ops.test_dynamic_mask_dice_loss import make_dynamic_inputs as make_dynamic_loss_inputs
from tests.ops.test_dynamic_mask_scores import make_dynamic_inputs as make_dynamic_score_inputs
from tests.ops.test_solo_mask_scores import make_solo_score_inputs

_CONTRACT = Contract("toy", (
    Arg("maps", "N C H W", FLOATING),
    Arg("other", like="maps", dtypes=("maps",)),
    Arg("image", "K", INDEX, below="N"),
    Arg("channel", "K", INDEX, below="C"),
    Arg("target", "K H W", MASK),
    Arg("weights", "K 3", ("floating",), optional=True),
))


def _good(**change):
    tensors = {"maps": torch.zeros(2, 3, 4, 5), "other": torch.zeros(2, 3, 4, 5),
               "image": torch.tensor([0, 1]), "channel": torch.tensor([2, 0]),
               "target": torch.zeros(2, 4, 5, dtype=torch.bool), "weights": None}
    tensors.update(change)
    return tensors


def test_check_returns_the_letters_sizes():
    assert _CONTRACT.check(**_good()) == {"N": 2, "C": 3, "H": 4, "W": 5, "K": 2}
    assert _CONTRACT.check(**_good(weights=torch.ones(2, 3)))["K"] == 2


@pytest.mark.parametrize("change,error,message", [
    ({"maps": [0.0]}, TypeError, "toy: maps must be a torch.Tensor, got list"),
    ({"maps": torch.zeros(2, 3, 4)}, ValueError,
     "toy: maps must be (N, C, H, W), got shape (2, 3, 4) (3-D)"),
    ({"maps": torch.zeros(2, 3, 4, 5, dtype=torch.int32)}, TypeError,
     "toy: maps must be float16, bfloat16, float32 or float64, got torch.int32"),
    ({"other": torch.zeros(2, 3, 4, 6)}, ValueError,
     "toy: other must have maps' shape (2, 3, 4, 5), got (2, 3, 4, 6)"),
    ({"other": torch.zeros(2, 3, 4, 5, dtype=torch.float64)}, TypeError,
     "toy: other must have maps' dtype torch.float32, got torch.float64"),
    ({"image": torch.zeros(2, 1, dtype=torch.int64)}, ValueError,
     "toy: image must be 1-D (K,), got shape (2, 1)"),
    ({"channel": torch.zeros(3, dtype=torch.int64)}, ValueError,
     "toy: channel must have shape (K,) = (2,), got (3,)"),
    ({"channel": torch.zeros(2, dtype=torch.int32)}, TypeError,
     "toy: channel must be int64, got torch.int32"),
    ({"target": torch.zeros(2, 4, 6, dtype=torch.bool)}, ValueError,
     "toy: target must have shape (K, H, W) = (2, 4, 5), got (2, 4, 6)"),
    ({"target": torch.zeros(2, 4, 5, dtype=torch.int64)}, TypeError,
     "toy: target must be bool, uint8 or floating, got torch.int64"),
    ({"weights": torch.ones(2, 4)}, ValueError,
     "toy: weights must have shape (K, 3) = (2, 3), got (2, 4)"),
    ({"target": torch.zeros(2, 4, 5, dtype=torch.bool, device="meta")}, ValueError,
     "toy: target is on meta but maps is on cpu; all must be on the same device"),
])
def test_check_names_the_argument_what_was_given_and_what_was_expected(change, error, message):
    with pytest.raises(error) as raised:
        _CONTRACT.check(**_good(**change))
    assert str(raised.value) == message


def test_partially_known_letters_are_named():
    contract = Contract("toy", (Arg("kernels", "K E", FLOATING), Arg("feats", "N E H W")))
    with pytest.raises(ValueError, match=r"^toy: feats must be \(N, E, H, W\) with E = 3, got "
                                         r"shape \(2, 4, 5, 6\)$"):
        contract.check(kernels=torch.zeros(7, 3), feats=torch.zeros(2, 4, 5, 6))


def test_plain_shapes_leave_the_letters_out():
    contract = Contract("toy", (Arg("masks", "N H W"), Arg("labels", "N", note=", one per mask")),
                        spell_letters=False)
    with pytest.raises(ValueError, match=r"^toy: masks must be 3-D \(N, H, W\), got shape "
                                         r"\(3, 16\)$"):
        contract.check(masks=torch.zeros(3, 16), labels=torch.zeros(3))
    with pytest.raises(ValueError, match=r"^toy: labels must have shape \(3,\), one per mask, "
                                         r"got \(2,\)$"):
        contract.check(masks=torch.zeros(3, 4, 4), labels=torch.zeros(2))


def test_alternative_ranks():
    contract = Contract("toy", (Arg("pred", "N H W|N P"),))
    assert contract.check(pred=torch.zeros(2, 5)) == {"N": 2, "P": 5}
    assert contract.check(pred=torch.zeros(2, 4, 5)) == {"N": 2, "H": 4, "W": 5}
    with pytest.raises(ValueError, match=r"must be \(N, H, W\) or \(N, P\), got shape \(5,\)"):
        contract.check(pred=torch.zeros(5))


@pytest.mark.parametrize("change,message", [
    ({"image": torch.tensor([0, 2])},
     "toy: image must lie in [0, N) = [0, 2), got values in [0, 2]"),
    ({"channel": torch.tensor([-1, 2])},
     "toy: channel must lie in [0, C) = [0, 3), got values in [-1, 2]"),
])
def test_check_ranges_names_the_index_and_its_values(change, message):
    tensors = _good(**change)
    sizes = _CONTRACT.check(**tensors)
    with pytest.raises(ValueError) as raised:
        _CONTRACT.check_ranges(sizes, **tensors)
    assert str(raised.value) == message


def test_check_ranges_reads_all_indices_in_one_copy(monkeypatch):
    tensors = _good()
    sizes = _CONTRACT.check(**tensors)
    copies = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: copies.append(self) or
                        original(self))
    _CONTRACT.check_ranges(sizes, **tensors)
    assert len(copies) == 1 and copies[0].shape == (4,)  # min, max of image and of channel
    copies.clear()
    _CONTRACT.check_ranges(sizes, **_good(image=torch.zeros(0, dtype=torch.int64),
                                          channel=torch.zeros(0, dtype=torch.int64)))
    assert copies == []  # nothing to read


# ----------------------------------------------------------------------------------------------
# check_index on the ops: False skips the range check and changes nothing else.

def _backends():
    return ["reference"] + (["cpu"] if has_ops() else [])


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("backend", _backends())
def test_check_index_false_gives_the_same_results(backend):
    inputs = make_decoupled_inputs(2, 3, (4, 5), 6)
    _same(decoupled_dice_loss(*inputs, backend=backend, check_index=False)[None],
          decoupled_dice_loss(*inputs, backend=backend)[None])
    inputs = make_dynamic_loss_inputs(2, 3, (4, 5), 6)
    _same(dynamic_mask_dice_loss(*inputs, backend=backend, check_index=False)[None],
          dynamic_mask_dice_loss(*inputs, backend=backend)[None])
    inputs = make_decoupled_score_inputs(2, 3, (4, 5), 6)
    _same(decoupled_mask_scores(*inputs, threshold=0.5, backend=backend, check_index=False),
          decoupled_mask_scores(*inputs, threshold=0.5, backend=backend))
    inputs = make_dynamic_score_inputs(2, 3, (4, 5), 6)
    _same(dynamic_mask_scores(*inputs, threshold=0.5, backend=backend, pack_masks=True,
                              check_index=False),
          dynamic_mask_scores(*inputs, threshold=0.5, backend=backend, pack_masks=True))
    inputs = make_solo_score_inputs(2, 3, (4, 5), 6)
    _same(solo_mask_scores(*inputs, size=(6, 7), threshold=0.5, backend=backend,
                           check_index=False),
          solo_mask_scores(*inputs, size=(6, 7), threshold=0.5, backend=backend))


def test_check_index_false_skips_the_range_check():
    """The reference reads the indices with torch indexing: torch's own error, not the op's."""
    x, y, image, row, col = make_decoupled_score_inputs(2, 3, (4, 5), 3)
    bad = torch.tensor([0, 1, 7])
    with pytest.raises(ValueError, match="image must lie in"):
        decoupled_mask_scores(x, y, bad, row, col, threshold=0.5, backend="reference")
    with pytest.raises(IndexError):
        decoupled_mask_scores(x, y, bad, row, col, threshold=0.5, backend="reference",
                              check_index=False)


@pytest.mark.parametrize("backend", _backends())
def test_scoring_ops_return_mask_scores(backend):
    inputs = make_solo_score_inputs(2, 3, (4, 5), 3)
    result = solo_mask_scores(*inputs, size=(6, 7), threshold=0.5, backend=backend)
    assert isinstance(result, MaskScores) and result.packed is None
    result = decoupled_mask_scores(*make_decoupled_score_inputs(2, 3, (4, 5), 3), threshold=0.5,
                                   backend=backend)
    assert isinstance(result, MaskScores) and result.packed is None
    inputs = make_dynamic_score_inputs(2, 3, (4, 5), 3)
    result = dynamic_mask_scores(*inputs, threshold=0.5, backend=backend)
    assert isinstance(result, MaskScores) and result.packed is None
    result = dynamic_mask_scores(*inputs, threshold=0.5, backend=backend, pack_masks=True)
    assert isinstance(result, MaskScores) and result.packed.shape == (3, 1)


@pytest.mark.parametrize("op", ["decoupled_mask_scores", "decoupled_mask_scores_triton"])
def test_the_ops_check_ranges_with_the_public_message_and_skip_on_request(op):
    """Called through torch.ops: a ValueError naming the index (csrc/op_checks.h for the compiled
    op, the op contract for the Triton one); check_index=False gives the same scores."""
    if op == "decoupled_mask_scores" and not has_ops():
        pytest.fail("solo_fast._C is not built")
    call = getattr(torch.ops.solo_fast, op)
    x, y, image, row, col = make_decoupled_score_inputs(2, 3, (4, 5), 3)
    x, y = x.reshape(2, 3, -1), y.reshape(2, 3, -1)
    with pytest.raises(ValueError, match=r"row must lie in \[0, C\) = \[0, 3\), got values in "
                                         r"\[0, 3\]"):
        call(x, y, image, row.clone().fill_(3).index_fill_(0, torch.tensor([0]), 0), col, 0.5)
    _same(call(x, y, image, row, col, 0.5, False), call(x, y, image, row, col, 0.5))
