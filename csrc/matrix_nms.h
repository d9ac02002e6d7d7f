// Per-pair arithmetic of Matrix NMS (docs/algorithms.md §11), shared by the CPU and CUDA kernels
// (and mirrored by kernels/matrix_nms.py) so that every backend rounds exactly as the reference
// (solo_fast.ops.reference.matrix_nms_reference) does.
//
// Candidates are sorted by descending score within each image. For a pair i < j of one image and
// one label, with inter = popcount(mask_i AND mask_j) (exact):
//   iou_ij  = inter / ((area_i + area_j) - inter)          in the areas' dtype
//   comp_i  = max(0, max over k < i of iou_ki)              (NaN propagates, as torch.max)
//   decay_j = min(1, min over i < j of ratio(f(iou_ij), f(comp_i)))   (NaN propagates)
//   f(x)    = exp(-sigma * x^2) (gaussian) or 1 - x (linear)
//   ratio   = f_iou / f_comp, except linear 0 / 0 = 0 (the reference's rule; gaussian keeps NaN).
// The reference divides two exponentials; forming exp(-sigma (d^2 - comp^2)) instead would round
// differently, so f is evaluated per value and divided, as there. f(comp_i) depends on i only,
// so a kernel may evaluate it once per row: the value is the one the reference computes per entry.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace solo_fast {
namespace matrix_nms {

// The `kernel` argument of matrix_nms_decay.
constexpr int64_t kGaussian = 0;
constexpr int64_t kLinear = 1;

// Pixels per packed word: bit b of word w is pixel 64 w + b of the row-major flattened mask.
constexpr int64_t kWordBits = 64;

// Exact in float32 up to 2^24 pixels per mask, as the reference's float GEMM.
template <typename scalar_t>
SOLO_FAST_HOST_DEVICE scalar_t iou(int64_t inter, scalar_t area_i, scalar_t area_j) {
  const scalar_t overlap = static_cast<scalar_t>(inter);
  return overlap / (area_i + area_j - overlap);
}

SOLO_FAST_HOST_DEVICE float exp_of(float x) { return ::expf(x); }
SOLO_FAST_HOST_DEVICE double exp_of(double x) { return ::exp(x); }

// f(x). neg_sigma is -sigma rounded to scalar_t, as torch rounds the Python scalar of
// `-1 * sigma * d**2` to the tensor's dtype before multiplying.
template <typename scalar_t>
SOLO_FAST_HOST_DEVICE scalar_t kernel_value(scalar_t x, int64_t kernel, scalar_t neg_sigma) {
  if (kernel == kGaussian) {
    return exp_of(neg_sigma * (x * x));
  }
  return scalar_t(1) - x;
}

// f(iou_ij) / f(comp_i) with the linear kernel's 0/0 -> 0 (a mask identical to i, which is itself
// identical to a higher-scored one, is fully suppressed rather than NaN).
template <typename scalar_t>
SOLO_FAST_HOST_DEVICE scalar_t ratio(scalar_t f_iou, scalar_t f_comp, int64_t kernel) {
  if (kernel == kLinear && f_iou == scalar_t(0) && f_comp == scalar_t(0)) {
    return scalar_t(0);
  }
  return f_iou / f_comp;
}

// torch.min / torch.max semantics: a NaN operand wins and stays.
template <typename scalar_t>
SOLO_FAST_HOST_DEVICE scalar_t min_nan(scalar_t current, scalar_t value) {
  return (value < current || value != value) ? value : current;
}

template <typename scalar_t>
SOLO_FAST_HOST_DEVICE scalar_t max_nan(scalar_t current, scalar_t value) {
  return (value > current || value != value) ? value : current;
}

}  // namespace matrix_nms
}  // namespace solo_fast
