// Reassociation lets GCC vectorise the per-row float64 sums below (each output row is summed in
// SIMD lanes in an order fixed at compile time, then rows are added in ascending order, so results
// do not depend on the thread count). The resize itself has no sum of more than two terms and its
// products and FMAs are explicit (solo_mask_scores.h), so reassociation cannot change it. It must
// precede every include so that the shared math is inlined under the same options; it only
// affects this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("associative-math", "no-signed-zeros", "no-trapping-math")
#endif

// C++ CPU kernel of solo_fast::solo_mask_scores (contract: csrc/solo_fast.cpp,
// solo_fast/ops/solo_mask_scores.py; arithmetic: solo_mask_scores.h).
//
// Candidates run in parallel, each wholly on one thread. Per candidate: the sigmoid of its h x w
// source map into a thread-local buffer, once; the width interpolation of every source row the
// output reads, once each (h x W values); then per output row the two interpolated source rows
// combined, thresholded, counted and summed (float64 per row, rows added in ascending order).
// The source indices and weights of both axes are computed once per call and shared by every
// candidate. Nothing of size K x H x W is stored. A candidate whose (image, channel) repeats the
// previous one in the visiting order (one cell scored for several classes) copies its result.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu/cpu_kernel.h"
#include "op_checks.h"
#include "solo_mask_scores.h"

// N=images, Q=channels of the level, K=candidates, h, w=source map, H, W=output map

// The per-pixel lambdas below must be inlined into the SIMD clones: GCC once left one out of line
// in the float16 clone, a call per pixel (3.5 ms against 0.07 ms for a 200 x 272 map).
#define SOLO_FAST_INLINE __attribute__((always_inline))

namespace solo_fast {
namespace {

namespace ms = mask_scores;

// One axis' taps, structure of arrays so that the loops over x load them as vectors.
template <typename acc_t>
struct Axis {
  std::vector<int32_t> i0, i1;
  std::vector<acc_t> l0, l1;
};

template <typename prob_t, typename acc_t>
Axis<acc_t> make_axis(int in, int out) {
  Axis<acc_t> axis;
  axis.i0.resize(out);
  axis.i1.resize(out);
  axis.l0.resize(out);
  axis.l1.resize(out);
  for (int dst = 0; dst < out; ++dst) {
    const ms::BilinearTap<acc_t> tap = ms::bilinear_tap<prob_t, acc_t>(in, out, dst);
    axis.i0[dst] = tap.i0;
    axis.i1[dst] = tap.i1;
    axis.l0[dst] = tap.l0;
    axis.l1[dst] = tap.l1;
  }
  return axis;
}

// What every candidate of a call shares.
template <typename acc_t>
struct Plan {
  int h, w, H, W;
  bool identity;  // h == H and w == W: s = p, no interpolation
  bool logits;
  acc_t threshold;
  const int32_t *y0, *y1, *x0, *x1;
  const acc_t *ly0, *ly1, *lx0, *lx1;
  const uint8_t* row_read;  // (h,) whether an output row reads source row i
};

// Adds the count and float64 sum of the soft values value(0 .. count - 1) above the threshold.
template <typename acc_t, typename Value>
__attribute__((always_inline)) inline void score_values(int64_t count, acc_t threshold,
                                                        const Value& value, int64_t& inside,
                                                        double& total) {
  // 32-bit lanes count as many pixels per instruction as the comparisons produce (a row has
  // fewer than 2^31 pixels); 64-bit ones would need a widening per vector.
  int32_t row_inside = 0;
  double sum = 0.0;
  for (int64_t x = 0; x < count; ++x) {
    const acc_t s = value(x);
    row_inside += ms::in_mask(s, threshold) ? 1 : 0;
    sum += static_cast<double>(ms::masked_value(s, threshold));
  }
  inside += row_inside;
  total += sum;
}

// One candidate: source map (h * w) -> (area, soft_sum). probs (h * w) and rows (h * W) are the
// thread's scratch buffers (unused when the map keeps its size).
template <typename prob_t, typename acc_t>
__attribute__((always_inline)) inline void score_candidate(const Plan<acc_t>& plan,
                                                           const prob_t* __restrict source,
                                                           acc_t* __restrict probs,
                                                           acc_t* __restrict rows,
                                                           int64_t* area, double* soft_sum) {
  const int64_t h = plan.h, w = plan.w, W = plan.W;
  int64_t inside = 0;
  double total = 0.0;
  if (plan.identity) {  // s = p: one pass over the source, in rows of w
    for (int64_t y = 0; y < h; ++y) {
      const prob_t* __restrict row = source + y * w;
      if (plan.logits) {
        score_values(w, plan.threshold, [&](int64_t x) SOLO_FAST_INLINE {
          return ms::source_prob<prob_t>(static_cast<acc_t>(row[x]), true);
        }, inside, total);
      } else {
        score_values(w, plan.threshold, [&](int64_t x) SOLO_FAST_INLINE {
          return static_cast<acc_t>(row[x]);
        }, inside, total);
      }
    }
    *area = inside;
    *soft_sum = total;
    return;
  }
  if (plan.logits) {
    for (int64_t i = 0; i < h * w; ++i) {
      probs[i] = ms::source_prob<prob_t>(static_cast<acc_t>(source[i]), true);
    }
  } else {
    for (int64_t i = 0; i < h * w; ++i) probs[i] = static_cast<acc_t>(source[i]);
  }
  for (int64_t i = 0; i < h; ++i) {
    if (!plan.row_read[i]) continue;
    const acc_t* __restrict p = probs + i * w;
    acc_t* __restrict r = rows + i * W;
    for (int64_t x = 0; x < W; ++x) {
      r[x] = ms::lerp(p[plan.x0[x]], plan.lx0[x], p[plan.x1[x]], plan.lx1[x]);
    }
  }
  for (int64_t y = 0; y < plan.H; ++y) {
    const acc_t* __restrict r0 = rows + static_cast<int64_t>(plan.y0[y]) * W;
    const acc_t* __restrict r1 = rows + static_cast<int64_t>(plan.y1[y]) * W;
    const acc_t l0 = plan.ly0[y], l1 = plan.ly1[y];
    score_values(W, plan.threshold, [&](int64_t x) SOLO_FAST_INLINE {
      return ms::round_to<prob_t>(ms::lerp(r0[x], l0, r1[x], l1));
    }, inside, total);
  }
  *area = inside;
  *soft_sum = total;
}

// The SIMD clones, one per dtype (target_clones takes no templates). The AVX-512 and AVX2 clones
// have FMA instructions; the baseline calls libm's fma, exact but slow.
#define SOLO_FAST_SCORE_CANDIDATE(name, prob_t, acc_t)                                         \
  SOLO_FAST_CPU_CLONES void name(const Plan<acc_t>& plan, const prob_t* source, acc_t* probs, \
                                 acc_t* rows, int64_t* area, double* soft_sum) {              \
    score_candidate<prob_t, acc_t>(plan, source, probs, rows, area, soft_sum);                \
  }
SOLO_FAST_SCORE_CANDIDATE(score_candidate_f32, float, float)
SOLO_FAST_SCORE_CANDIDATE(score_candidate_f64, double, double)
SOLO_FAST_SCORE_CANDIDATE(score_candidate_f16, at::Half, float)
SOLO_FAST_SCORE_CANDIDATE(score_candidate_bf16, at::BFloat16, float)
#undef SOLO_FAST_SCORE_CANDIDATE

inline void score_candidate_any(const Plan<float>& plan, const float* source, float* probs,
                                float* rows, int64_t* area, double* soft_sum) {
  score_candidate_f32(plan, source, probs, rows, area, soft_sum);
}
inline void score_candidate_any(const Plan<double>& plan, const double* source, double* probs,
                                double* rows, int64_t* area, double* soft_sum) {
  score_candidate_f64(plan, source, probs, rows, area, soft_sum);
}
inline void score_candidate_any(const Plan<float>& plan, const at::Half* source, float* probs,
                                float* rows, int64_t* area, double* soft_sum) {
  score_candidate_f16(plan, source, probs, rows, area, soft_sum);
}
inline void score_candidate_any(const Plan<float>& plan, const at::BFloat16* source,
                                float* probs, float* rows, int64_t* area, double* soft_sum) {
  score_candidate_bf16(plan, source, probs, rows, area, soft_sum);
}

std::tuple<at::Tensor, at::Tensor> solo_mask_scores_cpu(const at::Tensor& mask_preds_in,
                                                        const at::Tensor& image_in,
                                                        const at::Tensor& channel_in,
                                                        int64_t out_height, int64_t out_width,
                                                        double threshold, bool logits,
                                                        bool check_index) {
  constexpr const char* kOp = "solo_mask_scores";
  check_solo_mask_scores_inputs(mask_preds_in, image_in, channel_in, out_height, out_width,
                                check_index, kOp);
  const int64_t num = image_in.size(0);
  const int64_t channels = mask_preds_in.size(1);
  at::Tensor area = at::zeros({num}, mask_preds_in.options().dtype(at::kLong));
  at::Tensor soft_sum = at::zeros({num}, mask_preds_in.options().dtype(at::kDouble));
  const at::Tensor image_t = image_in.contiguous();
  const at::Tensor channel_t = channel_in.contiguous();
  const int64_t* image = ptr<const int64_t>(image_t);
  const int64_t* channel = ptr<const int64_t>(channel_t);
  if (num == 0) {
    return {area, soft_sum};
  }
  const at::Tensor preds = mask_preds_in.contiguous();  // (N, Q, h, w)
  const int h = static_cast<int>(preds.size(2)), w = static_cast<int>(preds.size(3));
  const int H = static_cast<int>(out_height), W = static_cast<int>(out_width);
  // Repeated (image, channel) pairs become neighbours, and each source map is read in order.
  std::vector<int64_t> visit(num);
  std::iota(visit.begin(), visit.end(), int64_t{0});
  std::stable_sort(visit.begin(), visit.end(), [&](int64_t a, int64_t b) {
    return std::tie(image[a], channel[a]) < std::tie(image[b], channel[b]);
  });
  int64_t* area_data = ptr<int64_t>(area);
  double* sum_data = ptr<double>(soft_sum);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preds.scalar_type(), kOp, [&] {
    using prob_t = scalar_t;
    using acc_t = at::opmath_type<prob_t>;
    const Axis<acc_t> ys = make_axis<prob_t, acc_t>(h, H);
    const Axis<acc_t> xs = make_axis<prob_t, acc_t>(w, W);
    std::vector<uint8_t> row_read(h, 0);  // downscaling skips source rows
    for (int y = 0; y < H; ++y) row_read[ys.i0[y]] = row_read[ys.i1[y]] = 1;
    const Plan<acc_t> plan{h, w, H, W, h == H && w == W, logits,
                           ms::threshold_as<prob_t, acc_t>(threshold),
                           ys.i0.data(), ys.i1.data(), xs.i0.data(), xs.i1.data(),
                           ys.l0.data(), ys.l1.data(), xs.l0.data(), xs.l1.data(),
                           row_read.data()};
    const prob_t* preds_data = ptr<const prob_t>(preds);
    const int64_t map_size = static_cast<int64_t>(h) * w;
    at::parallel_for(0, num, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> probs(plan.identity ? 0 : map_size);
      std::vector<acc_t> rows(plan.identity ? 0 : static_cast<int64_t>(h) * W);
      for (int64_t v = begin; v < end; ++v) {
        const int64_t k = visit[v];
        if (v > begin && image[visit[v - 1]] == image[k] && channel[visit[v - 1]] == channel[k]) {
          area_data[k] = area_data[visit[v - 1]];
          sum_data[k] = sum_data[visit[v - 1]];
          continue;
        }
        score_candidate_any(plan, preds_data + (image[k] * channels + channel[k]) * map_size,
                            probs.data(), rows.data(), area_data + k, sum_data + k);
      }
    });
  });
  return {area, soft_sum};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("solo_mask_scores", &solo_fast::solo_mask_scores_cpu);
}
