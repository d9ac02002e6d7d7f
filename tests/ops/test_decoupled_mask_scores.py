"""solo_fast.ops.decoupled_mask_scores: every backend against the PyTorch reference."""

# N=images, C=channels of the concatenated levels, K=candidates, H, W=mask-map size, P=H*W

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from solo_fast.bench.inputs import make_decoupled_score_inputs
from solo_fast.ops import decoupled_mask_scores
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import decoupled_mask_scores_reference
from tests.ops.helpers import peak_memory_increase, require_backend, skip_bfloat16_triton

CPU_BACKENDS = ["cpu", "triton"]  # the reference is what they are compared with
# (N, C, (H, W), K): odd sizes; K = 0, 1 and many candidates sharing rows, columns and cells.
SHAPES = [(n, c, hw, k) for n, c, hw, k in itertools.product(
    (1, 3), (3, 12), ((7, 9), (37, 53)), (0, 1, 40))]




_require = functools.partial(require_backend, "decoupled_mask_scores")


def _compare(backend, inputs, *, threshold=0.5):
    x_probs, _, image, _, _ = inputs
    # The products are the reference's bit for bit: only the float64 sum's order differs.
    area, soft_sum, _ = decoupled_mask_scores(*inputs, threshold=threshold, backend=backend)
    ref_area, ref_soft_sum = decoupled_mask_scores_reference(*inputs, threshold=threshold)
    assert area.dtype == torch.int64 and area.shape == image.shape
    assert soft_sum.dtype == torch.float64 and soft_sum.shape == image.shape
    assert torch.equal(area, ref_area)
    torch.testing.assert_close(soft_sum, ref_soft_sum, rtol=1e-12, atol=1e-30)
    return area, soft_sum


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,channels,size,num", SHAPES,
                         ids=[f"N{n}-C{c}-{h}x{w}-K{k}" for n, c, (h, w), k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, num_images, channels, size, num, dtype):
    _require(backend)
    inputs = make_decoupled_score_inputs(num_images, channels, size, num, dtype=dtype,
                                         seed=num_images * 100 + channels * 10 + num)
    area, _ = _compare(backend, inputs)
    if num == 40:  # the test means something: masks neither all empty nor all full
        assert 0 < area.sum() < num * size[0] * size[1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3, 0.75, 0.999, 1.0])
def test_thresholds(backend, threshold):
    _require(backend)
    _compare(backend, make_decoupled_score_inputs(2, 9, (23, 29), 30, seed=4),
             threshold=threshold)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_products_at_the_threshold(backend):
    """Products exactly at, one ulp above and one ulp below the threshold (strict >), and exact
    0 and 1 probabilities."""
    _require(backend)
    x, y, image, row, col = make_decoupled_score_inputs(1, 4, (5, 8), 6, seed=1)
    half = torch.tensor(0.5)
    x[0, :, 0, :3] = torch.stack([half, half.nextafter(torch.tensor(1.0)),
                                  half.nextafter(torch.tensor(0.0))])
    y[0, :, 0, :3] = 1.0
    x[0, :, 1] = 0.0
    y[0, :, 2] = 1.0
    x[0, :, 2] = 1.0
    area, _ = _compare(backend, (x, y, image, row, col))
    assert area.min() >= 9  # row 2 (8 pixels) and the pixel one ulp above the threshold


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_candidates_on_few_rows(backend):
    """100 candidates on 2 x 2 cells of one image: duplicates and shared rows everywhere."""
    _require(backend)
    inputs = make_decoupled_score_inputs(2, 5, (19, 23), 100, num_blocks=1, seed=7)
    inputs[3].clamp_(0, 1)
    inputs[4].clamp_(2, 3)
    _compare(backend, inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,channels,size,num",
                         [(2, 3, (9, 11), 0), (2, 3, (0, 5), 4), (0, 3, (4, 5), 0)])
def test_empty_inputs(backend, num_images, channels, size, num):
    _require(backend)
    x, y, image, row, col = make_decoupled_score_inputs(max(num_images, 1), channels, size, num)
    area, soft_sum, _ = decoupled_mask_scores(x[:num_images], y[:num_images], image, row, col,
                                           threshold=0.5, backend=backend)
    assert area.shape == (num,) and area.dtype == torch.int64 and not area.any()
    assert soft_sum.shape == (num,) and soft_sum.dtype == torch.float64 and not soft_sum.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    """float16 / bfloat16: multiplied in float32 and rounded to the inputs' dtype, as torch's
    product, so the masks are the reference's exactly."""
    _require(backend)
    skip_bfloat16_triton(backend, dtype)
    inputs = make_decoupled_score_inputs(2, 5, (21, 29), 12, dtype=dtype, seed=5)
    area, soft_sum, _ = decoupled_mask_scores(*inputs, threshold=0.5, backend=backend)
    x, y, image, row, col = inputs
    soft = (y.float()[image, row] * x.float()[image, col]).to(dtype)  # (K, H, W)
    masks = soft > 0.5
    assert torch.equal(area, masks.sum((1, 2)))
    torch.testing.assert_close(soft_sum, (soft.double() * masks).sum((1, 2)), rtol=1e-12,
                               atol=0)


def test_cpu_result_does_not_depend_on_the_thread_count():
    _require("cpu")
    inputs = make_decoupled_score_inputs(2, 12, (37, 53), 40, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = decoupled_mask_scores(*inputs, threshold=0.5, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    several = decoupled_mask_scores(*inputs, threshold=0.5, backend="cpu")
    assert single.packed is None and several.packed is None
    for a, b in zip(single[:2], several[:2]):
        assert torch.equal(a, b)


def test_opcheck_compiled_op():
    assert has_ops(), "solo_fast._C is not built"
    x, y, image, row, col = make_decoupled_score_inputs(2, 5, (9, 13), 11)
    args = (x.reshape(2, 5, -1), y.reshape(2, 5, -1), image, row, col, 0.5)  # maps (N, C, P)
    torch.library.opcheck(torch.ops.solo_fast.decoupled_mask_scores.default, args)


def test_opcheck_triton_op():
    _require("triton")
    x, y, image, row, col = make_decoupled_score_inputs(1, 3, (5, 7), 4)
    args = (x.reshape(1, 3, -1), y.reshape(1, 3, -1), image, row, col, 0.5)  # maps (N, C, P)
    torch.library.opcheck(torch.ops.solo_fast.decoupled_mask_scores_triton.default, args)


def test_fused_scoring_stores_no_products():
    assert has_ops(), "solo_fast._C is not built"
    # 200 candidates of a 200 x 272 map: a (K, H, W) float tensor is 43.5 MB (above glibc's
    # largest mmap threshold, so that it cannot hide in resident heap pages).
    inputs = make_decoupled_score_inputs(1, 40, (200, 272), 200, num_blocks=25)
    product_bytes = 200 * 200 * 272 * 4

    def fused():
        decoupled_mask_scores(*inputs, threshold=0.5, backend="cpu")

    def reference():
        decoupled_mask_scores(*inputs, threshold=0.5, backend="reference")

    fused()  # first-call costs (thread pool, dispatcher caches) are not the op's
    fused_peak = peak_memory_increase(fused)
    reference_peak = peak_memory_increase(reference)
    assert fused_peak <= 2 * 2**20, fused_peak
    assert reference_peak >= 2 * product_bytes, (reference_peak, product_bytes)


def _bad_arguments():
    x, y, image, row, col = make_decoupled_score_inputs(2, 3, (4, 5), 3)
    return dict(x_probs=x, y_probs=y, image=image, row=row, col=col)


@pytest.mark.parametrize("bad,message", [
    (dict(x_probs=torch.rand(3, 4, 5)), "x_probs must be (N, C, H, W)"),
    (dict(y_probs=torch.rand(2, 3, 4, 6)), "y_probs must have x_probs' shape"),
    (dict(y_probs=torch.rand(2, 3, 4, 5, dtype=torch.float64)),
     "y_probs must have x_probs' dtype"),
    (dict(x_probs=torch.ones(2, 3, 4, 5, dtype=torch.int32)), "x_probs must be float16"),
    (dict(image=torch.zeros(3, 1, dtype=torch.int64)), "image must be 1-D"),
    (dict(row=torch.zeros(2, dtype=torch.int64)), "row must have shape (K,) = (3,)"),
    (dict(col=torch.zeros(3, dtype=torch.int32)), "col must be int64"),
    (dict(image=torch.tensor([0, 2, 1])), "image must lie in [0, N) = [0, 2)"),
    (dict(row=torch.tensor([0, -1, 1])), "row must lie in [0, C) = [0, 3)"),
    (dict(col=torch.tensor([3, 0, 1])), "col must lie in [0, C) = [0, 3)"),
    (dict(col=torch.zeros(3, dtype=torch.int64, device="meta")),
     "col is on meta but x_probs is on cpu"),
    (dict(y_probs=torch.rand(2, 3, 4, 5, device="meta")),
     "y_probs is on meta but x_probs is on cpu"),
    (dict(threshold=float("inf")), "threshold must be a finite number"),
    (dict(threshold=None), "threshold must be a finite number"),
    (dict(x_probs=[1.0, 2.0]), "x_probs must be a torch.Tensor"),
    (dict(backend="gpu"), "backend must be one of reference, cpu, cuda, triton"),
])
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_bad_input_names_the_argument(bad, message, backend):
    arguments = _bad_arguments()
    arguments.update(threshold=0.5, backend=backend)
    arguments.update(bad)
    tensors = [arguments.pop(name) for name in ("x_probs", "y_probs", "image", "row", "col")]
    escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises((TypeError, ValueError), match=escaped):
        decoupled_mask_scores(*tensors, **arguments)


@pytest.mark.parametrize("op", ["decoupled_mask_scores", "decoupled_mask_scores_triton"])
@pytest.mark.parametrize("name", ["image", "row", "col"])
def test_the_kernels_check_index_ranges_themselves(op, name):
    """Called directly (not through the public function), no op reads out of bounds."""
    if op == "decoupled_mask_scores_triton":
        _require("triton")
    x, y, image, row, col = make_decoupled_score_inputs(2, 3, (4, 5), 3)
    indices = dict(image=image, row=row, col=col)
    indices[name] = torch.tensor([0, 1, 3])
    with pytest.raises((RuntimeError, ValueError), match=name):
        getattr(torch.ops.solo_fast, op)(x.reshape(2, 3, -1), y.reshape(2, 3, -1),
                                         indices["image"], indices["row"], indices["col"], 0.5)


def test_traces_under_torch_compile():
    inputs = make_decoupled_score_inputs(2, 5, (9, 11), 7)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def score(x, y, image, row, col):
        area, soft_sum, _ = decoupled_mask_scores(x, y, image, row, col, threshold=0.5,
                                               backend="cpu")
        return soft_sum / area.clamp(min=1)

    expected_area, expected_sum = decoupled_mask_scores_reference(*inputs, threshold=0.5)
    torch.testing.assert_close(score(*inputs), expected_sum / expected_area.clamp(min=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_images,channels,size,num",
                         SHAPES + [(1, 128, (200, 272), 1000), (2, 128, (200, 272), 300)])
def test_gpu_matches_reference(backend, dtype, num_images, channels, size, num):
    _require(backend, "cuda")
    inputs = make_decoupled_score_inputs(num_images, channels, size, num, dtype=dtype,
                                         device="cuda", seed=num)
    area, soft_sum, _ = decoupled_mask_scores(*inputs, threshold=0.5, backend=backend)
    x, y, image, row, col = (t.cpu() for t in inputs)
    # torch's product in the inputs' dtype (float16 / bfloat16 via float32, rounded back).
    soft = (y.float()[image, row] * x.float()[image, col]).to(dtype) if dtype in (
        torch.float16, torch.bfloat16) else y[image, row] * x[image, col]  # (K, H, W)
    masks = soft > 0.5
    assert torch.equal(area.cpu(), masks.sum((1, 2)))
    torch.testing.assert_close(soft_sum.cpu(), (soft.double() * masks).sum((1, 2)), rtol=1e-12,
                               atol=0)
    # Deterministic: a second run gives the same bits.
    again = decoupled_mask_scores(*inputs, threshold=0.5, backend=backend)
    for a, b in zip((area, soft_sum), again):
        assert torch.equal(a, b)
