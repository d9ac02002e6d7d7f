"""solo_fast.ops.solo_mask_scores: every backend against the PyTorch reference."""

# N=images, Q=channels (grid cells) of a level, K=candidates, h, w=source maps,
# H, W=output (mask-map) size

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from solo_fast.ops import solo_mask_scores
from solo_fast.ops._extension import has_ops
from solo_fast.ops.reference import solo_mask_scores_reference
from tests.ops.helpers import peak_memory_increase, require_backend, skip_bfloat16_triton

CPU_BACKENDS = ["cpu", "triton"]  # the reference is what they are compared with
# (source, output) sizes: upscaling (odd, x2, x4), identity, downscaling. All have H + W <= 128,
# where torch's CPU kernel vectorises over channels and rounds an ulp apart from its generic
# kernel, whose arithmetic the backends reproduce: the comparisons tolerate near-threshold pixels.
RESIZES = [((7, 9), (37, 53)), ((9, 11), (18, 22)), ((5, 7), (20, 28)), ((13, 17), (13, 17)),
           ((40, 40), (21, 19))]
# (N, Q, resize, K): N alternates so that both occur with every size; K = 0, 1 and 40
# candidates with repeated channels; Q odd.
SHAPES = [(1 + 2 * ((i + j) % 2), 9, resize, k)
          for i, resize in enumerate(RESIZES) for j, k in enumerate((0, 1, 40))]
# Sizes on torch's generic kernel (H + W > 128): there the resize is torch's bit for bit.
GENERIC_RESIZES = [((7, 9), (137, 153)), ((50, 68), (200, 272)), ((200, 200), (71, 63)),
                   ((61, 47), (131, 200))]


def make_solo_score_inputs(num_images: int, channels: int, size: tuple[int, int], num: int, *,
                           dtype=torch.float32, logits: bool = True, seed: int = 0,
                           device: str = "cpu"):
    """Random (mask_preds, image, channel) of SOLO candidates of one level.

    Logits spread over about [-6, 6] (their sigmoids when ``logits`` is False), so the resized
    maps cover (0, 1) with many pixels near 0.5. Candidates come in random order, about a third
    of them repeating another's (image, channel) (one cell scored for several classes);
    candidate 1 repeats candidate 0 when K > 1. With N > 1 the middle image gets none.
    """
    generator = torch.Generator().manual_seed(seed)
    preds = torch.randn((num_images, channels, *size), generator=generator,
                        dtype=torch.float64) * 3
    if not logits:
        preds = preds.sigmoid()
    used = torch.tensor([n for n in range(num_images) if num_images == 1 or n != num_images // 2])
    distinct = max(1, (2 * num) // 3)
    cell_image = used[torch.randint(len(used), (distinct,), generator=generator)]
    cell_channel = torch.randint(channels, (distinct,), generator=generator)
    pick = torch.randint(distinct, (num,), generator=generator)
    image, channel = cell_image[pick], cell_channel[pick]
    if num > 1:
        image[1], channel[1] = image[0], channel[0]
    return preds.to(dtype=dtype, device=device), image.to(device), channel.to(device)


_require = functools.partial(require_backend, "solo_mask_scores")


def _reference_soft(mask_preds, image, channel, size, logits):
    """(K, H, W) soft masks as the reference computes them (in float64 afterwards)."""
    if image.numel() == 0:  # torch's resize takes no empty batch
        return mask_preds.new_zeros((0, *size), dtype=torch.float64)
    maps = mask_preds[image, channel]  # (K, h, w)
    probs = maps.sigmoid() if logits else maps
    return F.interpolate(probs[None], size=size, mode="bilinear",
                         align_corners=False)[0].double()  # (K, H, W)


def _compare(backend, inputs, size, *, threshold=0.5, logits=True, exact=False):
    """The backend's (area, soft_sum) against the reference's.

    A pixel may change sides only where the reference's soft value lies within a few ulp of the
    threshold (the backends' sigmoid is within 2 ulp of torch's; torch's small-size kernel rounds
    an ulp apart): area may differ by at most the count of those pixels, soft_sum by a relative
    few ulp plus their values. ``exact``: the resize is torch's bit for bit (probabilities on
    torch's generic kernel): area equal, soft_sum up to the float64 summation order.
    """
    mask_preds, image, _ = inputs
    dtype = mask_preds.dtype
    area, soft_sum, _ = solo_mask_scores(*inputs, size=size, threshold=threshold, logits=logits,
                                      backend=backend)
    ref_area, ref_soft_sum = solo_mask_scores_reference(*inputs, size=size, threshold=threshold,
                                                        logits=logits)
    assert area.dtype == torch.int64 and area.shape == image.shape
    assert soft_sum.dtype == torch.float64 and soft_sum.shape == image.shape
    if exact:
        assert torch.equal(area, ref_area)
        torch.testing.assert_close(soft_sum, ref_soft_sum, rtol=1e-13, atol=1e-30)
        return area, soft_sum
    tol = 4 * torch.finfo(dtype).eps * max(abs(threshold), 1.0)
    soft = _reference_soft(*inputs, size, logits)
    near = ((soft - threshold).abs() <= tol).sum((1, 2))  # (K,)
    assert ((area - ref_area).abs() <= near).all(), (area, ref_area, near)
    bound = 4 * torch.finfo(dtype).eps * ref_soft_sum + (threshold + tol) * near
    assert ((soft_sum - ref_soft_sum).abs() <= bound).all(), (soft_sum, ref_soft_sum, near)
    return area, soft_sum


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,channels,resize,num", SHAPES,
                         ids=[f"N{n}-Q{q}-{h}x{w}to{oh}x{ow}-K{k}"
                              for n, q, ((h, w), (oh, ow)), k in SHAPES])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, num_images, channels, resize, num, logits, dtype):
    _require(backend)
    source, size = resize
    inputs = make_solo_score_inputs(num_images, channels, source, num, dtype=dtype,
                                    logits=logits, seed=num_images * 100 + sum(size) + num)
    area, _ = _compare(backend, inputs, size, logits=logits)
    if num == 40:  # the test means something: masks neither all empty nor all full
        assert 0 < area.sum() < num * size[0] * size[1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("source,size", GENERIC_RESIZES,
                         ids=[f"{h}x{w}to{oh}x{ow}" for (h, w), (oh, ow) in GENERIC_RESIZES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_resize_is_torchs_bit_for_bit(backend, source, size, dtype):
    """Probabilities on torch's generic kernel (H + W > 128): the masks are the reference's."""
    _require(backend)
    skip_bfloat16_triton(backend, dtype)
    inputs = make_solo_score_inputs(2, 3, source, 3, dtype=dtype, logits=False, seed=sum(size))
    _compare(backend, inputs, size, logits=False, exact=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.75, 0.999])
def test_thresholds(backend, threshold):
    _require(backend)
    inputs = make_solo_score_inputs(2, 7, (9, 11), 30, seed=4)
    _compare(backend, inputs, (37, 45), threshold=threshold)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("resize", [RESIZES[0], RESIZES[3], RESIZES[4]],
                         ids=["upscale", "identity", "downscale"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
def test_half_inputs(backend, dtype, resize, logits):
    """float16 / bfloat16: sigmoid and resize in float32, rounded to the inputs' dtype."""
    _require(backend)
    skip_bfloat16_triton(backend, dtype)
    source, size = resize
    inputs = make_solo_score_inputs(3, 5, source, 12, dtype=dtype, logits=logits, seed=5)
    _compare(backend, inputs, size, logits=logits)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_values_at_the_threshold(backend):
    """Identity maps with probabilities exactly at, one ulp above and one ulp below the
    threshold (strict >), and exact 0 and 1."""
    _require(backend)
    preds, image, channel = make_solo_score_inputs(1, 4, (5, 8), 6, logits=False, seed=1)
    half = torch.tensor(0.5)
    preds[0, :, 0, :3] = torch.stack([half, half.nextafter(torch.tensor(1.0)),
                                      half.nextafter(torch.tensor(0.0))])
    preds[0, :, 1] = 0.0
    preds[0, :, 2] = 1.0
    area, _ = _compare(backend, (preds, image, channel), (5, 8), logits=False, exact=True)
    assert area.min() >= 9  # row 2 (8 pixels) and the pixel one ulp above the threshold


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("resize", [RESIZES[0], RESIZES[3]], ids=["upscale", "identity"])
def test_nan_pixels_lie_outside_the_masks(backend, dtype, resize):
    """A NaN logit makes its soft values NaN (and those it is interpolated into), which no
    threshold passes: area does not count them, as in the reference, and soft_sum leaves them out
    (the reference's sum of soft * mask is NaN: NaN * 0)."""
    _require(backend)
    skip_bfloat16_triton(backend, dtype)
    source, size = resize
    preds, image, channel = make_solo_score_inputs(1, 3, source, 5, dtype=dtype, seed=2)
    preds[0, :, 1:3, 2:5] = float("nan")
    area, soft_sum, _ = solo_mask_scores(preds, image, channel, size=size, threshold=0.5,
                                      backend=backend)
    soft = _reference_soft(preds, image, channel, size, True)  # (K, H, W)
    masks = soft > 0.5
    near = ((soft - 0.5).abs() <= 4 * torch.finfo(dtype).eps).sum((1, 2))
    assert soft.isnan().any() and ((area - masks.sum((1, 2))).abs() <= near).all()
    expected = torch.where(masks, soft, 0.0).sum((1, 2))
    assert ((soft_sum - expected).abs() <= 4 * torch.finfo(dtype).eps * expected + near).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("size", [(1, 1), (1, 6), (7, 1)])
def test_degenerate_sizes(backend, size):
    """One-pixel-wide maps and outputs (an axis of size 1 on either side)."""
    _require(backend)
    for source in ((1, 1), (1, 5), (4, 1), (3, 4)):
        inputs = make_solo_score_inputs(1, 3, source, 4, logits=False, seed=sum(source))
        _compare(backend, inputs, size, logits=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_images,channels,num", [(2, 3, 0), (0, 3, 0), (2, 0, 0)])
def test_empty_inputs(backend, num_images, channels, num):
    _require(backend)
    preds, image, channel = make_solo_score_inputs(max(num_images, 1), max(channels, 1),
                                                   (4, 5), num)
    area, soft_sum, _ = solo_mask_scores(preds[:num_images, :channels], image, channel,
                                      size=(9, 11), threshold=0.5, backend=backend)
    assert area.shape == (num,) and area.dtype == torch.int64
    assert soft_sum.shape == (num,) and soft_sum.dtype == torch.float64


def test_cpu_result_does_not_depend_on_the_thread_count():
    _require("cpu")
    inputs = make_solo_score_inputs(2, 9, (9, 11), 40, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = solo_mask_scores(*inputs, size=(37, 53), threshold=0.5, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    several = solo_mask_scores(*inputs, size=(37, 53), threshold=0.5, backend="cpu")
    assert single.packed is None and several.packed is None
    for a, b in zip(single[:2], several[:2]):
        assert torch.equal(a, b)


def test_repeated_candidates_get_the_same_scores():
    """Candidates of one (image, channel) get identical results, whatever their order."""
    _require("cpu")
    preds, image, channel = make_solo_score_inputs(2, 5, (9, 11), 20, seed=3)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    area, soft_sum, _ = solo_mask_scores(preds, image, channel, size=(30, 31), threshold=0.5,
                                      backend="cpu")
    shuffled = solo_mask_scores(preds, image[order], channel[order], size=(30, 31),
                                threshold=0.5, backend="cpu")
    assert torch.equal(shuffled[0], area[order]) and torch.equal(shuffled[1], soft_sum[order])
    assert torch.equal(area[1], area[0]) and torch.equal(soft_sum[1], soft_sum[0])


def test_opcheck_compiled_op():
    assert has_ops(), "solo_fast._C is not built"
    preds, image, channel = make_solo_score_inputs(2, 5, (5, 7), 11)
    args = (preds, image, channel, 11, 13, 0.5, True)
    torch.library.opcheck(torch.ops.solo_fast.solo_mask_scores.default, args)


def test_opcheck_triton_op():
    _require("triton")
    preds, image, channel = make_solo_score_inputs(1, 3, (3, 4), 4)
    args = (preds, image, channel, 6, 7, 0.5, True)
    torch.library.opcheck(torch.ops.solo_fast.solo_mask_scores_triton.default, args)


def test_fused_scoring_stores_no_soft_masks():
    assert has_ops(), "solo_fast._C is not built"
    # 200 candidates of a x4 level resized to 200 x 272: (K, H, W) float soft masks are 43.5 MB
    # (above glibc's largest mmap threshold, so that they cannot hide in resident heap pages);
    # the reference holds a chunk of 64 of them (14 MB) at a time.
    inputs = make_solo_score_inputs(1, 256, (50, 68), 200)
    chunk_bytes = 64 * 200 * 272 * 4

    def fused():
        solo_mask_scores(*inputs, size=(200, 272), threshold=0.5, backend="cpu")

    def reference():
        solo_mask_scores(*inputs, size=(200, 272), threshold=0.5, backend="reference")

    fused()  # first-call costs (thread pool, dispatcher caches) are not the op's
    fused_peak = peak_memory_increase(fused)
    reference_peak = peak_memory_increase(reference)
    assert fused_peak <= 2 * 2**20, fused_peak
    assert reference_peak >= chunk_bytes, (reference_peak, chunk_bytes)


def _bad_arguments():
    preds, image, channel = make_solo_score_inputs(2, 3, (4, 5), 3)
    return dict(mask_preds=preds, image=image, channel=channel)


@pytest.mark.parametrize("bad,message", [
    (dict(mask_preds=torch.rand(3, 4, 5)), "mask_preds must be (N, Q, h, w)"),
    (dict(mask_preds=torch.ones(2, 3, 4, 5, dtype=torch.int32)), "mask_preds must be float16"),
    (dict(mask_preds=torch.rand(2, 3, 0, 5)), "mask_preds' maps (h, w) must be at least 1 x 1"),
    (dict(image=torch.zeros(3, 1, dtype=torch.int64)), "image must be 1-D"),
    (dict(channel=torch.zeros(2, dtype=torch.int64)), "channel must have shape (K,) = (3,)"),
    (dict(channel=torch.zeros(3, dtype=torch.int32)), "channel must be int64"),
    (dict(image=torch.zeros(3, dtype=torch.float32)), "image must be int64"),
    (dict(image=torch.tensor([0, 2, 1])), "image must lie in [0, N) = [0, 2)"),
    (dict(channel=torch.tensor([0, -1, 1])), "channel must lie in [0, Q) = [0, 3)"),
    (dict(channel=torch.tensor([3, 0, 1])), "channel must lie in [0, Q) = [0, 3)"),
    (dict(channel=torch.zeros(3, dtype=torch.int64, device="meta")),
     "channel is on meta but mask_preds is on cpu"),
    (dict(size=(0, 5)), "size must be a pair of positive ints (H, W), got (0, 5)"),
    (dict(size=(5,)), "size must be a pair of positive ints"),
    (dict(size=(5.0, 6)), "size must be a pair of positive ints"),
    (dict(size=(True, 6)), "size must be a pair of positive ints"),
    (dict(logits=1), "logits must be a bool, got int"),
    (dict(threshold=float("nan")), "threshold must be a finite number"),
    (dict(threshold=None), "threshold must be a finite number"),
    (dict(mask_preds=[1.0, 2.0]), "mask_preds must be a torch.Tensor"),
    (dict(backend="gpu"), "backend must be one of reference, cpu, cuda, triton"),
])
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_bad_input_names_the_argument(bad, message, backend):
    arguments = _bad_arguments()
    arguments.update(size=(6, 7), threshold=0.5, logits=True, backend=backend)
    arguments.update(bad)
    tensors = [arguments.pop(name) for name in ("mask_preds", "image", "channel")]
    escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises((TypeError, ValueError), match=escaped):
        solo_mask_scores(*tensors, **arguments)


@pytest.mark.parametrize("op", ["solo_mask_scores", "solo_mask_scores_triton"])
@pytest.mark.parametrize("name,values", [("image", [0, 1, 2]), ("channel", [0, 3, 1]),
                                         ("channel", [0, -1, 1])])
def test_the_kernels_check_index_ranges_themselves(op, name, values):
    """Called directly (not through the public function), no op reads out of bounds."""
    if op == "solo_mask_scores_triton":
        _require("triton")
    preds, image, channel = make_solo_score_inputs(2, 3, (4, 5), 3)
    indices = dict(image=image, channel=channel)
    indices[name] = torch.tensor(values)
    with pytest.raises((RuntimeError, ValueError), match=name):
        getattr(torch.ops.solo_fast, op)(preds, indices["image"], indices["channel"], 6, 7,
                                         0.5, True)


@pytest.mark.parametrize("op", ["solo_mask_scores", "solo_mask_scores_triton"])
@pytest.mark.parametrize("size", [(0, 7), (6, -1)])
def test_the_kernels_check_sizes_themselves(op, size):
    if op == "solo_mask_scores_triton":
        _require("triton")
    preds, image, channel = make_solo_score_inputs(2, 3, (4, 5), 3)
    with pytest.raises((RuntimeError, ValueError), match="out_height|out_width|size"):
        getattr(torch.ops.solo_fast, op)(preds, image, channel, *size, 0.5, True)


def test_traces_under_torch_compile():
    inputs = make_solo_score_inputs(2, 5, (7, 9), 7)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def score(mask_preds, image, channel):
        area, soft_sum, _ = solo_mask_scores(mask_preds, image, channel, size=(21, 23),
                                          threshold=0.5, backend="cpu")
        return soft_sum / area.clamp(min=1)

    expected_area, expected_sum = solo_mask_scores_reference(*inputs, size=(21, 23),
                                                             threshold=0.5)
    torch.testing.assert_close(score(*inputs), expected_sum / expected_area.clamp(min=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("num_images,channels,resize,num",
                         SHAPES + [(1, 1600, ((200, 272), (200, 272)), 300),
                                   (2, 576, ((100, 136), (200, 272)), 300),
                                   (1, 256, ((50, 68), (200, 272)), 1000)])
def test_gpu_matches_reference(backend, dtype, logits, num_images, channels, resize, num):
    """On the GPU against the CPU reference (torch's CPU resize is the contract), then a
    second run for determinism."""
    _require(backend, "cuda")
    source, size = resize
    inputs = make_solo_score_inputs(num_images, channels, source, num, dtype=dtype,
                                    logits=logits, seed=num)
    on_gpu = [t.cuda() for t in inputs]
    area, soft_sum, _ = solo_mask_scores(*on_gpu, size=size, threshold=0.5, logits=logits,
                                      backend=backend)
    ref_area, ref_soft_sum = solo_mask_scores_reference(*inputs, size=size, threshold=0.5,
                                                        logits=logits)
    tol = 4 * torch.finfo(dtype).eps
    near = ((_reference_soft(*inputs, size, logits) - 0.5).abs() <= tol).sum((1, 2))
    assert ((area.cpu() - ref_area).abs() <= near).all()
    bound = 4 * torch.finfo(dtype).eps * ref_soft_sum + (0.5 + tol) * near
    assert ((soft_sum.cpu() - ref_soft_sum).abs() <= bound).all()
    again = solo_mask_scores(*on_gpu, size=size, threshold=0.5, logits=logits, backend=backend)
    for a, b in zip((area, soft_sum), again):
        assert torch.equal(a, b)
