// Per-element arithmetic of the SOLO dice loss, shared by the CPU and CUDA kernels so that both run
// the same operations in the same order (the CPU tests then exercise the CUDA arithmetic too).
//
// Per mask k over its P pixels, with p = sigmoid(z) (logits) or p = z (probabilities):
//   a = sum p*t,  b = sum p*p,  c = sum t*t,  D = (b + eps) + (c + eps),  L = 1 - 2a / D
//   dL/dp = 4a/D^2 * p - 2/D * t,  and with logits dL/dz = dL/dp * p (1 - p).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace solo_fast {
namespace dice_loss {

// e^x for x <= 0 in float, branch-free so that the CPU loop vectorises (std::exp does not) and the
// GPU runs the identical polynomial. Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a
// degree-6 minimax polynomial for e^r; error below 2 ulp. Inputs under -87 are clamped there
// (e^-87 = 1.6e-38, the smallest value whose 2^n scale is still a normal float).
SOLO_FAST_HOST_DEVICE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  return y * __int_as_float(bits);
#else
  return y * __builtin_bit_cast(float, bits);
#endif
}

SOLO_FAST_HOST_DEVICE double exp_nonpositive(double x) {
  return exp(x);
}

// sigmoid(z) and its derivative p(1-p) from e = exp(-|z|), accurate at both tails: the derivative
// is formed as e / (1 + e)^2 rather than p * (1 - p), which cancels to 0 for z > 17 in float.
template <typename acc_t>
struct Sigmoid {
  acc_t p;
  acc_t dp;
};

template <typename acc_t>
SOLO_FAST_HOST_DEVICE Sigmoid<acc_t> sigmoid_with_derivative(acc_t z) {
  const acc_t e = exp_nonpositive(z < acc_t(0) ? z : -z);
  const acc_t inv = acc_t(1) / (acc_t(1) + e);
  Sigmoid<acc_t> out;
  out.p = z < acc_t(0) ? e * inv : inv;
  out.dp = e * inv * inv;
  return out;
}

template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t probability(acc_t value, bool logits) {
  return logits ? sigmoid_with_derivative(value).p : value;
}

// The three running sums of one mask.
template <typename acc_t>
SOLO_FAST_HOST_DEVICE void accumulate(acc_t p, acc_t t, acc_t& a, acc_t& b, acc_t& c) {
  a += p * t;
  b += p * p;
  c += t * t;
}

template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t denominator(acc_t b, acc_t c, acc_t eps) {
  return (b + eps) + (c + eps);
}

template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t loss_from_sums(acc_t a, acc_t b, acc_t c, acc_t eps) {
  return acc_t(1) - acc_t(2) * a / denominator(b, c, eps);
}

// dL/dp = coef_p * p - coef_t * t, both coefficients already multiplied by the upstream gradient.
template <typename acc_t>
struct GradCoefficients {
  acc_t coef_p;
  acc_t coef_t;
};

template <typename acc_t>
SOLO_FAST_HOST_DEVICE GradCoefficients<acc_t> grad_coefficients(
    acc_t grad_loss, acc_t a, acc_t b, acc_t c, acc_t eps) {
  const acc_t inv_d = acc_t(1) / denominator(b, c, eps);
  GradCoefficients<acc_t> out;
  out.coef_p = grad_loss * acc_t(4) * a * inv_d * inv_d;
  out.coef_t = grad_loss * acc_t(2) * inv_d;
  return out;
}

// Gradient with respect to the kernel input (logit or probability) of one pixel.
template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t grad_element(
    acc_t value, acc_t t, GradCoefficients<acc_t> coef, bool logits) {
  if (logits) {
    const Sigmoid<acc_t> s = sigmoid_with_derivative(value);
    return (coef.coef_p * s.p - coef.coef_t * t) * s.dp;
  }
  return coef.coef_p * value - coef.coef_t * t;
}

}  // namespace dice_loss
}  // namespace solo_fast
