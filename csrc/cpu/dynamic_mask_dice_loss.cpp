// Reassociation lets GCC vectorise the per-tile float reductions below (each row of a tile is
// summed in SIMD lanes, then tiles are added in double in a fixed order, so results do not depend
// on the thread count). It must precede every include so that the shared math is inlined under
// the same options; it only affects this file (the GEMMs run in MKL, untouched).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("associative-math", "no-signed-zeros", "no-trapping-math")
#endif

// C++ CPU kernels of solo_fast::dynamic_mask_dice_loss_forward / _backward (contract:
// csrc/solo_fast.cpp, solo_fast/ops/dynamic_mask_dice_loss.py; per-pixel arithmetic: dice_loss.h).
//
// The positives are grouped by image (stable, so ascending k within an image). A task is one
// image and one span of kTilesPerTask tiles of kTile pixels; for each tile it runs the GEMM
//   Z = kernels_n (K_n x E) @ mask_feats[n][:, tile] (E x T)
// into a task-local (K_n, T) buffer that stays in L2, then the epilogue on that buffer while it is
// in cache: the forward reduces sigmoid(Z) against the targets into per-(positive, tile) partial
// sums; the backward turns Z into dL/dZ in place and runs two more GEMMs,
//   grad_mask_feats[n][:, tile] = kernels_n^T @ dL/dZ   (the task owns these columns: no race),
//   partial_n[span] += dL/dZ @ mask_feats[n][:, tile]^T (a task-local (K_n, E) sum),
// and the spans' partials of grad_kernels are added in double in span order at the end. So
// nothing of size K x P is ever stored, and no float is accumulated by two threads: the results
// do not depend on the thread count.
//
// The GEMMs are MKL calls made single-threaded inside at::parallel_for (GemmTaskScope,
// cpu/gemm_task.h): one task per core, each GEMM small enough that its tile stays in L2 for the
// epilogue.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_kernel.h"
#include "cpu/gemm_task.h"
#include "cpu/huge_pages.h"
#include "dice_loss.h"
#include "op_checks.h"

// N=images, E=mask-feature channels, K=positives, K_n=positives of image n, P=pixels of a mask
// map, T=kTile pixels of a tile

namespace solo_fast {
namespace {

namespace dl = dice_loss;
using dl::GradCoefficients;

// Pixels per tile, which is also the length of every float run of a sum (as dice_loss.cpp's). At
// the canonical K_n = 200, E = 256 the tile's logits (400 KiB) and features (512 KiB) stay in L2.
constexpr int64_t kTile = 512;
// Tiles per task: the span of pixels whose grad_kernels partial one task sums (a (K_n, E) buffer
// per span). A 200 x 272 map gives 14 tasks per image.
constexpr int64_t kTilesPerTask = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Epilogues on one row of a tile. Always inlined into the SIMD-cloned float32 wrappers.

template <typename acc_t, typename target_t>
__attribute__((always_inline)) inline void row_sums(const acc_t* __restrict z,
                                                    const target_t* __restrict target,
                                                    int64_t count, double* __restrict out) {
  acc_t a = 0, b = 0, c = 0;
  for (int64_t i = 0; i < count; ++i) {
    dl::accumulate(dl::probability(z[i], /*logits=*/true), static_cast<acc_t>(target[i]), a, b,
                   c);
  }
  out[0] = a;
  out[1] = b;
  out[2] = c;
}

// Overwrites the logits of one row with dL/dz.
template <typename acc_t, typename target_t>
__attribute__((always_inline)) inline void row_grad(acc_t* __restrict z,
                                                    const target_t* __restrict target,
                                                    int64_t count, GradCoefficients<acc_t> coef) {
  for (int64_t i = 0; i < count; ++i) {
    z[i] = dl::grad_element(z[i], static_cast<acc_t>(target[i]), coef, /*logits=*/true);
  }
}

#define SOLO_FAST_FLOAT_ROW_KERNELS(TARGET_T)                                                   \
  SOLO_FAST_CPU_CLONES void row_sums_f32(const float* z, const TARGET_T* target, int64_t count, \
                                         double* out) {                                        \
    row_sums(z, target, count, out);                                                            \
  }                                                                                             \
  SOLO_FAST_CPU_CLONES void row_grad_f32(float* z, const TARGET_T* target, int64_t count,       \
                                         GradCoefficients<float> coef) {                        \
    row_grad(z, target, count, coef);                                                           \
  }

SOLO_FAST_FLOAT_ROW_KERNELS(uint8_t)
SOLO_FAST_FLOAT_ROW_KERNELS(float)
#undef SOLO_FAST_FLOAT_ROW_KERNELS

template <typename acc_t, typename target_t>
void row_sums_any(const acc_t* z, const target_t* target, int64_t count, double* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    row_sums_f32(z, target, count, out);
  } else {
    row_sums(z, target, count, out);
  }
}

template <typename acc_t, typename target_t>
void row_grad_any(acc_t* z, const target_t* target, int64_t count, GradCoefficients<acc_t> coef) {
  if constexpr (std::is_same_v<acc_t, float>) {
    row_grad_f32(z, target, count, coef);
  } else {
    row_grad(z, target, count, coef);
  }
}

// ---------------------------------------------------------------------------------------------
// The positives grouped by image, and the tasks.

// Row r of the sorted kernels is positive members[r]; image n owns rows
// image_start[n] .. image_start[n + 1], in ascending k.
struct Layout {
  std::vector<int64_t> image_start;
  std::vector<int64_t> members;
  at::Tensor members_tensor;  // (K,) int64, members as a tensor for index_select
  int64_t largest_image = 0;  // max K_n
};

// The indices were range-checked by check_dynamic_mask_inputs (or by the caller, check_index
// false).
Layout make_layout(const at::Tensor& pos_image, int64_t images) {
  const int64_t positives = pos_image.size(0);
  const int64_t* image = ptr<const int64_t>(pos_image);
  Layout layout;
  layout.image_start.assign(images + 1, 0);
  for (int64_t k = 0; k < positives; ++k) ++layout.image_start[image[k] + 1];
  for (int64_t n = 0; n < images; ++n) {
    layout.largest_image = std::max(layout.largest_image, layout.image_start[n + 1]);  // K_n
    layout.image_start[n + 1] += layout.image_start[n];
  }
  layout.members_tensor = at::empty({positives}, pos_image.options());
  int64_t* members = ptr<int64_t>(layout.members_tensor);
  std::vector<int64_t> cursor(layout.image_start.begin(), layout.image_start.end() - 1);
  for (int64_t k = 0; k < positives; ++k) members[cursor[image[k]]++] = k;
  layout.members.assign(members, members + positives);
  return layout;
}

// Dispatches over float and double (half inputs are upcast before) and the target over
// {bytes, the compute dtype}: bool and uint8 masks are both read as bytes (bool storage is 0/1).
template <typename Fn>
void dispatch_types(const at::Tensor& kernels, const at::Tensor& target, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES(kernels.scalar_type(), "dynamic_mask_dice_loss", [&] {
    if (target.scalar_type() == at::kByte || target.scalar_type() == at::kBool) {
      fn(scalar_t{}, uint8_t{});
    } else {
      fn(scalar_t{}, scalar_t{});
    }
  });
}

bool is_half(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// float16 / bfloat16 run in float32 (one copy of the inputs): MKL has no fast half GEMM on CPU.
at::Tensor as_float_target(const at::Tensor& target) {
  return is_half(target) ? target.to(at::kFloat) : target;
}

// ---------------------------------------------------------------------------------------------
// The ops.

std::tuple<at::Tensor, at::Tensor> dynamic_mask_dice_loss_forward_cpu(
    const at::Tensor& kernels_in, const at::Tensor& mask_feats_in, const at::Tensor& pos_image_in,
    const at::Tensor& target_in, double eps, bool check_index) {
  constexpr const char* kOp = "dynamic_mask_dice_loss_forward";
  check_dynamic_mask_inputs(kernels_in, mask_feats_in, pos_image_in, target_in, check_index, kOp);
  if (is_half(kernels_in)) {
    auto [loss, sums] = dynamic_mask_dice_loss_forward_cpu(
        kernels_in.to(at::kFloat), mask_feats_in.to(at::kFloat), pos_image_in,
        as_float_target(target_in), eps, /*check_index=*/false);
    return {loss.to(kernels_in.scalar_type()), sums};
  }
  const at::Tensor kernels = kernels_in.contiguous();        // (K, E)
  const at::Tensor mask_feats = mask_feats_in.contiguous();  // (N, E, P)
  const at::Tensor pos_image = pos_image_in.contiguous();    // (K,)
  const at::Tensor target = target_in.contiguous();          // (K, P)
  const int64_t images = mask_feats.size(0);
  const int64_t pixels = mask_feats.size(2);
  const int64_t positives = kernels.size(0);
  at::Tensor sums = at::zeros({positives, 3}, kernels.options().dtype(at::kDouble));
  at::Tensor loss = at::empty({positives}, kernels.options());
  if (positives == 0) {
    return {loss, sums};
  }
  const Layout layout = make_layout(pos_image, images);
  const at::Tensor sorted = kernels.index_select(0, layout.members_tensor);  // (K, E)

  const int64_t tiles = ceil_div(pixels, kTile);
  const int64_t spans = ceil_div(tiles, kTilesPerTask);
  std::vector<double> partials(positives * tiles * 3, 0.0);  // (K, tiles, 3)
  dispatch_types(kernels, target, [&](auto pred_tag, auto target_tag) {
    using acc_t = decltype(pred_tag);
    using target_t = decltype(target_tag);
    const target_t* target_data = ptr<const target_t>(target);
    const at::ThreadLocalState caller;
    at::parallel_for(0, images * spans, 1, [&](int64_t task_begin, int64_t task_end) {
      const GemmTaskScope scope(caller);
      at::Tensor logits = at::empty({layout.largest_image, kTile}, kernels.options());  // (K_n, T)
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t image = task / spans;
        const int64_t first = layout.image_start[image];
        const int64_t count_k = layout.image_start[image + 1] - first;
        if (count_k == 0) continue;
        const at::Tensor kernels_n = sorted.narrow(0, first, count_k);  // (K_n, E)
        const int64_t tile_end = std::min(tiles, (task % spans + 1) * kTilesPerTask);
        for (int64_t tile = (task % spans) * kTilesPerTask; tile < tile_end; ++tile) {
          const int64_t begin = tile * kTile;
          const int64_t count = std::min(pixels - begin, kTile);
          at::Tensor z = logits.narrow(0, 0, count_k).narrow(1, 0, count);  // (K_n, T)
          at::mm_out(z, kernels_n, mask_feats[image].narrow(1, begin, count));
          const acc_t* z_data = ptr<const acc_t>(logits);
          for (int64_t r = 0; r < count_k; ++r) {
            const int64_t k = layout.members[first + r];
            row_sums_any(z_data + r * kTile, target_data + k * pixels + begin, count,
                         partials.data() + (k * tiles + tile) * 3);
          }
        }
      }
    });
  });

  // Tiles in ascending order, in double: the same sums whatever the thread count.
  double* sums_data = ptr<double>(sums);
  at::Tensor loss_double = at::empty({positives}, sums.options());
  double* loss_data = ptr<double>(loss_double);
  for (int64_t k = 0; k < positives; ++k) {
    double* s = sums_data + k * 3;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      for (int v = 0; v < 3; ++v) s[v] += partials[(k * tiles + tile) * 3 + v];
    }
    loss_data[k] = dl::loss_from_sums(s[0], s[1], s[2], eps);
  }
  loss.copy_(loss_double);
  return {loss, sums};
}

std::tuple<at::Tensor, at::Tensor> dynamic_mask_dice_loss_backward_cpu(
    const at::Tensor& grad_loss_in, const at::Tensor& kernels_in, const at::Tensor& mask_feats_in,
    const at::Tensor& pos_image_in, const at::Tensor& target_in, const at::Tensor& sums_in,
    double eps, bool check_index) {
  constexpr const char* kOp = "dynamic_mask_dice_loss_backward";
  check_dynamic_mask_inputs(kernels_in, mask_feats_in, pos_image_in, target_in, check_index, kOp);
  const int64_t positives = kernels_in.size(0);
  check_grad_and_sums(grad_loss_in, sums_in, positives, kernels_in, kOp,
                      "dynamic_mask_dice_loss_forward");
  if (is_half(kernels_in)) {
    auto [grad_kernels, grad_feats] = dynamic_mask_dice_loss_backward_cpu(
        grad_loss_in, kernels_in.to(at::kFloat), mask_feats_in.to(at::kFloat), pos_image_in,
        as_float_target(target_in), sums_in, eps, /*check_index=*/false);
    return {grad_kernels.to(kernels_in.scalar_type()), grad_feats.to(kernels_in.scalar_type())};
  }
  const at::Tensor kernels = kernels_in.contiguous();        // (K, E)
  const at::Tensor mask_feats = mask_feats_in.contiguous();  // (N, E, P)
  const int64_t images = mask_feats.size(0);
  const int64_t channels = mask_feats.size(1);
  const int64_t pixels = mask_feats.size(2);
  if (positives == 0) {
    return {at::zeros_like(kernels), at::zeros_like(mask_feats)};
  }
  const at::Tensor pos_image = pos_image_in.contiguous();  // (K,)
  const at::Tensor target = target_in.contiguous();        // (K, P)
  const Layout layout = make_layout(pos_image, images);
  const at::Tensor sorted = kernels.index_select(0, layout.members_tensor);  // (K, E)
  at::Tensor grad_kernels = at::empty_like(kernels);
  at::Tensor grad_feats = at::empty_like(mask_feats);
  advise_huge_pages(grad_feats);

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

  const int64_t tiles = ceil_div(pixels, kTile);
  const int64_t spans = ceil_div(tiles, kTilesPerTask);
  // Each span's partial of grad_kernels, for the sorted rows: (spans, K, E), summed below.
  at::Tensor span_partials = at::zeros({spans, positives, channels}, kernels.options());
  dispatch_types(kernels, target, [&](auto pred_tag, auto target_tag) {
    using acc_t = decltype(pred_tag);
    using target_t = decltype(target_tag);
    const target_t* target_data = ptr<const target_t>(target);
    const at::ThreadLocalState caller;
    at::parallel_for(0, images * spans, 1, [&](int64_t task_begin, int64_t task_end) {
      const GemmTaskScope scope(caller);
      at::Tensor buffer = at::empty({layout.largest_image, kTile}, kernels.options());  // (K_n, T)
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t image = task / spans;
        const int64_t span = task % spans;
        const int64_t first = layout.image_start[image];
        const int64_t count_k = layout.image_start[image + 1] - first;
        const int64_t span_begin = span * kTilesPerTask * kTile;
        const int64_t span_count = std::min(pixels - span_begin, kTilesPerTask * kTile);
        at::Tensor grad_feats_n = grad_feats[image];  // (E, P)
        if (count_k == 0) {  // no positive of this image: its features get no gradient
          grad_feats_n.narrow(1, span_begin, span_count).zero_();
          continue;
        }
        const at::Tensor kernels_n = sorted.narrow(0, first, count_k);  // (K_n, E)
        const at::Tensor feats_n = mask_feats[image];  // (E, P)
        at::Tensor partial = span_partials[span].narrow(0, first, count_k);  // (K_n, E)
        const int64_t tile_end = std::min(tiles, (span + 1) * kTilesPerTask);
        for (int64_t tile = span * kTilesPerTask; tile < tile_end; ++tile) {
          const int64_t begin = tile * kTile;
          const int64_t count = std::min(pixels - begin, kTile);
          const at::Tensor feats_tile = feats_n.narrow(1, begin, count);  // (E, T)
          at::Tensor z = buffer.narrow(0, 0, count_k).narrow(1, 0, count);  // (K_n, T)
          at::mm_out(z, kernels_n, feats_tile);
          acc_t* z_data = ptr<acc_t>(buffer);
          for (int64_t r = 0; r < count_k; ++r) {
            const int64_t k = layout.members[first + r];
            const GradCoefficients<acc_t> coef{static_cast<acc_t>(coefs[2 * k]),
                                               static_cast<acc_t>(coefs[2 * k + 1])};
            row_grad_any(z_data + r * kTile, target_data + k * pixels + begin, count, coef);
          }
          // z now holds dL/dz of the tile.
          at::Tensor grad_tile = grad_feats_n.narrow(1, begin, count);  // (E, T)
          at::mm_out(grad_tile, kernels_n.t(), z);
          partial.addmm_(z, feats_tile.t());
        }
      }
    });
  });

  // Spans in ascending order, in double, back to the positives' order.
  dispatch_types(kernels, target, [&](auto pred_tag, auto) {
    using acc_t = decltype(pred_tag);
    const acc_t* partial_data = ptr<const acc_t>(span_partials);
    acc_t* grad_data = ptr<acc_t>(grad_kernels);
    at::parallel_for(0, positives, 16, [&](int64_t row_begin, int64_t row_end) {
      std::vector<double> row(channels);
      for (int64_t r = row_begin; r < row_end; ++r) {
        std::fill(row.begin(), row.end(), 0.0);
        for (int64_t span = 0; span < spans; ++span) {
          const acc_t* src = partial_data + (span * positives + r) * channels;
          for (int64_t e = 0; e < channels; ++e) row[e] += static_cast<double>(src[e]);
        }
        acc_t* dst = grad_data + layout.members[r] * channels;
        for (int64_t e = 0; e < channels; ++e) dst[e] = static_cast<acc_t>(row[e]);
      }
    });
  });
  return {grad_kernels, grad_feats};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("dynamic_mask_dice_loss_forward", &solo_fast::dynamic_mask_dice_loss_forward_cpu);
  m.impl("dynamic_mask_dice_loss_backward", &solo_fast::dynamic_mask_dice_loss_backward_cpu);
}
