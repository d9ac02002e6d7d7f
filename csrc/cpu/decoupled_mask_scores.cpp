// Reassociation lets GCC vectorise the per-chunk reductions below (each chunk is summed in SIMD
// lanes in an order fixed at compile time, then chunks are added in a fixed order, so results do
// not depend on the thread count). It must precede every include so that the shared math is
// inlined under the same options; it only affects this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("associative-math", "no-signed-zeros", "no-trapping-math")
#endif

// C++ CPU kernel of solo_fast::decoupled_mask_scores (contract: csrc/solo_fast.cpp,
// solo_fast/ops/decoupled_mask_scores.py; arithmetic: decoupled_mask_scores.h).
//
// One streaming pass per candidate over its two rows (y_probs[n, i] and x_probs[n, j]): product,
// threshold, count and float64 soft sum, nothing stored. Candidates run in parallel, each wholly
// on one thread, chunk after chunk in ascending order, so the result does not depend on the
// thread count. They are visited in (image, row, col) order: consecutive candidates of one cell
// or one row then read a Y row (217 KB at 200 x 272 in float) that is still in L2, and only the X
// row comes from L3 or memory.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_kernel.h"
#include "decoupled_mask_scores.h"
#include "op_checks.h"

// N=images, C=channels of the concatenated levels, K=candidates, P=pixels of a mask map

namespace solo_fast {
namespace {

namespace ms = mask_scores;

// Pixels summed in SIMD lanes before the running float64 total takes them: short enough that the
// lanes' partial sums stay exact to float64 rounding of a few hundred floats.
constexpr int64_t kChunk = 2048;

template <typename prob_t, typename acc_t>
__attribute__((always_inline)) inline void score_pair(const prob_t* __restrict py,
                                                      const prob_t* __restrict px,
                                                      int64_t pixels, acc_t threshold,
                                                      int64_t* __restrict area,
                                                      double* __restrict soft_sum) {
  int64_t inside = 0;
  double total = 0.0;
  for (int64_t begin = 0; begin < pixels; begin += kChunk) {
    const int64_t end = std::min(begin + kChunk, pixels);
    double sum = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      const acc_t s = ms::decoupled_soft<prob_t>(static_cast<acc_t>(py[i]), static_cast<acc_t>(px[i]));
      inside += ms::in_mask(s, threshold) ? 1 : 0;
      sum += static_cast<double>(ms::masked_value(s, threshold));
    }
    total += sum;
  }
  *area = inside;
  *soft_sum = total;
}

SOLO_FAST_CPU_CLONES void score_pair_f32(const float* py, const float* px, int64_t pixels,
                                         float threshold, int64_t* area, double* soft_sum) {
  score_pair(py, px, pixels, threshold, area, soft_sum);
}

template <typename prob_t, typename acc_t>
void score_pair_any(const prob_t* py, const prob_t* px, int64_t pixels, acc_t threshold,
                    int64_t* area, double* soft_sum) {
  if constexpr (std::is_same_v<prob_t, float>) {
    score_pair_f32(py, px, pixels, threshold, area, soft_sum);
  } else {
    score_pair<prob_t, acc_t>(py, px, pixels, threshold, area, soft_sum);
  }
}

std::tuple<at::Tensor, at::Tensor> decoupled_mask_scores_cpu(
    const at::Tensor& x_probs_in, const at::Tensor& y_probs_in, const at::Tensor& image_in,
    const at::Tensor& row_in, const at::Tensor& col_in, double threshold, bool check_index) {
  constexpr const char* kOp = "decoupled_mask_scores";
  check_decoupled_mask_scores_inputs(x_probs_in, y_probs_in, image_in, row_in, col_in,
                                     check_index, kOp);
  const int64_t num = image_in.size(0);
  const int64_t channels = x_probs_in.size(1);
  const int64_t pixels = x_probs_in.size(2);
  at::Tensor area = at::zeros({num}, x_probs_in.options().dtype(at::kLong));
  at::Tensor soft_sum = at::zeros({num}, x_probs_in.options().dtype(at::kDouble));
  const at::Tensor image_t = image_in.contiguous();
  const at::Tensor row_t = row_in.contiguous();
  const at::Tensor col_t = col_in.contiguous();
  const int64_t* image = ptr<const int64_t>(image_t);
  const int64_t* row = ptr<const int64_t>(row_t);
  const int64_t* col = ptr<const int64_t>(col_t);
  if (num == 0 || pixels == 0) {
    return {area, soft_sum};
  }
  const at::Tensor x = x_probs_in.contiguous();  // (N, C, P)
  const at::Tensor y = y_probs_in.contiguous();  // (N, C, P)
  std::vector<int64_t> visit(num);
  std::iota(visit.begin(), visit.end(), int64_t{0});
  std::stable_sort(visit.begin(), visit.end(), [&](int64_t a, int64_t b) {
    return std::tie(image[a], row[a], col[a]) < std::tie(image[b], row[b], col[b]);
  });
  int64_t* area_data = ptr<int64_t>(area);
  double* sum_data = ptr<double>(soft_sum);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using prob_t = scalar_t;
    using acc_t = at::opmath_type<prob_t>;
    const acc_t thr = ms::threshold_as<prob_t, acc_t>(threshold);
    const prob_t* x_data = ptr<const prob_t>(x);
    const prob_t* y_data = ptr<const prob_t>(y);
    // 8 candidates a grain: consecutive ones share Y rows, which one thread should then read.
    at::parallel_for(0, num, 8, [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        const int64_t k = visit[v];
        score_pair_any<prob_t, acc_t>(y_data + (image[k] * channels + row[k]) * pixels,
                                      x_data + (image[k] * channels + col[k]) * pixels, pixels,
                                      thr, area_data + k, sum_data + k);
      }
    });
  });
  return {area, soft_sum};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("decoupled_mask_scores", &solo_fast::decoupled_mask_scores_cpu);
}
