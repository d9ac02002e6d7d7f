// Reassociation lets GCC vectorise the per-chunk float reductions below (each chunk is summed in
// SIMD lanes, then chunks are added in double in a fixed order, so results do not depend on the
// thread count). It must precede every include so that the shared math is inlined under the same
// options; it only affects this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("associative-math", "no-signed-zeros", "no-trapping-math")
#endif

// C++ CPU kernels of solo_fast::decoupled_dice_loss_forward / _backward (contract:
// csrc/solo_fast.cpp, solo_fast/ops/decoupled_dice_loss.py; arithmetic: decoupled_dice_loss.h).
//
// A task is one image and one chunk of pixels. It first takes the sigmoid of every X and Y row of
// its image that some positive uses, once, into task-local buffers; then it runs over the image's
// positives in ascending k. The forward writes each positive's three sums of the chunk; the
// backward adds each positive's terms into task-local gradient rows and writes every gradient row
// of its image and chunk once at the end (zeros for unused rows). So:
// * one exp per used row and pixel, rather than two per positive and pixel (positives share rows);
// * the accumulation into rows shared by several positives never leaves one task: no races, no
//   atomics, and a fixed order, so results do not depend on the thread count;
// * nothing of size K x P is stored, neither the products nor the sigmoids.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_kernel.h"
#include "cpu/huge_pages.h"
#include "decoupled_dice_loss.h"
#include "op_checks.h"

// N=images, S=grid side, K=positives, P=pixels of a mask map, C=kChunk pixels of a task

namespace solo_fast {
namespace {

namespace dl = dice_loss;
namespace ddl = decoupled_dice_loss;
using dl::GradCoefficients;

// Pixels per task, which is also the length of every float run of a sum (512, as dice_loss.cpp's
// kFloatRun). The backward's six buffers of S x C floats (480 KiB at S = 40) stay in L2, while a
// 200 x 272 map still makes 107 tasks per image.
constexpr int64_t kChunk = 512;

// ---------------------------------------------------------------------------------------------
// Loops over the pixels of one chunk. Always inlined into the SIMD-cloned float32 wrappers.

template <bool kDerivative, typename pred_t, typename acc_t>
__attribute__((always_inline)) inline void sigmoid_run(const pred_t* __restrict z, int64_t count,
                                                       acc_t* __restrict p,
                                                       acc_t* __restrict dp) {
  for (int64_t i = 0; i < count; ++i) {
    const dl::Sigmoid<acc_t> s = dl::sigmoid_with_derivative(static_cast<acc_t>(z[i]));
    p[i] = s.p;
    if constexpr (kDerivative) dp[i] = s.dp;
  }
}

// a, b, c of one positive from the probabilities of its column (px) and row (py).
template <typename acc_t, typename target_t>
__attribute__((always_inline)) inline void positive_sums(
    const acc_t* __restrict px, const acc_t* __restrict py, const target_t* __restrict target,
    int64_t count, double* __restrict out) {
  acc_t a = 0, b = 0, c = 0;
  for (int64_t i = 0; i < count; ++i) {
    dl::accumulate(ddl::product(py[i], px[i]), static_cast<acc_t>(target[i]), a, b, c);
  }
  out[0] = a;
  out[1] = b;
  out[2] = c;
}

// Adds one positive's terms to the gradient sums of its column (gx) and its row (gy).
template <typename acc_t, typename target_t>
__attribute__((always_inline)) inline void positive_terms(
    const acc_t* __restrict px, const acc_t* __restrict py, const target_t* __restrict target,
    int64_t count, GradCoefficients<acc_t> coef, acc_t* __restrict gx, acc_t* __restrict gy) {
  for (int64_t i = 0; i < count; ++i) {
    const acc_t t = static_cast<acc_t>(target[i]);
    const acc_t p = ddl::product(py[i], px[i]);
    gx[i] += ddl::row_term(p, py[i], t, coef);
    gy[i] += ddl::row_term(p, px[i], t, coef);
  }
}

template <typename acc_t, typename pred_t>
__attribute__((always_inline)) inline void row_gradients(const acc_t* __restrict summed,
                                                         const acc_t* __restrict dp,
                                                         int64_t count, pred_t* __restrict grad) {
  for (int64_t i = 0; i < count; ++i) {
    grad[i] = static_cast<pred_t>(ddl::row_gradient(summed[i], dp[i]));
  }
}

// The float32 paths carry nearly all the work; they get SIMD clones. Other dtypes use the same
// templates without clones.
SOLO_FAST_CPU_CLONES void sigmoid_run_f32(const float* z, int64_t count, float* p, float* dp) {
  if (dp != nullptr) {
    sigmoid_run<true>(z, count, p, dp);
  } else {
    sigmoid_run<false>(z, count, p, dp);
  }
}

SOLO_FAST_CPU_CLONES void row_gradients_f32(const float* summed, const float* dp, int64_t count,
                                            float* grad) {
  row_gradients(summed, dp, count, grad);
}

#define SOLO_FAST_FLOAT_POSITIVE_KERNELS(TARGET_T)                                               \
  SOLO_FAST_CPU_CLONES void positive_sums_f32(const float* px, const float* py,                  \
                                              const TARGET_T* target, int64_t count,             \
                                              double* out) {                                     \
    positive_sums(px, py, target, count, out);                                                   \
  }                                                                                              \
  SOLO_FAST_CPU_CLONES void positive_terms_f32(const float* px, const float* py,                 \
                                               const TARGET_T* target, int64_t count,            \
                                               GradCoefficients<float> coef, float* gx,          \
                                               float* gy) {                                      \
    positive_terms(px, py, target, count, coef, gx, gy);                                         \
  }

SOLO_FAST_FLOAT_POSITIVE_KERNELS(uint8_t)
SOLO_FAST_FLOAT_POSITIVE_KERNELS(float)
#undef SOLO_FAST_FLOAT_POSITIVE_KERNELS

template <typename target_t>
constexpr bool kClonedTarget = std::is_same_v<target_t, uint8_t> || std::is_same_v<target_t, float>;

template <typename pred_t, typename acc_t>
void sigmoid_any(const pred_t* z, int64_t count, acc_t* p, acc_t* dp) {
  if constexpr (std::is_same_v<pred_t, float>) {
    sigmoid_run_f32(z, count, p, dp);
  } else if (dp != nullptr) {
    sigmoid_run<true>(z, count, p, dp);
  } else {
    sigmoid_run<false>(z, count, p, dp);
  }
}

template <typename acc_t, typename target_t>
void positive_sums_any(const acc_t* px, const acc_t* py, const target_t* target, int64_t count,
                       double* out) {
  if constexpr (std::is_same_v<acc_t, float> && kClonedTarget<target_t>) {
    positive_sums_f32(px, py, target, count, out);
  } else {
    positive_sums(px, py, target, count, out);
  }
}

template <typename acc_t, typename target_t>
void positive_terms_any(const acc_t* px, const acc_t* py, const target_t* target, int64_t count,
                        GradCoefficients<acc_t> coef, acc_t* gx, acc_t* gy) {
  if constexpr (std::is_same_v<acc_t, float> && kClonedTarget<target_t>) {
    positive_terms_f32(px, py, target, count, coef, gx, gy);
  } else {
    positive_terms(px, py, target, count, coef, gx, gy);
  }
}

template <typename acc_t, typename pred_t>
void row_gradients_any(const acc_t* summed, const acc_t* dp, int64_t count, pred_t* grad) {
  if constexpr (std::is_same_v<pred_t, float>) {
    row_gradients_f32(summed, dp, count, grad);
  } else {
    row_gradients(summed, dp, count, grad);
  }
}

// ---------------------------------------------------------------------------------------------
// Checks, and the positives grouped by image.

// The positives of image n are members[image_start[n] .. image_start[n + 1]), in ascending k;
// used_x[n * S + c] (used_y) tells whether some positive of image n uses X (Y) row c.
struct Layout {
  std::vector<int64_t> image_start;
  std::vector<int64_t> members;
  std::vector<uint8_t> used_x;
  std::vector<uint8_t> used_y;
};

// The indices were range-checked by check_decoupled_inputs (or by the caller, check_index false).
Layout make_layout(const at::Tensor& pos_image, const at::Tensor& pos_row,
                   const at::Tensor& pos_col, int64_t images, int64_t grids) {
  const int64_t positives = pos_image.size(0);
  const int64_t* image = ptr<const int64_t>(pos_image);
  const int64_t* row = ptr<const int64_t>(pos_row);
  const int64_t* col = ptr<const int64_t>(pos_col);
  Layout layout;
  layout.image_start.assign(images + 1, 0);
  layout.used_x.assign(images * grids, 0);
  layout.used_y.assign(images * grids, 0);
  for (int64_t k = 0; k < positives; ++k) {
    ++layout.image_start[image[k] + 1];
    layout.used_x[image[k] * grids + col[k]] = 1;
    layout.used_y[image[k] * grids + row[k]] = 1;
  }
  for (int64_t n = 0; n < images; ++n) layout.image_start[n + 1] += layout.image_start[n];
  std::vector<int64_t> cursor(layout.image_start.begin(), layout.image_start.end() - 1);
  layout.members.resize(positives);
  for (int64_t k = 0; k < positives; ++k) layout.members[cursor[image[k]]++] = k;
  return layout;
}

// Dispatches x over the floating types and target over {bytes, x's dtype}: bool and uint8 masks
// are both read as bytes (bool storage is 0/1).
template <typename Fn>
void dispatch_pred_target(const at::Tensor& x, const at::Tensor& target, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "decoupled_dice_loss", [&] {
    if (target.scalar_type() == at::kByte || target.scalar_type() == at::kBool) {
      fn(scalar_t{}, uint8_t{});
    } else {
      fn(scalar_t{}, scalar_t{});
    }
  });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// The ops.

std::tuple<at::Tensor, at::Tensor> decoupled_dice_loss_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& pos_image_in,
    const at::Tensor& pos_row_in, const at::Tensor& pos_col_in, const at::Tensor& target_in,
    double eps, bool check_index) {
  constexpr const char* kOp = "decoupled_dice_loss_forward";
  check_decoupled_inputs(x_in, y_in, pos_image_in, pos_row_in, pos_col_in, target_in,
                         check_index, kOp);
  const at::Tensor x = x_in.contiguous();  // (N, S, P)
  const at::Tensor y = y_in.contiguous();  // (N, S, P)
  const at::Tensor target = target_in.contiguous();  // (K, P)
  const at::Tensor pos_image = pos_image_in.contiguous();
  const at::Tensor pos_row = pos_row_in.contiguous();
  const at::Tensor pos_col = pos_col_in.contiguous();
  const int64_t images = x.size(0);
  const int64_t grids = x.size(1);
  const int64_t pixels = x.size(2);
  const int64_t positives = pos_image.size(0);
  at::Tensor sums = at::zeros({positives, 3}, x.options().dtype(at::kDouble));
  at::Tensor loss = at::empty({positives}, x.options());
  if (positives == 0) {
    return {loss, sums};
  }
  const Layout layout = make_layout(pos_image, pos_row, pos_col, images, grids);
  const int64_t* row = ptr<const int64_t>(pos_row);
  const int64_t* col = ptr<const int64_t>(pos_col);

  const int64_t chunks = ceil_div(pixels, kChunk);
  std::vector<double> partials(positives * chunks * 3, 0.0);  // (K, chunks, 3)
  dispatch_pred_target(x, target, [&](auto pred_tag, auto target_tag) {
    using pred_t = decltype(pred_tag);
    using target_t = decltype(target_tag);
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* x_data = ptr<const pred_t>(x);
    const pred_t* y_data = ptr<const pred_t>(y);
    const target_t* target_data = ptr<const target_t>(target);
    at::parallel_for(0, images * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
      // Row c of a side's buffer holds sigmoid(row c) over the task's chunk: (S, C) each.
      std::vector<acc_t> buffer(2 * grids * kChunk);
      acc_t* px = buffer.data();
      acc_t* py = px + grids * kChunk;
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t image = task / chunks;
        const int64_t chunk = task % chunks;
        const int64_t first = layout.image_start[image];
        const int64_t last = layout.image_start[image + 1];
        if (first == last) continue;
        const int64_t begin = chunk * kChunk;
        const int64_t count = std::min(pixels - begin, kChunk);
        for (int64_t c = 0; c < grids; ++c) {
          const int64_t offset = (image * grids + c) * pixels + begin;
          if (layout.used_x[image * grids + c]) {
            sigmoid_any<pred_t, acc_t>(x_data + offset, count, px + c * kChunk, nullptr);
          }
          if (layout.used_y[image * grids + c]) {
            sigmoid_any<pred_t, acc_t>(y_data + offset, count, py + c * kChunk, nullptr);
          }
        }
        for (int64_t m = first; m < last; ++m) {
          const int64_t k = layout.members[m];
          positive_sums_any(px + col[k] * kChunk, py + row[k] * kChunk,
                            target_data + k * pixels + begin, count,
                            partials.data() + (k * chunks + chunk) * 3);
        }
      }
    });
  });

  // Chunks in ascending order, in double: the same sums whatever the thread count.
  double* sums_data = ptr<double>(sums);
  at::Tensor loss_double = at::empty({positives}, sums.options());
  double* loss_data = ptr<double>(loss_double);
  for (int64_t k = 0; k < positives; ++k) {
    double* s = sums_data + k * 3;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int v = 0; v < 3; ++v) s[v] += partials[(k * chunks + chunk) * 3 + v];
    }
    loss_data[k] = dl::loss_from_sums(s[0], s[1], s[2], eps);
  }
  loss.copy_(loss_double);
  return {loss, sums};
}

std::tuple<at::Tensor, at::Tensor> decoupled_dice_loss_backward_cpu(
    const at::Tensor& grad_loss_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const at::Tensor& pos_image_in, const at::Tensor& pos_row_in, const at::Tensor& pos_col_in,
    const at::Tensor& target_in, const at::Tensor& sums_in, double eps, bool check_index) {
  constexpr const char* kOp = "decoupled_dice_loss_backward";
  check_decoupled_inputs(x_in, y_in, pos_image_in, pos_row_in, pos_col_in, target_in,
                         check_index, kOp);
  const int64_t positives = pos_image_in.size(0);
  check_grad_and_sums(grad_loss_in, sums_in, positives, x_in, kOp,
                      "decoupled_dice_loss_forward");
  const at::Tensor x = x_in.contiguous();  // (N, S, P)
  const at::Tensor y = y_in.contiguous();  // (N, S, P)
  const int64_t images = x.size(0);
  const int64_t grids = x.size(1);
  const int64_t pixels = x.size(2);
  if (positives == 0) {
    return {at::zeros_like(x), at::zeros_like(y)};
  }
  const at::Tensor target = target_in.contiguous();  // (K, P)
  const at::Tensor pos_image = pos_image_in.contiguous();
  const at::Tensor pos_row = pos_row_in.contiguous();
  const at::Tensor pos_col = pos_col_in.contiguous();
  const Layout layout = make_layout(pos_image, pos_row, pos_col, images, grids);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_y = at::empty_like(y);
  if (pixels == 0) {
    return {grad_x, grad_y};
  }
  advise_huge_pages(grad_x);
  advise_huge_pages(grad_y);

  // Per positive (coef_p, coef_t) in double, in dice_loss.h's order; (K, 2).
  const at::Tensor grad_loss = grad_loss_in.to(at::kDouble).contiguous();
  const at::Tensor sums = sums_in.to(at::kDouble).contiguous();
  std::vector<double> coefs(positives * 2);
  for (int64_t k = 0; k < positives; ++k) {
    const double* s = ptr<const double>(sums) + k * 3;
    const GradCoefficients<double> coef =
        dl::grad_coefficients(ptr<const double>(grad_loss)[k], s[0], s[1], s[2], eps);
    coefs[2 * k] = coef.coef_p;
    coefs[2 * k + 1] = coef.coef_t;
  }
  const int64_t* row = ptr<const int64_t>(pos_row);
  const int64_t* col = ptr<const int64_t>(pos_col);

  const int64_t chunks = ceil_div(pixels, kChunk);
  dispatch_pred_target(x, target, [&](auto pred_tag, auto target_tag) {
    using pred_t = decltype(pred_tag);
    using target_t = decltype(target_tag);
    using acc_t = at::opmath_type<pred_t>;
    const pred_t* x_data = ptr<const pred_t>(x);
    const pred_t* y_data = ptr<const pred_t>(y);
    const target_t* target_data = ptr<const target_t>(target);
    pred_t* grad_x_data = ptr<pred_t>(grad_x);
    pred_t* grad_y_data = ptr<pred_t>(grad_y);
    at::parallel_for(0, images * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
      // Per side, three (S, C) buffers: sigmoid, its derivative, and the summed terms.
      const int64_t side = grids * kChunk;
      std::vector<acc_t> buffer(6 * side);
      acc_t* px = buffer.data();
      acc_t* dpx = px + side;
      acc_t* gx = dpx + side;
      acc_t* py = gx + side;
      acc_t* dpy = py + side;
      acc_t* gy = dpy + side;
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t image = task / chunks;
        const int64_t chunk = task % chunks;
        const int64_t begin = chunk * kChunk;
        const int64_t count = std::min(pixels - begin, kChunk);
        const uint8_t* used_x = layout.used_x.data() + image * grids;
        const uint8_t* used_y = layout.used_y.data() + image * grids;
        for (int64_t c = 0; c < grids; ++c) {
          const int64_t offset = (image * grids + c) * pixels + begin;
          if (used_x[c]) {
            sigmoid_any<pred_t, acc_t>(x_data + offset, count, px + c * kChunk, dpx + c * kChunk);
            std::fill_n(gx + c * kChunk, count, acc_t(0));
          }
          if (used_y[c]) {
            sigmoid_any<pred_t, acc_t>(y_data + offset, count, py + c * kChunk, dpy + c * kChunk);
            std::fill_n(gy + c * kChunk, count, acc_t(0));
          }
        }
        for (int64_t m = layout.image_start[image]; m < layout.image_start[image + 1]; ++m) {
          const int64_t k = layout.members[m];
          const GradCoefficients<acc_t> coef{static_cast<acc_t>(coefs[2 * k]),
                                             static_cast<acc_t>(coefs[2 * k + 1])};
          positive_terms_any(px + col[k] * kChunk, py + row[k] * kChunk,
                             target_data + k * pixels + begin, count, coef, gx + col[k] * kChunk,
                             gy + row[k] * kChunk);
        }
        // Every gradient element of the image and chunk is written here, and only here.
        for (int64_t c = 0; c < grids; ++c) {
          const int64_t offset = (image * grids + c) * pixels + begin;
          if (used_x[c]) {
            row_gradients_any(gx + c * kChunk, dpx + c * kChunk, count, grad_x_data + offset);
          } else {
            std::fill_n(grad_x_data + offset, count, pred_t(0));
          }
          if (used_y[c]) {
            row_gradients_any(gy + c * kChunk, dpy + c * kChunk, count, grad_y_data + offset);
          } else {
            std::fill_n(grad_y_data + offset, count, pred_t(0));
          }
        }
      }
    });
  });
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("decoupled_dice_loss_forward", &solo_fast::decoupled_dice_loss_forward_cpu);
  m.impl("decoupled_dice_loss_backward", &solo_fast::decoupled_dice_loss_backward_cpu);
}
