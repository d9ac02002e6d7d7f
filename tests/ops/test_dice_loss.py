"""solo_fast.ops.dice_loss: every backend against the PyTorch reference and mmdetection."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from solo_fast.ops import dice_loss
from solo_fast.ops._backend import choose_backend
from solo_fast.ops._extension import has_ops
from tests.ops.helpers import (
    assert_close_scaled,
    dice_loss_reference,
    loss_and_grads,
    make_dice_inputs,
    peak_memory_increase,
    require_backend,
    skip_bfloat16_triton,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmdet" / "dice_loss.pt"
CPU_BACKENDS = ["cpu", "triton"]  # the reference is what they are compared with
SHAPES = [(1, (1,)), (1, (37, 53)), (3, (37, 53)), (7, (1000,)), (5, (17, 23)), (2, (20000,))]


_require = functools.partial(require_backend, "dice_loss")


def _loss_and_grad(backend, pred, target, weights, **kwargs):
    return loss_and_grads(dice_loss, (pred, target), weights, num_grads=1, backend=backend,
                          **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_masks,pixels", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logits", [True, False])
def test_matches_reference(backend, num_masks, pixels, dtype, logits):
    _require(backend)
    pred, target = make_dice_inputs(num_masks, pixels, dtype=dtype, logits=logits, seed=num_masks)
    weights = torch.randn(num_masks, dtype=dtype)
    loss, grad = _loss_and_grad(backend, pred, target, weights, logits=logits)
    ref_loss, ref_grad = _loss_and_grad("reference", pred, target, weights, logits=logits)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert loss.dtype == dtype and loss.shape == (num_masks,)
    assert_close_scaled(loss, ref_loss, rtol)
    assert_close_scaled(grad, ref_grad, rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float32, torch.float64])
def test_target_dtypes(backend, target_dtype):
    _require(backend)
    pred, target = make_dice_inputs(4, (19, 31), target_dtype=target_dtype)
    weights = torch.rand(4)
    loss, grad = _loss_and_grad(backend, pred, target, weights)
    ref_loss, ref_grad = _loss_and_grad("reference", pred, target.bool(), weights)
    assert_close_scaled(loss, ref_loss, 1e-5)
    assert_close_scaled(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_zero_targets_and_perfect_predictions(backend):
    _require(backend)
    pred = torch.full((3, 11, 13), -30.0)  # p ~ 1e-13: almost exactly the all-zero target
    pred[1] = 30.0
    target = torch.zeros(3, 11, 13, dtype=torch.bool)
    target[1] = True
    loss, grad = _loss_and_grad(backend, pred, target, torch.ones(3))
    ref_loss, ref_grad = _loss_and_grad("reference", pred, target, torch.ones(3))
    assert_close_scaled(loss, ref_loss, 1e-5)
    assert loss[0].item() == pytest.approx(1.0) and loss[1].item() < 1e-4
    assert grad.abs().max().item() < 1e-6 and ref_grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 9, 11), (0, 5), (3, 0), (2, 0, 4)])
def test_empty_inputs(backend, shape):
    _require(backend)
    pred = torch.randn(shape, requires_grad=True)
    target = torch.zeros(shape, dtype=torch.bool)
    loss = dice_loss(pred, target, backend=backend)
    expected = dice_loss_reference(pred.detach(), target)
    assert loss.shape == (shape[0],)
    torch.testing.assert_close(loss.detach(), expected)  # no pixels: 1 - 0 / (2 eps) = 1
    loss.sum().backward()
    assert pred.grad.shape == pred.shape and not pred.grad.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(backend, dtype):
    _require(backend)
    skip_bfloat16_triton(backend, dtype)
    pred, target = make_dice_inputs(3, (41, 29), dtype=dtype)
    weights = torch.rand(3)
    loss, grad = _loss_and_grad(backend, pred, target, weights.to(dtype))
    # The reference run in float32 on the same half values: what float32 accumulation must give.
    ref_loss, ref_grad = _loss_and_grad("reference", pred.float(), target, weights)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close_scaled(loss.float(), ref_loss, 1e-2)
    assert_close_scaled(grad.float(), ref_grad, 1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("logits", [True, False])
def test_gradcheck(backend, logits):
    _require(backend)
    pred, target = make_dice_inputs(3, (5, 7), dtype=torch.float64, logits=logits)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: dice_loss(p, target, logits=logits, backend=backend), (pred,))


def test_opcheck_compiled_ops():
    assert has_ops(), "solo_fast._C is not built"
    pred, target = make_dice_inputs(3, (37, 53))
    pred2d = pred.reshape(3, -1).requires_grad_(True)
    target2d = target.reshape(3, -1).view(torch.uint8)
    torch.library.opcheck(torch.ops.solo_fast.dice_loss_forward.default,
                          (pred2d, target2d, True, 1e-3))
    _, sums = torch.ops.solo_fast.dice_loss_forward(pred2d.detach(), target2d, True, 1e-3)
    torch.library.opcheck(torch.ops.solo_fast.dice_loss_backward.default,
                          (torch.rand(3), pred2d.detach(), target2d, sums, True, 1e-3))


def test_opcheck_triton_ops():
    _require("triton")
    pred, target = make_dice_inputs(2, (9, 13), logits=False)
    pred2d = pred.reshape(2, -1).requires_grad_(True)
    target2d = target.reshape(2, -1).float()
    torch.library.opcheck(torch.ops.solo_fast.dice_loss_triton_forward.default,
                          (pred2d, target2d, False, 1e-3))


def _golden_cases():
    return torch.load(FIXTURE, weights_only=False)["cases"]


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("case", _golden_cases(), ids=lambda case: case["name"])
def test_mmdetection_golden(backend, case):
    """mmdetection's DiceLoss(loss_weight=3) values and gradients, logits and decoupled products."""
    _require(backend)
    inputs, outputs = case["inputs"], case["outputs"]
    logits = case["input_kind"] == "logits"
    weights = outputs["grad_weights"]
    if "x_logits" in inputs:  # decoupled: the product of two sigmoids goes in as probabilities
        leaves = [inputs["y_logits"].clone().requires_grad_(True),
                  inputs["x_logits"].clone().requires_grad_(True)]
        pred = leaves[0].sigmoid() * leaves[1].sigmoid()
        names = ["grad_y_logits", "grad_x_logits"]
    else:
        leaves = [inputs["input"].clone().requires_grad_(True)]
        pred = leaves[0]
        names = ["grad_input"]
    loss = 3.0 * dice_loss(pred, inputs["target"], logits=logits, backend=backend)
    assert_close_scaled(loss.detach(), outputs["loss"], 1e-5)
    if loss.numel() == 0:
        return
    for suffix, scale in (("sum", torch.ones_like(weights)), ("weighted", weights)):
        grads = torch.autograd.grad((loss * scale).sum(), leaves, retain_graph=True)
        for name, grad in zip(names, grads):
            assert_close_scaled(grad, outputs[f"{name}_{suffix}"], 1e-5)


def test_fused_backward_allocates_only_the_gradient():
    assert has_ops(), "solo_fast._C is not built"
    pred, target = make_dice_inputs(128, (200, 272))
    pred.requires_grad_(True)
    gradient_bytes = pred.numel() * pred.element_size()

    def fused():
        dice_loss(pred, target, backend="cpu").sum().backward()

    def reference():
        dice_loss(pred, target, backend="reference").sum().backward()

    fused_peak = peak_memory_increase(fused)
    pred.grad = None
    reference_peak = peak_memory_increase(reference)
    # The gradient itself plus a few MB of noise (partial sums, thread stacks, page rounding): any
    # full-size float temporary would double it.
    assert fused_peak <= 1.2 * gradient_bytes, (fused_peak, gradient_bytes)
    assert reference_peak >= 2 * gradient_bytes, (reference_peak, gradient_bytes)


@pytest.mark.parametrize("bad,message", [
    (dict(pred=torch.randn(5)), "must be (N, H, W) or (N, P)"),
    (dict(pred=torch.randn(2, 3, 4, 5), target=torch.ones(2, 3, 4, 5, dtype=torch.bool)),
     "must be (N, H, W) or (N, P)"),
    (dict(target=torch.ones(2, 3, 5, dtype=torch.bool)), "target must have pred's shape"),
    (dict(pred=torch.ones(2, 3, 4, dtype=torch.int32)), "pred must be float16, bfloat16"),
    (dict(target=torch.ones(2, 3, 4, dtype=torch.int64)), "target must be bool, uint8 or floating"),
    (dict(target=torch.ones(2, 3, 4, dtype=torch.bool, device="meta")), "same device"),
    (dict(eps=-1.0), "eps must be a finite number >= 0"),
    (dict(pred=[1.0, 2.0]), "pred must be a torch.Tensor"),
    (dict(backend="gpu"), "backend must be one of reference, cpu, cuda, triton"),
])
def test_bad_input_names_the_argument(bad, message):
    arguments = dict(pred=torch.randn(2, 3, 4), target=torch.ones(2, 3, 4, dtype=torch.bool))
    arguments.update(bad)
    pred, target = arguments.pop("pred"), arguments.pop("target")
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        dice_loss(pred, target, **arguments)


def test_environment_variable_and_fallback(monkeypatch):
    pred, target = make_dice_inputs(2, (5, 5))
    monkeypatch.setenv("SOLO_FAST_BACKEND", "reference")
    assert choose_backend("dice_loss", pred.device) == "reference"
    monkeypatch.setenv("SOLO_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SOLO_FAST_BACKEND must be one of"):
        dice_loss(pred, target)
    monkeypatch.delenv("SOLO_FAST_BACKEND")
    assert choose_backend("dice_loss", pred.device) == "cpu"
    # CUDA kernels cannot take CPU tensors: fall back to the CPU default, and say so once.
    with pytest.warns(RuntimeWarning, match="backend 'cuda' is unavailable on cpu tensors"):
        loss = dice_loss(pred, target, backend="cuda")
    torch.testing.assert_close(loss, dice_loss_reference(pred, target))


def test_traces_under_torch_compile():
    pred, target = make_dice_inputs(3, (9, 11))
    pred.requires_grad_(True)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def loss_fn(p, t):
        return dice_loss(p, t, backend="cpu").sum()

    loss = loss_fn(pred, target)
    (grad,) = torch.autograd.grad(loss, pred)
    ref_loss, ref_grad = _loss_and_grad("reference", pred, target, torch.ones(3))
    assert_close_scaled(loss.detach(), ref_loss.sum(), 1e-5)
    assert_close_scaled(grad, ref_grad, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_masks,pixels", SHAPES + [(0, (9, 11)), (200, (200, 272))])
def test_gpu_matches_reference(backend, dtype, num_masks, pixels):
    _require(backend, "cuda")
    pred, target = make_dice_inputs(num_masks, pixels, dtype=dtype, device="cuda")
    weights = torch.randn(num_masks, dtype=dtype, device="cuda")
    loss, grad = _loss_and_grad(backend, pred, target, weights)
    ref_loss, ref_grad = _loss_and_grad("reference", pred.double(), target, weights.double())
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
    assert_close_scaled(loss.double(), ref_loss, rtol)
    assert_close_scaled(grad.double(), ref_grad, rtol)
