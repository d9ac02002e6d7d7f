"""solo_fast.ops.dynamic_mask_dice_loss: every backend against the PyTorch reference."""

# N=images, E=mask-feature channels, K=positives, H, W=mask-map size, P=H*W pixels

from __future__ import annotations

import functools

import pytest
import torch

from solo_fast.bench.inputs import make_dynamic_dice_inputs as make_dynamic_inputs
from solo_fast.ops import dynamic_mask_dice_loss
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import dynamic_mask_dice_loss_reference
from tests.ops.helpers import (
    assert_close_scaled,
    loss_and_grads,
    peak_memory_increase,
    require_backend,
    skip_bfloat16_triton,
)

TRITON = "triton"
CPU_BACKENDS = ["cpu", TRITON]  # the reference is what they are compared with
# (N, E, (H, W), K): odd sizes; K = 0, 1 and many positives, unordered, with duplicates.
SHAPES = [(1, 7, (13, 17), 0), (1, 7, (13, 17), 1), (3, 7, (13, 17), 11), (2, 16, (23, 29), 40),
          (4, 5, (9, 11), 6)]




_require = functools.partial(require_backend, "dynamic_mask_dice_loss")


def _loss_and_grads(backend, inputs, weights, **kwargs):
    return loss_and_grads(dynamic_mask_dice_loss, inputs, weights, num_grads=2, backend=backend,
                          **kwargs)


def _compare(backend, inputs, *, rtol, seed=0):
    dtype = inputs[0].dtype
    weights = torch.randn(inputs[2].shape[0], generator=torch.Generator().manual_seed(seed),
                          dtype=dtype)
    loss, grad_kernels, grad_feats = _loss_and_grads(backend, inputs, weights)
    ref_loss, ref_grad_kernels, ref_grad_feats = _loss_and_grads("reference", inputs, weights)
    assert loss.dtype == dtype and loss.shape == inputs[2].shape
    assert_close_scaled(loss, ref_loss, rtol)
    assert_close_scaled(grad_kernels, ref_grad_kernels, rtol)
    assert_close_scaled(grad_feats, ref_grad_feats, rtol)
    # Images without a positive get exactly 0.
    unused = torch.ones(inputs[1].shape[0], dtype=torch.bool)
    unused[inputs[2]] = False
    assert not grad_feats[unused].any()


def test_reference_matches_the_direct_formula():
    kernels, feats, pos_image, target = make_dynamic_inputs(3, 7, (13, 17), 11,
                                                            dtype=torch.float64)
    logits = torch.einsum("ke,kehw->khw", kernels, feats[pos_image])  # (K, H, W)
    p = logits.sigmoid().flatten(1)  # (K, P)
    t = target.flatten(1).double()  # (K, P)
    eps = 1e-3
    expected = 1 - 2 * (p * t).sum(1) / (((p * p).sum(1) + eps) + ((t * t).sum(1) + eps))
    actual = dynamic_mask_dice_loss_reference(kernels, feats, pos_image, target, eps=eps)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    # docs/algorithms.md §9.1's worked example, with logits that give p = (0.9, 0.2, 0.7, 0.1).
    probs = torch.tensor([0.9, 0.2, 0.7, 0.1], dtype=torch.float64)
    example_feats = torch.logit(probs).reshape(1, 1, 1, 4)  # (N, E, H, W)
    example = dynamic_mask_dice_loss_reference(
        torch.ones(1, 1, dtype=torch.float64), example_feats, torch.zeros(1, dtype=torch.int64),
        torch.tensor([[[1, 0, 1, 0]]], dtype=torch.bool))
    assert example.item() == pytest.approx(0.045346, abs=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,channels,size,num_positives", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, num_images, channels, size, num_positives, dtype):
    _require(backend)
    inputs = make_dynamic_inputs(num_images, channels, size, num_positives, dtype=dtype,
                                 seed=num_positives)
    _compare(backend, inputs, rtol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_several_tiles_and_spans(backend):
    """More pixels than one task's span (8 tiles of 512), ragged last tile, every image used."""
    _require(backend)
    inputs = make_dynamic_inputs(2, 9, (61, 71), 13, seed=4, empty_image=False)
    _compare(backend, inputs, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float32, torch.float64])
def test_target_dtypes(backend, target_dtype):
    _require(backend)
    inputs = make_dynamic_inputs(3, 6, (11, 19), 9, target_dtype=target_dtype, seed=3)
    weights = torch.rand(9)
    actual = _loss_and_grads(backend, inputs, weights)
    expected = _loss_and_grads("reference", (*inputs[:3], inputs[3].bool()), weights)
    for a, b in zip(actual, expected):
        assert_close_scaled(a, b, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_zero_targets_and_saturated_logits(backend):
    _require(backend)
    kernels, feats, _, _ = make_dynamic_inputs(1, 4, (11, 13), 3)
    pos_image = torch.zeros(3, dtype=torch.int64)
    feats = feats.abs() + 1
    kernels = torch.tensor([[-10.0] * 4, [10.0] * 4, [0.1, -0.2, 0.3, 0.05]])
    target = torch.zeros(3, 11, 13, dtype=torch.bool)
    target[1] = True
    inputs = (kernels, feats, pos_image, target)
    loss, grad_kernels, grad_feats = _loss_and_grads(backend, inputs, torch.ones(3))
    ref_loss, ref_grad_kernels, _ = _loss_and_grads("reference", inputs, torch.ones(3))
    assert_close_scaled(loss, ref_loss, 1e-5)
    # p ~ 0 against the all-zero target, p ~ 1 against the full target.
    assert loss[0].item() == pytest.approx(1.0) and loss[1].item() < 1e-4
    assert grad_kernels[:2].abs().max().item() < 1e-6
    assert_close_scaled(grad_kernels[2], ref_grad_kernels[2], 1e-5)
    assert torch.isfinite(grad_feats).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,channels,size,num_positives",
                         [(2, 3, (9, 11), 0), (2, 3, (0, 5), 4), (1, 0, (3, 4), 2)])
def test_empty_inputs(backend, num_images, channels, size, num_positives):
    _require(backend)
    inputs = make_dynamic_inputs(num_images, channels, size, num_positives)
    loss, grad_kernels, grad_feats = _loss_and_grads(backend, inputs, torch.ones(num_positives))
    ref_loss, ref_grad_kernels, ref_grad_feats = _loss_and_grads("reference", inputs,
                                                                 torch.ones(num_positives))
    assert loss.shape == (num_positives,)
    torch.testing.assert_close(loss, ref_loss)
    assert grad_kernels.shape == inputs[0].shape and grad_feats.shape == inputs[1].shape
    assert_close_scaled(grad_kernels, ref_grad_kernels, 1e-5)
    assert_close_scaled(grad_feats, ref_grad_feats, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(backend, dtype):
    _require(backend)
    skip_bfloat16_triton(backend, dtype)
    inputs = make_dynamic_inputs(2, 8, (13, 15), 7, dtype=dtype, seed=5)
    weights = torch.rand(7)
    actual = _loss_and_grads(backend, inputs, weights.to(dtype))
    # The reference run in float32 on the same half values: what float32 accumulation must give.
    float_inputs = (inputs[0].float(), inputs[1].float(), *inputs[2:])
    expected = _loss_and_grads("reference", float_inputs, weights)
    for a, b in zip(actual, expected):
        assert a.dtype == dtype
        assert_close_scaled(a.float(), b, 1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    _require(backend)
    kernels, feats, pos_image, target = make_dynamic_inputs(3, 3, (4, 5), 6, dtype=torch.float64,
                                                            seed=11)
    kernels.requires_grad_(True)
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: dynamic_mask_dice_loss(a, b, pos_image, target, backend=backend),
        (kernels, feats), fast_mode=backend == "triton")


def test_cpu_result_does_not_depend_on_the_thread_count():
    _require("cpu")
    inputs = make_dynamic_inputs(3, 16, (61, 71), 30, seed=9)
    weights = torch.randn(30)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _loss_and_grads("cpu", inputs, weights)
    finally:
        torch.set_num_threads(threads)
    several = _loss_and_grads("cpu", inputs, weights)
    for a, b in zip(single, several):
        assert torch.equal(a, b)


def _op_args(inputs, target_dtype):
    kernels, feats, pos_image, target = inputs
    n, e, h, w = feats.shape
    feats3d = feats.reshape(n, e, h * w)  # (N, E, P)
    target2d = target.reshape(target.shape[0], h * w).to(target_dtype)  # (K, P)
    return kernels, feats3d, pos_image, target2d


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    _require(backend)
    name = "dynamic_mask_dice_loss" + ("_triton" if backend == "triton" else "")
    forward = getattr(torch.ops.solo_fast, name + "_forward").default
    backward = getattr(torch.ops.solo_fast, name + "_backward").default
    kernels, feats3d, pos_image, target2d = _op_args(make_dynamic_inputs(2, 5, (5, 7), 4),
                                                     torch.uint8 if backend == "cpu"
                                                     else torch.float32)
    args = (kernels.requires_grad_(True), feats3d.requires_grad_(True), pos_image, target2d, 1e-3)
    torch.library.opcheck(forward, args)
    _, sums = forward(kernels.detach(), feats3d.detach(), pos_image, target2d, 1e-3)
    torch.library.opcheck(backward, (torch.rand(4), kernels.detach(), feats3d.detach(),
                                     pos_image, target2d, sums, 1e-3))


def test_fused_backward_allocates_only_the_gradients():
    assert has_ops(), "solo_fast._C is not built"
    # Half the canonical size (docs/algorithms.md §12.9: E = 256, 200 x 272, K = 200) in K and E,
    # to stay fast.
    kernels, feats, pos_image, target = make_dynamic_inputs(1, 128, (200, 272), 100)
    kernels.requires_grad_(True)
    feats.requires_grad_(True)
    gradient_bytes = feats.numel() * feats.element_size()  # 27.9 MB; grad_kernels is 51 KB
    logit_bytes = target.numel() * 4  # one (K, H, W) float tensor, 21.8 MB

    def fused():
        dynamic_mask_dice_loss(kernels, feats, pos_image, target, backend="cpu").sum().backward()

    def reference():
        dynamic_mask_dice_loss(kernels, feats, pos_image, target,
                               backend="reference").sum().backward()

    fused()  # first-call costs (thread pool, dispatcher caches) are not the op's
    kernels.grad = feats.grad = None
    fused_peak = peak_memory_increase(fused)
    kernels.grad = feats.grad = None
    reference_peak = peak_memory_increase(reference)
    # The gradient plus a few MB (per-span partials of grad_kernels, tile buffers, page rounding):
    # a single (K, H, W) logit tensor would add 21.8 MB.
    assert fused_peak >= 0.9 * gradient_bytes, (fused_peak, gradient_bytes)  # measures anything
    assert fused_peak <= gradient_bytes + 4 * 2**20, (fused_peak, gradient_bytes)
    assert reference_peak >= gradient_bytes + 2 * logit_bytes, (reference_peak, logit_bytes)


def _bad_arguments():
    kernels, feats, pos_image, target = make_dynamic_inputs(2, 3, (4, 5), 3)
    return dict(kernels=kernels, mask_feats=feats, pos_image=pos_image, target=target)


@pytest.mark.parametrize("bad,message", [
    (dict(kernels=torch.randn(3, 3, 1)), "kernels must be (K, E)"),
    (dict(kernels=torch.ones(3, 3, dtype=torch.int32)), "kernels must be float16"),
    (dict(mask_feats=torch.randn(2, 3, 20)), "mask_feats must be (N, E, H, W) with E = 3"),
    (dict(mask_feats=torch.randn(2, 4, 4, 5)), "mask_feats must be (N, E, H, W) with E = 3"),
    (dict(mask_feats=torch.randn(2, 3, 4, 5, dtype=torch.float64)),
     "mask_feats must have kernels' dtype"),
    (dict(pos_image=torch.zeros(3, 1, dtype=torch.int64)), "pos_image must have shape (K,)"),
    (dict(pos_image=torch.zeros(2, dtype=torch.int64)), "pos_image must have shape (K,) = (3,)"),
    (dict(pos_image=torch.zeros(3, dtype=torch.int32)), "pos_image must be int64"),
    (dict(pos_image=torch.tensor([0, 2, 1])), "pos_image must lie in [0, N) = [0, 2)"),
    (dict(pos_image=torch.tensor([0, -1, 1])), "pos_image must lie in [0, N) = [0, 2)"),
    (dict(target=torch.ones(3, 4, 6, dtype=torch.bool)), "target must have shape (K, H, W)"),
    (dict(target=torch.ones(2, 4, 5, dtype=torch.bool)), "target must have shape (K, H, W)"),
    (dict(target=torch.ones(3, 4, 5, dtype=torch.int64)), "target must be bool, uint8 or floating"),
    (dict(target=torch.ones(3, 4, 5, dtype=torch.bool, device="meta")),
     "target is on meta but kernels is on cpu"),
    (dict(mask_feats=torch.randn(2, 3, 4, 5, device="meta")),
     "mask_feats is on meta but kernels is on cpu"),
    (dict(eps=float("nan")), "eps must be a finite number >= 0"),
    (dict(kernels=[1.0, 2.0]), "kernels must be a torch.Tensor"),
    (dict(backend="gpu"), "backend must be one of reference, cpu, cuda, triton"),
])
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_bad_input_names_the_argument(bad, message, backend):
    arguments = _bad_arguments()
    arguments["backend"] = backend
    arguments.update(bad)
    tensors = [arguments.pop(name) for name in ("kernels", "mask_feats", "pos_image", "target")]
    escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises((TypeError, ValueError), match=escaped):
        dynamic_mask_dice_loss(*tensors, **arguments)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_kernels_check_index_ranges_themselves(backend):
    """Called directly (not through the public function), no op reads out of bounds."""
    _require(backend)
    name = "dynamic_mask_dice_loss" + ("_triton" if backend == "triton" else "") + "_forward"
    kernels, feats3d, _, target2d = _op_args(make_dynamic_inputs(2, 3, (4, 5), 3), torch.uint8)
    with pytest.raises((RuntimeError, ValueError), match="pos_image"):
        getattr(torch.ops.solo_fast, name)(kernels, feats3d, torch.tensor([0, 1, 2]), target2d,
                                           1e-3)


def test_traces_under_torch_compile():
    inputs = make_dynamic_inputs(3, 5, (9, 11), 7)
    kernels, feats, pos_image, target = (t.clone() for t in inputs)
    kernels.requires_grad_(True)
    feats.requires_grad_(True)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def loss_fn(a, b, pos_image, target):
        return dynamic_mask_dice_loss(a, b, pos_image, target, backend="cpu").sum()

    loss = loss_fn(kernels, feats, pos_image, target)
    grad_kernels, grad_feats = torch.autograd.grad(loss, (kernels, feats))
    ref_loss, ref_grad_kernels, ref_grad_feats = _loss_and_grads("reference", inputs,
                                                                 torch.ones(7))
    assert_close_scaled(loss.detach(), ref_loss.sum(), 1e-5)
    assert_close_scaled(grad_kernels, ref_grad_kernels, 1e-5)
    assert_close_scaled(grad_feats, ref_grad_feats, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_images,channels,size,num_positives",
                         SHAPES + [(1, 256, (200, 272), 200), (2, 128, (100, 136), 150)])
def test_gpu_matches_reference(backend, dtype, num_images, channels, size, num_positives):
    _require(backend, "cuda")
    inputs = make_dynamic_inputs(num_images, channels, size, num_positives, dtype=dtype,
                                 device="cuda", seed=num_positives)
    weights = torch.randn(num_positives, dtype=dtype, device="cuda")
    actual = _loss_and_grads(backend, inputs, weights)
    double_inputs = (inputs[0].double(), inputs[1].double(), *inputs[2:])
    expected = _loss_and_grads("reference", double_inputs, weights.double())
    # float32 GEMMs on the GPU may use TF32-free FMA orders unlike the CPU: 1e-4.
    rtol = {torch.float32: 1e-4, torch.float64: 1e-12}.get(dtype, 2e-2)
    for a, b in zip(actual, expected):
        assert_close_scaled(a.double(), b, rtol)
    # Deterministic: a second run gives the same bits.
    again = _loss_and_grads(backend, inputs, weights)
    for a, b in zip(actual, again):
        assert torch.equal(a, b)
