"""solo_fast.ops.decoupled_dice_loss: every backend against the PyTorch reference."""

# N=images, S=grid side, K=positives, H, W=mask-map size, P=H*W pixels

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from solo_fast.bench.inputs import make_decoupled_inputs
from solo_fast.ops import decoupled_dice_loss
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import decoupled_dice_loss_reference
from tests.ops.helpers import (
    assert_close_scaled,
    loss_and_grads,
    peak_memory_increase,
    require_backend,
    skip_bfloat16_triton,
)

CPU_BACKENDS = ["cpu", "triton"]  # the reference is what they are compared with
# (N, S, (H, W), K): odd sizes; K = 0, 1 and many positives sharing rows, columns and cells.
SHAPES = [(n, s, hw, k) for n, s, hw, k in itertools.product(
    (1, 2), (3, 5, 12), ((7, 9), (37, 53)), (0, 1, 23))]




_require = functools.partial(require_backend, "decoupled_dice_loss")


def _loss_and_grads(backend, inputs, weights, **kwargs):
    return loss_and_grads(decoupled_dice_loss, inputs, weights, num_grads=2, backend=backend,
                          **kwargs)


def _compare(backend, inputs, *, rtol, dtype=None, seed=0):
    dtype = inputs[0].dtype if dtype is None else dtype
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(inputs[2].shape[0], generator=generator, dtype=dtype)
    loss, grad_x, grad_y = _loss_and_grads(backend, inputs, weights)
    ref_loss, ref_grad_x, ref_grad_y = _loss_and_grads("reference", inputs, weights)
    assert loss.dtype == inputs[0].dtype and loss.shape == inputs[2].shape
    assert_close_scaled(loss, ref_loss, rtol)
    assert_close_scaled(grad_x, ref_grad_x, rtol)
    assert_close_scaled(grad_y, ref_grad_y, rtol)
    # Rows no positive uses get exactly 0, as from the reference's scatter.
    x, _, pos_image, pos_row, pos_col, _ = inputs
    for grad, channel in ((grad_x, pos_col), (grad_y, pos_row)):
        unused = torch.ones(x.shape[:2], dtype=torch.bool)  # (N, S)
        unused[pos_image, channel] = False
        assert not grad[unused].any()
    return loss, grad_x, grad_y


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,grids,size,num_positives", SHAPES,
                         ids=[f"N{n}-S{s}-{h}x{w}-K{k}" for n, s, (h, w), k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, num_images, grids, size, num_positives, dtype):
    _require(backend)
    inputs = make_decoupled_inputs(num_images, grids, size, num_positives, dtype=dtype,
                                   seed=num_images * 100 + grids * 10 + num_positives)
    _compare(backend, inputs, rtol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_positives_on_few_rows(backend):
    """80 positives on 2 x 2 cells: each gradient row sums ~40 terms (and 20 per cell)."""
    _require(backend)
    inputs = make_decoupled_inputs(2, 5, (19, 23), 80, num_blocks=1, seed=7)
    inputs[3].clamp_(0, 1)
    inputs[4].clamp_(2, 3)
    _compare(backend, inputs, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float32, torch.float64])
def test_target_dtypes(backend, target_dtype):
    _require(backend)
    inputs = make_decoupled_inputs(2, 5, (19, 31), 9, target_dtype=target_dtype, seed=3)
    weights = torch.rand(9)
    loss, grad_x, grad_y = _loss_and_grads(backend, inputs, weights)
    bool_inputs = (*inputs[:5], inputs[5].bool())
    ref_loss, ref_grad_x, ref_grad_y = _loss_and_grads("reference", bool_inputs, weights)
    assert_close_scaled(loss, ref_loss, 1e-5)
    assert_close_scaled(grad_x, ref_grad_x, 1e-5)
    assert_close_scaled(grad_y, ref_grad_y, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_zero_targets_and_saturated_logits(backend):
    _require(backend)
    x, y, pos_image, pos_row, pos_col, _ = make_decoupled_inputs(1, 4, (11, 13), 3)
    pos_row[:] = torch.tensor([0, 1, 2])
    pos_col[:] = torch.tensor([0, 1, 2])
    x[0, 0], y[0, 0] = -30.0, -30.0  # p ~ 1e-26: almost exactly the all-zero target
    x[0, 1], y[0, 1] = 30.0, 30.0  # p ~ 1: a perfect prediction of the full target
    target = torch.zeros(3, 11, 13, dtype=torch.bool)
    target[1] = True
    inputs = (x, y, pos_image, pos_row, pos_col, target)
    weights = torch.ones(3)
    loss, grad_x, grad_y = _loss_and_grads(backend, inputs, weights)
    ref_loss, ref_grad_x, ref_grad_y = _loss_and_grads("reference", inputs, weights)
    assert_close_scaled(loss, ref_loss, 1e-5)
    assert loss[0].item() == pytest.approx(1.0) and loss[1].item() < 1e-4
    # Saturated rows: torch's p (1 - p) rounds to 0 where the kernels' e / (1 + e)^2 keeps ~1e-13.
    for grad, ref_grad in ((grad_x, ref_grad_x), (grad_y, ref_grad_y)):
        assert grad[0, :2].abs().max().item() < 1e-6 and ref_grad[0, :2].abs().max() < 1e-6
        assert_close_scaled(grad[0, 2:], ref_grad[0, 2:], 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,grids,size,num_positives",
                         [(2, 3, (9, 11), 0), (2, 3, (0, 5), 4), (1, 2, (3, 0), 0)])
def test_empty_inputs(backend, num_images, grids, size, num_positives):
    _require(backend)
    inputs = make_decoupled_inputs(num_images, grids, size, num_positives)
    loss, grad_x, grad_y = _loss_and_grads(backend, inputs, torch.ones(num_positives))
    expected = decoupled_dice_loss_reference(*inputs)
    assert loss.shape == (num_positives,)
    torch.testing.assert_close(loss, expected)  # no pixels: 1 - 0 / (2 eps) = 1
    assert grad_x.shape == inputs[0].shape and not grad_x.any()
    assert grad_y.shape == inputs[1].shape and not grad_y.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(backend, dtype):
    _require(backend)
    skip_bfloat16_triton(backend, dtype)
    inputs = make_decoupled_inputs(2, 5, (21, 29), 12, dtype=dtype, seed=5)
    weights = torch.rand(12)
    loss, grad_x, grad_y = _loss_and_grads(backend, inputs, weights.to(dtype))
    # The reference run in float32 on the same half values: what float32 accumulation must give.
    float_inputs = (inputs[0].float(), inputs[1].float(), *inputs[2:])
    ref_loss, ref_grad_x, ref_grad_y = _loss_and_grads("reference", float_inputs, weights)
    assert loss.dtype == dtype and grad_x.dtype == dtype and grad_y.dtype == dtype
    assert_close_scaled(loss.float(), ref_loss, 1e-2)
    assert_close_scaled(grad_x.float(), ref_grad_x, 1e-2)
    assert_close_scaled(grad_y.float(), ref_grad_y, 1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    _require(backend)
    x, y, *rest = make_decoupled_inputs(2, 3, (4, 5), 7, dtype=torch.float64, seed=11)
    x.requires_grad_(True)
    y.requires_grad_(True)
    # The interpreter takes ~50 ms a call: random projections of the Jacobian, not every column.
    assert torch.autograd.gradcheck(
        lambda a, b: decoupled_dice_loss(a, b, *rest, backend=backend), (x, y),
        fast_mode=backend == "triton")


def test_triton_chunks_and_tiles():
    """Several programs per positive and row, several tiles per program, ragged last tiles."""
    _require("triton")
    from solo_fast.kernels import decoupled_dice_loss as kernels

    x, y, pos_image, pos_row, pos_col, target = make_decoupled_inputs(2, 3, (13, 29), 9, seed=2)
    x3d, y3d = x.reshape(2, 3, -1), y.reshape(2, 3, -1)  # (N, S, P)
    target2d = target.reshape(9, -1).view(torch.uint8)  # (K, P)
    args = (x3d, y3d, pos_image, pos_row, pos_col, target2d)
    loss, sums = kernels.decoupled_dice_loss_forward(*args, 1e-3, block=32, pixels_per_chunk=96)
    expected = decoupled_dice_loss_reference(x, y, pos_image, pos_row, pos_col, target)
    assert_close_scaled(loss, expected, 1e-5)
    grad_loss = torch.rand(9)
    grads = kernels.decoupled_dice_loss_backward(grad_loss, *args, sums, 1e-3, block=32,
                                                 pixels_per_chunk=64)
    expected_grads = torch.ops.solo_fast.decoupled_dice_loss_backward(grad_loss, *args, sums,
                                                                      1e-3)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close_scaled(grad, expected_grad, 1e-5)


def test_cpu_result_does_not_depend_on_the_thread_count():
    _require("cpu")
    inputs = make_decoupled_inputs(2, 12, (37, 53), 40, seed=9)
    weights = torch.randn(40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _loss_and_grads("cpu", inputs, weights)
    finally:
        torch.set_num_threads(threads)
    several = _loss_and_grads("cpu", inputs, weights)
    for a, b in zip(single, several):
        assert torch.equal(a, b)


def test_opcheck_compiled_ops():
    assert has_ops(), "solo_fast._C is not built"
    x, y, pos_image, pos_row, pos_col, target = make_decoupled_inputs(2, 5, (9, 13), 11)
    x3d = x.reshape(2, 5, -1).requires_grad_(True)  # (N, S, P)
    y3d = y.reshape(2, 5, -1).requires_grad_(True)  # (N, S, P)
    target2d = target.reshape(11, -1).view(torch.uint8)  # (K, P)
    args = (x3d, y3d, pos_image, pos_row, pos_col, target2d, 1e-3)
    torch.library.opcheck(torch.ops.solo_fast.decoupled_dice_loss_forward.default, args)
    _, sums = torch.ops.solo_fast.decoupled_dice_loss_forward(
        x3d.detach(), y3d.detach(), pos_image, pos_row, pos_col, target2d, 1e-3)
    torch.library.opcheck(torch.ops.solo_fast.decoupled_dice_loss_backward.default,
                          (torch.rand(11), x3d.detach(), y3d.detach(), pos_image, pos_row,
                           pos_col, target2d, sums, 1e-3))


def test_opcheck_triton_ops():
    _require("triton")
    x, y, pos_image, pos_row, pos_col, target = make_decoupled_inputs(1, 3, (5, 7), 4)
    x3d = x.reshape(1, 3, -1).requires_grad_(True)  # (N, S, P)
    y3d = y.reshape(1, 3, -1).requires_grad_(True)  # (N, S, P)
    target2d = target.reshape(4, -1).float()  # (K, P)
    args = (x3d, y3d, pos_image, pos_row, pos_col, target2d, 1e-3)
    torch.library.opcheck(torch.ops.solo_fast.decoupled_dice_loss_triton_forward.default, args)
    _, sums = torch.ops.solo_fast.decoupled_dice_loss_triton_forward(
        x3d.detach(), y3d.detach(), pos_image, pos_row, pos_col, target2d, 1e-3)
    torch.library.opcheck(torch.ops.solo_fast.decoupled_dice_loss_triton_backward.default,
                          (torch.rand(4), x3d.detach(), y3d.detach(), pos_image, pos_row,
                           pos_col, target2d, sums, 1e-3))


def test_fused_backward_allocates_only_the_gradients():
    assert has_ops(), "solo_fast._C is not built"
    # Decoupled SOLO's level 0 at the canonical size (docs/algorithms.md §12.9): S = 40, 200 x 272,
    # K = 200. Its (K, H, W) floats (43.5 MB) lie above glibc's largest mmap threshold (32 MiB):
    # freeing them does not raise the threshold, which would let the allocations of later memory
    # tests (test_dice_loss's 27.8 MB) come from resident heap pages and escape their measurement.
    x, y, *rest = make_decoupled_inputs(1, 40, (200, 272), 200, num_blocks=25)
    x.requires_grad_(True)
    y.requires_grad_(True)
    gradient_bytes = 2 * x.numel() * x.element_size()
    product_bytes = rest[-1].numel() * x.element_size()  # one (K, H, W) float tensor

    def fused():
        decoupled_dice_loss(x, y, *rest, backend="cpu").sum().backward()

    def reference():
        decoupled_dice_loss(x, y, *rest, backend="reference").sum().backward()

    fused()  # first-call costs (thread pool, dispatcher caches) are not the op's
    x.grad = y.grad = None
    fused_peak = peak_memory_increase(fused)
    x.grad = y.grad = None
    reference_peak = peak_memory_increase(reference)
    # The two gradients plus a few MB of noise (partial sums, task buffers, page rounding): a
    # single (K, H, W) float temporary would add 43.5 MB.
    assert fused_peak >= 0.9 * gradient_bytes, (fused_peak, gradient_bytes)  # measures anything
    assert fused_peak <= gradient_bytes + 4 * 2**20, (fused_peak, gradient_bytes)
    assert reference_peak >= 3 * product_bytes, (reference_peak, product_bytes)


def _bad_arguments():
    x, y, pos_image, pos_row, pos_col, target = make_decoupled_inputs(2, 3, (4, 5), 3)
    return dict(x_logits=x, y_logits=y, pos_image=pos_image, pos_row=pos_row, pos_col=pos_col,
                target=target)


@pytest.mark.parametrize("bad,message", [
    (dict(x_logits=torch.randn(3, 4, 5)), "x_logits must be (N, S, H, W)"),
    (dict(y_logits=torch.randn(2, 3, 4, 6)), "y_logits must have x_logits' shape"),
    (dict(y_logits=torch.randn(2, 3, 4, 5, dtype=torch.float64)),
     "y_logits must have x_logits' dtype"),
    (dict(x_logits=torch.ones(2, 3, 4, 5, dtype=torch.int32)), "x_logits must be float16"),
    (dict(pos_image=torch.zeros(3, 1, dtype=torch.int64)), "pos_image must be 1-D"),
    (dict(pos_row=torch.zeros(2, dtype=torch.int64)), "pos_row must have shape (K,) = (3,)"),
    (dict(pos_col=torch.zeros(3, dtype=torch.int32)), "pos_col must be int64"),
    (dict(pos_image=torch.tensor([0, 2, 1])), "pos_image must lie in [0, N) = [0, 2)"),
    (dict(pos_row=torch.tensor([0, -1, 1])), "pos_row must lie in [0, S) = [0, 3)"),
    (dict(pos_col=torch.tensor([3, 0, 1])), "pos_col must lie in [0, S) = [0, 3)"),
    (dict(target=torch.ones(3, 4, 6, dtype=torch.bool)), "target must have shape (K, H, W)"),
    (dict(target=torch.ones(2, 4, 5, dtype=torch.bool)), "target must have shape (K, H, W)"),
    (dict(target=torch.ones(3, 4, 5, dtype=torch.int64)), "target must be bool, uint8 or floating"),
    (dict(target=torch.ones(3, 4, 5, dtype=torch.bool, device="meta")),
     "target is on meta but x_logits is on cpu"),
    (dict(pos_row=torch.zeros(3, dtype=torch.int64, device="meta")),
     "pos_row is on meta but x_logits is on cpu"),
    (dict(y_logits=torch.randn(2, 3, 4, 5, device="meta")),
     "y_logits is on meta but x_logits is on cpu"),
    (dict(eps=-1.0), "eps must be a finite number >= 0"),
    (dict(x_logits=[1.0, 2.0]), "x_logits must be a torch.Tensor"),
    (dict(backend="gpu"), "backend must be one of reference, cpu, cuda, triton"),
])
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_bad_input_names_the_argument(bad, message, backend):
    arguments = _bad_arguments()
    arguments["backend"] = backend
    arguments.update(bad)
    tensors = [arguments.pop(name) for name in
               ("x_logits", "y_logits", "pos_image", "pos_row", "pos_col", "target")]
    escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises((TypeError, ValueError), match=escaped):
        decoupled_dice_loss(*tensors, **arguments)


@pytest.mark.parametrize("op", ["decoupled_dice_loss_forward",
                                "decoupled_dice_loss_triton_forward"])
def test_the_kernels_check_index_ranges_themselves(op):
    """Called directly (not through the public function), no op reads out of bounds."""
    if op == "decoupled_dice_loss_triton_forward":
        _require("triton")
    x, y, pos_image, pos_row, pos_col, target = make_decoupled_inputs(2, 3, (4, 5), 3)
    pos_col = torch.tensor([0, 1, 3])
    with pytest.raises((RuntimeError, ValueError), match="pos_col"):
        getattr(torch.ops.solo_fast, op)(x.reshape(2, 3, -1), y.reshape(2, 3, -1), pos_image,
                                         pos_row, pos_col, target.reshape(3, -1).view(torch.uint8),
                                         1e-3)


def test_traces_under_torch_compile():
    inputs = make_decoupled_inputs(2, 5, (9, 11), 7)
    x, y, *rest = (t.clone() for t in inputs)
    x.requires_grad_(True)
    y.requires_grad_(True)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def loss_fn(a, b, pos_image, pos_row, pos_col, target):
        return decoupled_dice_loss(a, b, pos_image, pos_row, pos_col, target,
                                   backend="cpu").sum()

    loss = loss_fn(x, y, *rest)
    grad_x, grad_y = torch.autograd.grad(loss, (x, y))
    ref_loss, ref_grad_x, ref_grad_y = _loss_and_grads("reference", inputs, torch.ones(7))
    assert_close_scaled(loss.detach(), ref_loss.sum(), 1e-5)
    assert_close_scaled(grad_x, ref_grad_x, 1e-5)
    assert_close_scaled(grad_y, ref_grad_y, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_images,grids,size,num_positives",
                         SHAPES + [(1, 40, (200, 272), 200), (2, 36, (200, 272), 150)])
def test_gpu_matches_reference(backend, dtype, num_images, grids, size, num_positives):
    _require(backend, "cuda")
    inputs = make_decoupled_inputs(num_images, grids, size, num_positives, dtype=dtype,
                                   device="cuda", seed=num_positives)
    weights = torch.randn(num_positives, dtype=dtype, device="cuda")
    loss, grad_x, grad_y = _loss_and_grads(backend, inputs, weights)
    double_inputs = (inputs[0].double(), inputs[1].double(), *inputs[2:])
    ref_loss, ref_grad_x, ref_grad_y = _loss_and_grads("reference", double_inputs,
                                                       weights.double())
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
    assert_close_scaled(loss.double(), ref_loss, rtol)
    assert_close_scaled(grad_x.double(), ref_grad_x, rtol)
    assert_close_scaled(grad_y.double(), ref_grad_y, rtol)
    # Deterministic: a second run gives the same bits.
    again = _loss_and_grads(backend, inputs, weights)
    for a, b in zip((loss, grad_x, grad_y), again):
        assert torch.equal(a, b)
