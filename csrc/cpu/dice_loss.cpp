// Reassociation lets GCC vectorise the per-chunk float reductions below (each chunk is summed in
// SIMD lanes, then chunks are added in double in a fixed order, so results do not depend on the
// thread count). It must precede every include so that the shared math is inlined under the same
// options; it only affects this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("associative-math", "no-signed-zeros", "no-trapping-math")
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_kernel.h"
#include "cpu/huge_pages.h"
#include "dice_loss.h"
#include "op_checks.h"

namespace solo_fast {
namespace {

using dice_loss::GradCoefficients;

// Pixels per parallel task: big enough to amortise the task, small enough that a few masks still
// spread over every core.
constexpr int64_t kTaskPixels = 16384;
// Pixels summed in float before the partial sums move to double: bounds float rounding growth.
constexpr int64_t kFloatRun = 512;

// Sums a, b, c of pixels [begin, end) of one mask. Always inlined into the SIMD-cloned wrappers.
template <bool kLogits, typename pred_t, typename target_t, typename acc_t>
__attribute__((always_inline)) inline void chunk_sums(
    const pred_t* __restrict pred, const target_t* __restrict target, int64_t count,
    double* __restrict out) {
  double a = 0, b = 0, c = 0;
  for (int64_t start = 0; start < count; start += kFloatRun) {
    const int64_t stop = std::min(count, start + kFloatRun);
    acc_t run_a = 0, run_b = 0, run_c = 0;
    for (int64_t i = start; i < stop; ++i) {
      const acc_t value = static_cast<acc_t>(pred[i]);
      const acc_t t = static_cast<acc_t>(target[i]);
      const acc_t p = kLogits ? dice_loss::sigmoid_with_derivative(value).p : value;
      dice_loss::accumulate(p, t, run_a, run_b, run_c);
    }
    a += run_a;
    b += run_b;
    c += run_c;
  }
  out[0] = a;
  out[1] = b;
  out[2] = c;
}

template <bool kLogits, typename pred_t, typename target_t, typename acc_t>
__attribute__((always_inline)) inline void chunk_grad(
    const pred_t* __restrict pred, const target_t* __restrict target, int64_t count,
    GradCoefficients<acc_t> coef, pred_t* __restrict grad) {
  for (int64_t i = 0; i < count; ++i) {
    const acc_t value = static_cast<acc_t>(pred[i]);
    const acc_t t = static_cast<acc_t>(target[i]);
    grad[i] = static_cast<pred_t>(dice_loss::grad_element(value, t, coef, kLogits));
  }
}

// The float32 paths carry nearly all the work; they get SIMD clones. Other dtypes use the same
// templates without clones.
#define SOLO_FAST_FLOAT_CHUNK_KERNELS(TARGET_T)                                                  \
  SOLO_FAST_CPU_CLONES void chunk_sums_f32(                                                      \
      const float* pred, const TARGET_T* target, int64_t count, bool logits, double* out) {      \
    if (logits) {                                                                                \
      chunk_sums<true, float, TARGET_T, float>(pred, target, count, out);                        \
    } else {                                                                                     \
      chunk_sums<false, float, TARGET_T, float>(pred, target, count, out);                       \
    }                                                                                            \
  }                                                                                              \
  SOLO_FAST_CPU_CLONES void chunk_grad_f32(                                                      \
      const float* pred, const TARGET_T* target, int64_t count, bool logits,                     \
      GradCoefficients<float> coef, float* grad) {                                               \
    if (logits) {                                                                                \
      chunk_grad<true, float, TARGET_T, float>(pred, target, count, coef, grad);                 \
    } else {                                                                                     \
      chunk_grad<false, float, TARGET_T, float>(pred, target, count, coef, grad);                \
    }                                                                                            \
  }

SOLO_FAST_FLOAT_CHUNK_KERNELS(uint8_t)
SOLO_FAST_FLOAT_CHUNK_KERNELS(float)
#undef SOLO_FAST_FLOAT_CHUNK_KERNELS

template <typename pred_t, typename target_t>
void chunk_sums_any(const pred_t* pred, const target_t* target, int64_t count, bool logits,
                    double* out) {
  using acc_t = at::opmath_type<pred_t>;
  if constexpr (std::is_same_v<pred_t, float>) {
    chunk_sums_f32(pred, target, count, logits, out);
  } else if (logits) {
    chunk_sums<true, pred_t, target_t, acc_t>(pred, target, count, out);
  } else {
    chunk_sums<false, pred_t, target_t, acc_t>(pred, target, count, out);
  }
}

template <typename pred_t, typename target_t>
void chunk_grad_any(const pred_t* pred, const target_t* target, int64_t count, bool logits,
                    GradCoefficients<at::opmath_type<pred_t>> coef, pred_t* grad) {
  using acc_t = at::opmath_type<pred_t>;
  if constexpr (std::is_same_v<pred_t, float>) {
    chunk_grad_f32(pred, target, count, logits, coef, grad);
  } else if (logits) {
    chunk_grad<true, pred_t, target_t, acc_t>(pred, target, count, coef, grad);
  } else {
    chunk_grad<false, pred_t, target_t, acc_t>(pred, target, count, coef, grad);
  }
}

// Dispatches pred over the floating types and target over {bytes, pred's dtype}: bool and uint8
// masks are both read as bytes (bool storage is 0/1).
template <typename Fn>
void dispatch_pred_target(const at::Tensor& pred, const at::Tensor& target, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dice_loss", [&] {
    if (target.scalar_type() == at::kByte || target.scalar_type() == at::kBool) {
      fn(scalar_t{}, uint8_t{});
    } else {
      fn(scalar_t{}, scalar_t{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dice_loss_forward_cpu(
    const at::Tensor& pred_in, const at::Tensor& target_in, bool logits, double eps) {
  check_dice_inputs(pred_in, target_in, "dice_loss_forward");
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t num_masks = pred.size(0);
  const int64_t pixels = pred.size(1);
  at::Tensor sums = at::zeros({num_masks, 3}, pred.options().dtype(at::kDouble));
  at::Tensor loss = at::empty({num_masks}, pred.options());
  if (num_masks == 0) {
    return {loss, sums};
  }

  const int64_t chunks = std::max<int64_t>(1, (pixels + kTaskPixels - 1) / kTaskPixels);
  std::vector<double> partials(num_masks * chunks * 3, 0.0);
  dispatch_pred_target(pred, target, [&](auto pred_tag, auto target_tag) {
    using pred_t = decltype(pred_tag);
    using target_t = decltype(target_tag);
    const pred_t* pred_data = ptr<pred_t>(pred);
    const target_t* target_data = ptr<target_t>(target);
    at::parallel_for(0, num_masks * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t mask = task / chunks;
        const int64_t begin = (task % chunks) * kTaskPixels;
        const int64_t count = std::max<int64_t>(0, std::min(pixels - begin, kTaskPixels));
        const int64_t offset = mask * pixels + begin;
        chunk_sums_any(pred_data + offset, target_data + offset, count, logits,
                       partials.data() + task * 3);
      }
    });
  });

  double* sums_data = ptr<double>(sums);
  for (int64_t mask = 0; mask < num_masks; ++mask) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int k = 0; k < 3; ++k) {
        sums_data[mask * 3 + k] += partials[(mask * chunks + chunk) * 3 + k];
      }
    }
  }
  at::Tensor loss_double = at::empty({num_masks}, sums.options());
  double* loss_data = ptr<double>(loss_double);
  for (int64_t mask = 0; mask < num_masks; ++mask) {
    const double* s = sums_data + mask * 3;
    loss_data[mask] = dice_loss::loss_from_sums(s[0], s[1], s[2], eps);
  }
  loss.copy_(loss_double);
  return {loss, sums};
}

at::Tensor dice_loss_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& pred_in,
                                  const at::Tensor& target_in, const at::Tensor& sums_in,
                                  bool logits, double eps) {
  check_dice_inputs(pred_in, target_in, "dice_loss_backward");
  const int64_t num_masks = pred_in.size(0);
  check_grad_and_sums(grad_loss_in, sums_in, num_masks, pred_in, "dice_loss_backward",
                      "dice_loss_forward");
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.to(at::kDouble).contiguous();
  const at::Tensor sums = sums_in.to(at::kDouble).contiguous();
  const int64_t pixels = pred.size(1);
  at::Tensor grad = at::empty_like(pred);
  if (num_masks == 0 || pixels == 0) {
    return grad;
  }
  advise_huge_pages(grad);

  const int64_t chunks = (pixels + kTaskPixels - 1) / kTaskPixels;
  const double* g = ptr<double>(grad_loss);
  const double* s = ptr<double>(sums);
  dispatch_pred_target(pred, target, [&](auto pred_tag, auto target_tag) {
    using pred_t = decltype(pred_tag);
    using target_t = decltype(target_tag);
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* pred_data = ptr<pred_t>(pred);
    const target_t* target_data = ptr<target_t>(target);
    pred_t* grad_data = ptr<pred_t>(grad);
    at::parallel_for(0, num_masks * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t mask = task / chunks;
        const int64_t begin = (task % chunks) * kTaskPixels;
        const int64_t count = std::min(pixels - begin, kTaskPixels);
        const int64_t offset = mask * pixels + begin;
        const double* m = s + mask * 3;
        const GradCoefficients<double> coef =
            dice_loss::grad_coefficients(g[mask], m[0], m[1], m[2], eps);
        const GradCoefficients<acc_t> coef_acc{static_cast<acc_t>(coef.coef_p),
                                               static_cast<acc_t>(coef.coef_t)};
        chunk_grad_any(pred_data + offset, target_data + offset, count, logits, coef_acc,
                       grad_data + offset);
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("dice_loss_forward", &solo_fast::dice_loss_forward_cpu);
  m.impl("dice_loss_backward", &solo_fast::dice_loss_backward_cpu);
}
