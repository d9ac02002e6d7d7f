"""solo_fast.ops.dynamic_mask_scores: every backend against the PyTorch reference."""

# N=images, E=mask-feature channels, K=candidates, H, W=mask-map size, P=H*W pixels,
# Wd=ceil(P / 64) words of a packed mask

from __future__ import annotations

import functools
import itertools
import os

import numpy as np
import pytest
import torch

from solo_fast.bench.inputs import make_dynamic_score_inputs as make_dynamic_inputs
from solo_fast.ops import MaskScores, dynamic_mask_scores
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import (
    dynamic_mask_scores_reference,
    pack_masks_reference,
    unpack_masks_reference,
)
from tests.ops.helpers import peak_memory_increase, require_backend, skip_bfloat16_triton

CPU_BACKENDS = ["cpu", "triton"]  # the reference is what they are compared with
# (N, E, (H, W), K): odd sizes; K = 0, 1 and many candidates.
SHAPES = [(n, e, hw, k) for n, e, hw, k in itertools.product(
    (1, 3), (5, 16), ((7, 9), (37, 53)), (0, 1, 40))]




_require = functools.partial(require_backend, "dynamic_mask_scores")


def _popcount(packed: torch.Tensor) -> torch.Tensor:
    """(K,) set bits per row of (K, Wd) int64, counted by numpy (independent of the ops)."""
    bits = np.unpackbits(packed.cpu().numpy().view(np.uint8), axis=1)  # (K, Wd * 64)
    return torch.from_numpy(bits.sum(1, dtype=np.int64))


def _check_packed(packed, area, feats):
    """packed is (K, Wd) int64 on feats' device, with exactly area[k] bits in row k."""
    words = (feats.shape[-2] * feats.shape[-1] + 63) // 64
    assert packed.dtype == torch.int64 and packed.device == feats.device
    assert packed.shape == (len(area), words)
    assert torch.equal(_popcount(packed), area.cpu())


def _compare(backend, inputs, *, threshold=0.5, rtol=None):
    """Every output of the backend, packed masks included, against the reference's; the call
    without packing gives the same area and soft sums."""
    kernels, feats, image = inputs
    rtol = {torch.float64: 1e-12}.get(kernels.dtype, 1e-6) if rtol is None else rtol
    area, soft_sum, packed = dynamic_mask_scores(*inputs, threshold=threshold, backend=backend,
                                                 pack_masks=True)
    ref_area, ref_soft_sum, ref_packed = dynamic_mask_scores_reference(
        *inputs, threshold=threshold, pack_masks=True)
    assert area.dtype == torch.int64 and area.shape == image.shape
    assert soft_sum.dtype == torch.float64 and soft_sum.shape == image.shape
    assert torch.equal(area, ref_area)
    torch.testing.assert_close(soft_sum, ref_soft_sum, rtol=rtol, atol=1e-30)
    _check_packed(packed, area, feats)
    assert torch.equal(packed, ref_packed)
    unpacked = dynamic_mask_scores(*inputs, threshold=threshold, backend=backend)
    assert isinstance(unpacked, MaskScores) and unpacked.packed is None
    assert torch.equal(unpacked[0], area) and torch.equal(unpacked[1], soft_sum)
    return area, soft_sum


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,channels,size,num", SHAPES,
                         ids=[f"N{n}-E{e}-{h}x{w}-K{k}" for n, e, (h, w), k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, num_images, channels, size, num, dtype):
    _require(backend)
    inputs = make_dynamic_inputs(num_images, channels, size, num, dtype=dtype,
                                 seed=num_images * 100 + channels * 10 + num)
    area, _ = _compare(backend, inputs)
    if num == 40:  # the test means something: masks neither all empty nor all full
        pixels = size[0] * size[1]
        assert 0 < area.sum() < num * pixels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.75, 0.999])
def test_thresholds(backend, threshold):
    _require(backend)
    _compare(backend, make_dynamic_inputs(2, 12, (23, 29), 30, seed=4), threshold=threshold)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inexact_logits_differ_only_at_the_threshold(backend):
    """Normal inputs: the GEMM's summation order may move logits by an ulp, so a pixel may only
    change sides where the reference's soft value lies within 1e-5 of the threshold."""
    _require(backend)
    kernels, feats, image = make_dynamic_inputs(2, 24, (31, 37), 25, exact=False, seed=6)
    area, soft_sum, _ = dynamic_mask_scores(kernels, feats, image, threshold=0.5, backend=backend)
    ref_area, ref_soft_sum = dynamic_mask_scores_reference(kernels, feats, image, threshold=0.5)
    logits = torch.einsum("ke,kehw->khw", kernels.double(), feats.double()[image])  # (K, H, W)
    near = ((logits.sigmoid() - 0.5).abs() < 1e-5).sum((1, 2))  # (K,)
    assert ((area - ref_area).abs() <= near).all()
    torch.testing.assert_close(soft_sum, ref_soft_sum, rtol=1e-6, atol=0.5 * near.max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_blocks_and_ragged_tiles(backend):
    """300 candidates of one image (two CPU blocks of 256), 1,961 pixels (ragged last tiles)."""
    _require(backend)
    _compare(backend, make_dynamic_inputs(1, 7, (37, 53), 300, seed=8))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saturated_logits(backend):
    """Logits far beyond float's exp range: s is exactly 0 or 1, as torch's sigmoid makes it."""
    _require(backend)
    kernels, feats, image = make_dynamic_inputs(1, 4, (9, 11), 3, seed=2)
    kernels[0] = 100.0  # z = 100 * sum(feats): mostly |z| >> 88
    kernels[1] = -100.0
    for threshold in (0.0, 0.5, 0.9999):
        _compare(backend, (kernels, feats, image), threshold=threshold)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,channels,size,num",
                         [(2, 3, (9, 11), 0), (2, 3, (0, 5), 4), (0, 3, (4, 5), 0)])
def test_empty_inputs(backend, num_images, channels, size, num):
    _require(backend)
    inputs = make_dynamic_inputs(max(num_images, 1), channels, size, num)
    inputs = (inputs[0], inputs[1][:num_images], inputs[2])
    area, soft_sum, _ = dynamic_mask_scores(*inputs, threshold=0.5, backend=backend)
    assert area.shape == (num,) and area.dtype == torch.int64 and not area.any()
    assert soft_sum.shape == (num,) and soft_sum.dtype == torch.float64 and not soft_sum.any()
    words = (size[0] * size[1] + 63) // 64  # 0 for an empty map
    *_, packed = dynamic_mask_scores(*inputs, threshold=0.5, backend=backend, pack_masks=True)
    assert packed.shape == (num, words) and packed.dtype == torch.int64 and not packed.any()


@pytest.mark.parametrize("op", ["dynamic_mask_scores", "dynamic_mask_scores_triton"])
@pytest.mark.parametrize("num", [0, 5])
@pytest.mark.parametrize("size", [(7, 9), (8, 8), (37, 53)])
def test_the_ops_third_output_without_packing_is_empty(op, num, size):
    """pack_masks=False: an empty (0, Wd) int64 tensor; with it, (K, Wd) (P = 63, 64, 1961)."""
    _require("triton" if op.endswith("triton") else "cpu")
    kernels, feats, image = make_dynamic_inputs(2, 5, size, num, seed=3)
    feats3d = feats.reshape(2, 5, -1)  # (N, E, P)
    words = (size[0] * size[1] + 63) // 64
    call = getattr(torch.ops.solo_fast, op)
    area, soft_sum, packed = call(kernels, feats3d, image, 0.5, False)
    assert packed.shape == (0, words) and packed.dtype == torch.int64
    area_packed, soft_sum_packed, packed = call(kernels, feats3d, image, 0.5, True)
    assert packed.shape == (num, words) and packed.dtype == torch.int64
    assert torch.equal(area, area_packed) and torch.equal(soft_sum, soft_sum_packed)
    _check_packed(packed, area, feats)


def test_reference_packing_is_numpys_little_endian_bit_order():
    """The reference packs as np.packbits(bitorder="little") on the flattened masks, zero tail,
    and unpack_masks_reference inverts it, whatever the mask size (around 64 | P)."""
    generator = torch.Generator().manual_seed(1)
    for size in [(0, 3), (1, 1), (7, 9), (8, 8), (5, 13), (37, 53)]:
        masks = torch.rand((6, *size), generator=generator) > 0.5
        masks[0] = True  # every bit, the sign bit of the words included
        packed = pack_masks_reference(masks)
        words = (size[0] * size[1] + 63) // 64
        flat = np.zeros((6, words * 64), dtype=bool)
        flat[:, :size[0] * size[1]] = masks.reshape(6, -1).numpy()
        expected = np.packbits(flat, axis=1, bitorder="little").view("<i8")  # (6, Wd)
        assert packed.shape == (6, words) and np.array_equal(packed.numpy(), expected)
        assert torch.equal(unpack_masks_reference(packed, *size), masks)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    """float16 / bfloat16: multiplied in float32; the exact logits and their soft values are
    rounded to the inputs' dtype, as torch stores them, so the masks are the reference's."""
    _require(backend)
    skip_bfloat16_triton(backend, dtype)
    kernels, feats, image = make_dynamic_inputs(2, 9, (21, 29), 12, dtype=dtype, seed=5)
    area, soft_sum, packed = dynamic_mask_scores(kernels, feats, image, threshold=0.5,
                                                 backend=backend, pack_masks=True)
    # The soft masks torch would store: exact logits (float64), rounded to dtype, sigmoid,
    # rounded again.
    logits = torch.einsum("ke,kehw->khw", kernels.double(), feats.double()[image])  # (K, H, W)
    soft = logits.to(dtype).float().sigmoid().to(dtype)
    masks = soft > 0.5
    assert torch.equal(area, masks.sum((1, 2)))
    torch.testing.assert_close(soft_sum, (soft.double() * masks).sum((1, 2)), rtol=1e-6,
                               atol=0)
    _check_packed(packed, area, feats)
    assert torch.equal(packed, pack_masks_reference(masks))


def test_cpu_result_does_not_depend_on_the_thread_count_or_schedule():
    _require("cpu")
    inputs = make_dynamic_inputs(2, 16, (37, 53), 40, exact=False, seed=9)
    threads = torch.get_num_threads()
    schedule = os.environ.pop("SOLO_FAST_SCORES_SCHEDULE", None)
    try:
        torch.set_num_threads(1)
        single = dynamic_mask_scores(*inputs, threshold=0.5, backend="cpu", pack_masks=True)
        torch.set_num_threads(threads)
        several = dynamic_mask_scores(*inputs, threshold=0.5, backend="cpu", pack_masks=True)
        os.environ["SOLO_FAST_SCORES_SCHEDULE"] = "gemm"
        sequential = dynamic_mask_scores(*inputs, threshold=0.5, backend="cpu", pack_masks=True)
        _compare("cpu", make_dynamic_inputs(1, 7, (37, 53), 300, seed=8))  # blocks, ragged tiles
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("SOLO_FAST_SCORES_SCHEDULE", None)
        if schedule is not None:
            os.environ["SOLO_FAST_SCORES_SCHEDULE"] = schedule
    for a, b in zip(single, several):
        assert torch.equal(a, b)
    # The other schedule runs the same single-block GEMMs, multi-threaded: MKL splits them over
    # rows and columns, never over E, so every logit is summed in the same order.
    for a, b in zip(single, sequential):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pack_masks", [False, True])
def test_opcheck_compiled_op(pack_masks):
    assert has_ops(), "solo_fast._C is not built"
    kernels, feats, image = make_dynamic_inputs(2, 5, (9, 13), 11)
    args = (kernels, feats.reshape(2, 5, -1), image, 0.5, pack_masks)  # mask_feats (N, E, P)
    torch.library.opcheck(torch.ops.solo_fast.dynamic_mask_scores.default, args)


@pytest.mark.parametrize("pack_masks", [False, True])
def test_opcheck_triton_op(pack_masks):
    _require("triton")
    kernels, feats, image = make_dynamic_inputs(1, 3, (5, 7), 4)
    args = (kernels, feats.reshape(1, 3, -1), image, 0.5, pack_masks)  # mask_feats (N, E, P)
    torch.library.opcheck(torch.ops.solo_fast.dynamic_mask_scores_triton.default, args)


def test_fused_scoring_stores_no_soft_masks():
    assert has_ops(), "solo_fast._C is not built"
    # 200 candidates of a 200 x 272 map at E = 64: a (K, H, W) float tensor is 43.5 MB (above
    # glibc's largest mmap threshold, so that it cannot hide in resident heap pages).
    inputs = make_dynamic_inputs(1, 64, (200, 272), 200, exact=False)
    soft_bytes = 200 * 200 * 272 * 4

    def fused():
        dynamic_mask_scores(*inputs, threshold=0.5, backend="cpu")

    def fused_packed():
        dynamic_mask_scores(*inputs, threshold=0.5, backend="cpu", pack_masks=True)

    def reference():
        dynamic_mask_scores(*inputs, threshold=0.5, backend="reference")

    fused()  # first-call costs (thread pool, MKL buffers) are not the op's
    fused_peak = peak_memory_increase(fused)
    packed_peak = peak_memory_increase(fused_packed)
    reference_peak = peak_memory_increase(reference)
    # Partials (K x 107 tiles x 16 B = 0.3 MB) and one 512 KiB logit buffer per thread.
    assert fused_peak <= 4 * 2**20, fused_peak
    # ... and the packed masks, K x P / 8 bytes = 1.36 MB.
    assert packed_peak <= 4 * 2**20 + 200 * 850 * 8, packed_peak
    assert reference_peak >= 2 * soft_bytes, (reference_peak, soft_bytes)


def _bad_arguments():
    kernels, feats, image = make_dynamic_inputs(2, 3, (4, 5), 3)
    return dict(kernels=kernels, mask_feats=feats, image=image)


@pytest.mark.parametrize("bad,message", [
    (dict(mask_feats=torch.randn(2, 3, 20)), "mask_feats must be (N, E, H, W)"),
    (dict(mask_feats=torch.ones(2, 3, 4, 5, dtype=torch.int32)), "mask_feats must be float16"),
    (dict(kernels=torch.randn(3, 4)), "kernels must be (K, E) with E = 3"),
    (dict(kernels=torch.randn(3)), "kernels must be (K, E) with E = 3"),
    (dict(kernels=torch.randn(3, 3, dtype=torch.float64)), "kernels must have mask_feats' dtype"),
    (dict(image=torch.zeros(2, dtype=torch.int64)), "image must have shape (K,) = (3,)"),
    (dict(image=torch.zeros(3, dtype=torch.int32)), "image must be int64"),
    (dict(image=torch.tensor([0, 2, 1])), "image must lie in [0, N) = [0, 2)"),
    (dict(image=torch.tensor([0, -1, 1])), "image must lie in [0, N) = [0, 2)"),
    (dict(image=torch.zeros(3, dtype=torch.int64, device="meta")),
     "image is on meta but mask_feats is on cpu"),
    (dict(kernels=torch.randn(3, 3, device="meta")), "kernels is on meta but mask_feats is on cpu"),
    (dict(threshold=float("nan")), "threshold must be a finite number"),
    (dict(threshold="0.5"), "threshold must be a finite number"),
    (dict(pack_masks=1), "pack_masks must be a bool, got int"),
    (dict(kernels=[1.0, 2.0]), "kernels must be a torch.Tensor"),
    (dict(backend="gpu"), "backend must be one of reference, cpu, cuda, triton"),
])
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_bad_input_names_the_argument(bad, message, backend):
    arguments = _bad_arguments()
    arguments.update(threshold=0.5, backend=backend)
    arguments.update(bad)
    tensors = [arguments.pop(name) for name in ("kernels", "mask_feats", "image")]
    escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises((TypeError, ValueError), match=escaped):
        dynamic_mask_scores(*tensors, **arguments)


@pytest.mark.parametrize("op", ["dynamic_mask_scores", "dynamic_mask_scores_triton"])
def test_the_kernels_check_index_ranges_themselves(op):
    """Called directly (not through the public function), no op reads out of bounds."""
    if op == "dynamic_mask_scores_triton":
        _require("triton")
    kernels, feats, _ = make_dynamic_inputs(2, 3, (4, 5), 3)
    with pytest.raises((RuntimeError, ValueError), match="image"):
        getattr(torch.ops.solo_fast, op)(kernels, feats.reshape(2, 3, -1),
                                         torch.tensor([0, 1, 2]), 0.5, True)


def test_traces_under_torch_compile():
    inputs = make_dynamic_inputs(2, 5, (9, 11), 7)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def score(kernels, feats, image):
        area, soft_sum, _ = dynamic_mask_scores(kernels, feats, image, threshold=0.5, backend="cpu")
        return soft_sum / area.clamp(min=1)

    expected_area, expected_sum, expected_packed = dynamic_mask_scores_reference(
        *inputs, threshold=0.5, pack_masks=True)
    torch.testing.assert_close(score(*inputs), expected_sum / expected_area.clamp(min=1))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def packed(kernels, feats, image):
        return dynamic_mask_scores(kernels, feats, image, threshold=0.5, backend="cpu",
                                   pack_masks=True)[2]

    assert torch.equal(packed(*inputs), expected_packed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_images,channels,size,num",
                         SHAPES + [(1, 256, (200, 272), 1000), (2, 256, (200, 272), 300)])
def test_gpu_matches_reference(backend, dtype, num_images, channels, size, num):
    _require(backend, "cuda")
    inputs = make_dynamic_inputs(num_images, channels, size, num, dtype=dtype, device="cuda",
                                 seed=num)
    area, soft_sum, packed = dynamic_mask_scores(*inputs, threshold=0.5, backend=backend,
                                                 pack_masks=True)
    _check_packed(packed, area, inputs[1])
    # Exact logits (float64 sums of multiples of 1/64), then the sigmoid and the comparison in
    # the inputs' dtype, as torch stores them. float32 holds every such logit exactly; float16 /
    # bfloat16 only while |z| < 32 (E <= 16 here), so at E = 256 they get a tolerance band.
    kernels, feats, image = (t.cpu() for t in inputs)
    logits = torch.einsum("ke,kehw->khw", kernels.double(), feats.double()[image])  # (K, H, W)
    if dtype in (torch.float32, torch.float64) or channels <= 16:
        soft = logits.to(dtype).float().sigmoid().to(dtype) if dtype.itemsize == 2 \
            else logits.to(dtype).sigmoid()
        masks = soft > 0.5
        assert torch.equal(area.cpu(), masks.sum((1, 2)))
        torch.testing.assert_close(soft_sum.cpu(), (soft.double() * masks).sum((1, 2)),
                                   rtol=1e-5, atol=0)
        assert torch.equal(packed.cpu(), pack_masks_reference(masks))
    else:
        soft = logits.sigmoid()
        near = ((soft - 0.5).abs() < 2e-3).sum((1, 2))
        assert ((area.cpu() - (soft > 0.5).sum((1, 2))).abs() <= near).all()
    # Deterministic: a second run gives the same bits; without packing, the same scores.
    again = dynamic_mask_scores(*inputs, threshold=0.5, backend=backend, pack_masks=True)
    for a, b in zip((area, soft_sum, packed), again):
        assert torch.equal(a, b)
    unpacked = dynamic_mask_scores(*inputs, threshold=0.5, backend=backend)
    assert torch.equal(unpacked[0], area) and torch.equal(unpacked[1], soft_sum)
