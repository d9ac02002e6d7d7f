// Per-element arithmetic of solo_mask_scores (vanilla SOLO's candidate scoring), shared by the CPU
// and CUDA kernels (and mirrored by kernels/solo_mask_scores.py) on top of dynamic_mask_scores.h:
// the sigmoid, the threshold, the area and the soft sum are those of the SOLOv2 op.
//
// Candidate k's soft mask is its source map p (h x w: sigmoid(mask_preds[n, q]) rounded to the
// inputs' dtype, or the probabilities as given) resized bilinearly to (H, W) with
// align_corners=False, exactly as torch's CPU kernel (upsample_generic_Nd_kernel_impl) computes it.
// That arithmetic was found by comparing candidate formulas with F.interpolate bit for bit
// (torch 2.14, x86-64 AVX-512 dispatch; float32 and float64: 0 mismatches in 522k pixels of
// upscaled, downscaled and one-axis-identity maps; float16 / bfloat16 likewise):
//   * per axis, scale = in / out in acc_t; src = fma(scale, dst + 0.5, -0.5) clamped below at 0
//     (torch's build contracts it); i0 = min(floor(float(src)), in - 1) (floorf, even for
//     double); l1 = clamp(src - i0, 0, 1); i1 = i0 + (i0 < in - 1); in == out: i0 = i1 = dst,
//     l0 = 1, l1 = 0. The weights are stored in the inputs' dtype: float16 / bfloat16 round l1,
//     and l0 = 1 - l1 is formed from that rounded l1 and rounded again;
//   * width first, then the two rows: r = fma(p[i][j0], l0x, p[i][j1] * l1x) per source row,
//     s = fma(r0, l0y, r1 * l1y), all in acc_t (float32 for float16 / bfloat16) and rounded once
//     to the inputs' dtype. Every other order or contraction mismatches 7-35% of the pixels.
// Exception, not reproduced: for H + W <= 128 torch switches to a kernel vectorised over channels
// whose four-term sum (w00 = l0y * l0x, ...) rounds differently in the last bit (~30% of pixels
// of a 7x9 -> 37x53 float32 map differ by an ulp); near-threshold pixels may then differ.
//
// Contraction: the host compiler may fuse a*b + c into an FMA (and nvcc does by default), so
// every product and FMA here is explicit and no expression leaves one to the compiler.
#pragma once

#include "dynamic_mask_scores.h"

namespace solo_fast {
namespace mask_scores {

// a * b rounded once, never fused into a neighbouring add.
SOLO_FAST_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SOLO_FAST_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// a * b + c rounded once (a hardware FMA; on a host without one, libm's exact emulation).
SOLO_FAST_HOST_DEVICE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

SOLO_FAST_HOST_DEVICE double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return __builtin_fma(a, b, c);
#endif
}

// One output coordinate's two source indices and weights along one axis.
template <typename acc_t>
struct BilinearTap {
  int i0;
  int i1;
  acc_t l0;
  acc_t l1;
};

// Output coordinate dst of an axis resized from `in` to `out` samples (align_corners=False, no
// scale factor given), with torch's arithmetic (file comment).
template <typename prob_t, typename acc_t>
SOLO_FAST_HOST_DEVICE BilinearTap<acc_t> bilinear_tap(int in, int out, int dst) {
  if (in == out) {
    return {dst, dst, acc_t(1), acc_t(0)};
  }
  const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
  acc_t src = fma_rn(scale, static_cast<acc_t>(dst) + acc_t(0.5), acc_t(-0.5));
  src = src < acc_t(0) ? acc_t(0) : src;
  int i0 = static_cast<int>(floorf(static_cast<float>(src)));
  i0 = i0 < in - 1 ? i0 : in - 1;
  acc_t l1 = src - static_cast<acc_t>(i0);
  l1 = l1 < acc_t(0) ? acc_t(0) : (l1 > acc_t(1) ? acc_t(1) : l1);
  l1 = round_to<prob_t>(l1);
  const acc_t l0 = round_to<prob_t>(acc_t(1) - l1);
  return {i0, i0 + (i0 < in - 1 ? 1 : 0), l0, l1};
}

// a * la + b * lb the way torch's build contracts it: the first product fused into the add.
template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t lerp(acc_t a, acc_t la, acc_t b, acc_t lb) {
  return fma_rn(a, la, mul_rn(b, lb));
}

// The soft value from the four source probabilities p[y.i0][x.i0], p[y.i0][x.i1],
// p[y.i1][x.i0], p[y.i1][x.i1] (in acc_t), as torch stores it.
template <typename prob_t, typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t bilinear_soft(acc_t p00, acc_t p01, acc_t p10, acc_t p11,
                                          const BilinearTap<acc_t>& y,
                                          const BilinearTap<acc_t>& x) {
  const acc_t r0 = lerp(p00, x.l0, p01, x.l1);
  const acc_t r1 = lerp(p10, x.l0, p11, x.l1);
  return round_to<prob_t>(lerp(r0, y.l0, r1, y.l1));
}

// A source sample as the resize reads it: sigmoid(v) rounded to the inputs' dtype (logits), or v.
template <typename prob_t, typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t source_prob(acc_t v, bool logits) {
  return logits ? soft_from_logit<prob_t>(v) : v;
}

}  // namespace mask_scores
}  // namespace solo_fast
