// Per-element arithmetic of the candidate-scoring ops, shared by the CPU and CUDA kernels of
// dynamic_mask_scores (SOLOv2) and, through decoupled_mask_scores.h, decoupled_mask_scores (and
// mirrored by kernels/dynamic_mask_scores.py, kernels/decoupled_mask_scores.py).
//
// Candidate k's soft mask s at a pixel is sigmoid(z) with z = kernels[k] . mask_feats[image[k]]
// (SOLOv2) or y_probs[image, row] * x_probs[image, col] (Decoupled SOLO). Over the P pixels:
//   area[k] = #{s > threshold},  soft_sum[k] = sum of s over those pixels.
// mmdetection thresholds a float tensor against a Python float: torch compares in the tensor's
// dtype, so the threshold is first rounded to it (0.5 is exact; 0.3 becomes 0.30000001f), and
// float16 / bfloat16 logits and soft values are rounded to the inputs' dtype (round_to).
//
// The sigmoid: torch forms 1 / (1 + exp(-z)) in the input precision. Here, for z >= 0 (the only
// pixels that can pass a threshold >= 0.5), the same formula with e = exp(-z) from dice_loss.h's
// branch-free exp (under 2 ulp, so that the CPU loop vectorises and the GPU runs the identical
// polynomial); for z < 0 the equal e / (1 + e) with e = exp(z), which stays finite. Where torch's
// exp(-z) overflows (z < -88.72 in float) its sigmoid is exactly 0, and so is this one. The
// thresholded set then equals the reference's except at pixels whose soft value lies within a
// few ulp of the threshold, the same margin the GEMM's summation order already leaves.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "dice_loss.h"

namespace solo_fast {
namespace mask_scores {

// Below this logit torch's float exp(-z) overflows to inf and its sigmoid is 0 (float64 reaches
// that only below -709.78, where this returns exp(z) ~ 1e-308 instead: no threshold tells).
constexpr float kFloatSigmoidZeroBelow = -88.7228394f;

template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t sigmoid(acc_t z) {
  const acc_t e = dice_loss::exp_nonpositive(z < acc_t(0) ? z : -z);
  const acc_t s = z < acc_t(0) ? e / (acc_t(1) + e) : acc_t(1) / (acc_t(1) + e);
  return z < acc_t(kFloatSigmoidZeroBelow) && sizeof(acc_t) == 4 ? acc_t(0) : s;
}

// float -> bfloat16 -> float with c10::BFloat16's rounding (nearest even), without a branch: c10's
// conversion branches on NaN, which kept the CPU loops that round every pixel scalar (~20x slower
// than float32), and so did a select of c10's constant NaN (GCC threads it through the threshold
// tests). A NaN keeps its sign and payload's top bits, quietened: still a NaN, as in c10.
SOLO_FAST_HOST_DEVICE float round_to_bfloat16(float value) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(value);
#else
  const uint32_t bits = __builtin_bit_cast(uint32_t, value);
#endif
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  const uint32_t quiet_nan = (bits | 0x00400000u) & 0xFFFF0000u;
  const uint32_t out = (bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(out);
#else
  return __builtin_bit_cast(float, out);
#endif
}

// torch stores every intermediate (the logit, the sigmoid, the product) in the inputs' dtype and
// compares in it: kernels that compute in acc_t (float32 for float16 / bfloat16 inputs) round
// each of those values to prob_t and back. The identity for float32 and float64 inputs.
template <typename prob_t, typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t round_to(acc_t value) {
  if constexpr (std::is_same_v<prob_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return round_to_bfloat16(value);
  } else {
    return static_cast<acc_t>(static_cast<prob_t>(value));
  }
}

// The threshold in the comparison's precision (see above).
template <typename prob_t, typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t threshold_as(double threshold) {
  return static_cast<acc_t>(static_cast<prob_t>(static_cast<acc_t>(threshold)));
}

// The soft value of a pixel of logit z, as torch would store it.
template <typename prob_t, typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t soft_from_logit(acc_t z) {
  return round_to<prob_t>(sigmoid(round_to<prob_t>(z)));
}

// Whether a pixel of soft value s belongs to the binary mask.
template <typename acc_t>
SOLO_FAST_HOST_DEVICE bool in_mask(acc_t s, acc_t threshold) {
  return s > threshold;
}

// What the pixel adds to soft_sum: s inside the mask, 0 outside (the reference's s * mask).
template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t masked_value(acc_t s, acc_t threshold) {
  return in_mask(s, threshold) ? s : acc_t(0);
}

}  // namespace mask_scores
}  // namespace solo_fast
