// CUDA kernels of solo_fast::decoupled_dice_loss_forward / _backward (contract:
// csrc/solo_fast.cpp, solo_fast/ops/decoupled_dice_loss.py). The per-element math comes from
// decoupled_dice_loss.h and dice_loss.h, so that CPU and CUDA run the same operations. Nothing of
// size K x P is stored: both passes recompute the sigmoids from the logits.
//
// Forward: block (positive k, chunk of pixels) reduces a, b, c of its chunk; rows shared by
// several positives are re-read from L2 rather than DRAM (one level of one image is ~17 MB). The
// partials are then summed per positive in double in a fixed order, as in dice_loss.cu.
//
// Backward: the gradient row of X for (image n, column j) gathers every positive of that column.
// Rather than atomics, block (own row, chunk) owns its pixels of one gradient row: it takes the own
// sigmoid once, runs over the row's positives in ascending k (a list built with a stable sort),
// adds each positive's term, and writes every element of its chunk exactly once (zeros for rows
// without positives). One launch for the rows of X (partner Y), one for Y (partner X). No two
// blocks write one element, and every sum has a fixed order: bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <utility>

#include "cuda/dice_reduce.cuh"
#include "decoupled_dice_loss.h"
#include "op_checks.h"

// N=images, S=grid side, K=positives, P=pixels of a mask map, R=N*S rows of one branch

namespace solo_fast {
namespace {

namespace dl = ::solo_fast::dice_loss;
namespace ddl = ::solo_fast::decoupled_dice_loss;

using cuda_dice::ceil_div;
using cuda_dice::kThreads;
using cuda_dice::kWarps;
// Below a few thousand pixels per block the partial write and block reduction start to dominate.
constexpr int64_t kMinChunk = 4096;
// CUDA limits grid axis y to 65535 blocks.
constexpr int64_t kMaxGridY = 65535;

// Pixels per thread of the backward: the own sigmoid, its derivative and the running sum of each
// stay in registers across the loop over positives, and that many partner loads are in flight.
// Doubles take twice the registers, and their division is a subroutine call: half as many.
template <typename acc_t>
constexpr int backward_pixels() {
  return sizeof(acc_t) == 8 ? 2 : 4;
}

// Block (k, chunk) reduces pixels [chunk * chunk_size, min(p, (chunk + 1) * chunk_size)) of
// positive k into partials[k][chunk][0..2].
template <typename scalar_t, typename acc_t, typename target_t>
__global__ void __launch_bounds__(kThreads) decoupled_partials_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
    const int64_t* __restrict__ pos_image, const int64_t* __restrict__ pos_row,
    const int64_t* __restrict__ pos_col, const target_t* __restrict__ target, int64_t s,
    int64_t p, int64_t chunk_size, acc_t* __restrict__ partials) {
  const int64_t k = blockIdx.x;
  const int64_t begin = blockIdx.y * chunk_size;
  const int64_t end = begin + chunk_size < p ? begin + chunk_size : p;
  const int64_t image = pos_image[k];
  const scalar_t* x_row = x + (image * s + pos_col[k]) * p;
  const scalar_t* y_row = y + (image * s + pos_row[k]) * p;
  const target_t* target_row = target + k * p;
  acc_t v[3] = {acc_t(0), acc_t(0), acc_t(0)};  // a, b, c
  // Two sigmoids per pixel: unrolled further, the registers live across their division
  // subroutine (and double's exp) spill.
  constexpr int kUnroll = sizeof(acc_t) == 8 ? 1 : 2;
#pragma unroll kUnroll
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const acc_t px = dl::probability(static_cast<acc_t>(x_row[i]), true);
    const acc_t py = dl::probability(static_cast<acc_t>(y_row[i]), true);
    dl::accumulate(ddl::product(py, px), static_cast<acc_t>(target_row[i]), v[0], v[1], v[2]);
  }

  cuda_dice::store_block_sums(v, partials + (k * gridDim.y + blockIdx.y) * 3);
}

// Block (chunk, own row r = image * S + channel): pixels [chunk * kTile, (chunk + 1) * kTile) of
// gradient row r, kPixels per thread at a stride of kThreads (coalesced). Rows past gridDim.y are
// taken by a grid-stride loop.
template <typename scalar_t, typename acc_t, typename target_t>
__global__ void __launch_bounds__(kThreads) decoupled_backward_kernel(
    const scalar_t* __restrict__ own, const scalar_t* __restrict__ partner,
    const int64_t* __restrict__ partner_channel, const int64_t* __restrict__ group_start,
    const int64_t* __restrict__ members, const target_t* __restrict__ target,
    const double* __restrict__ coef_in, int64_t rows, int64_t s, int64_t p,
    scalar_t* __restrict__ grad) {
  constexpr int kPixels = backward_pixels<acc_t>();
  constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kPixels;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t first = group_start[row];
    const int64_t last = group_start[row + 1];
    scalar_t* grad_row = grad + row * p;
    if (first == last) {
      // No positive: exactly 0, without reading the logits (0 * a NaN derivative would be NaN).
#pragma unroll
      for (int u = 0; u < kPixels; ++u) {
        const int64_t q = base + u * kThreads;
        if (q < p) grad_row[q] = static_cast<scalar_t>(0);
      }
      continue;
    }
    const scalar_t* own_row = own + row * p;
    const int64_t partner_base = (row / s) * s;  // the image's first row of the partner branch
    acc_t own_p[kPixels], own_dp[kPixels], summed[kPixels];
#pragma unroll
    for (int u = 0; u < kPixels; ++u) {
      const int64_t q = base + u * kThreads;
      const dl::Sigmoid<acc_t> sig =
          dl::sigmoid_with_derivative(q < p ? static_cast<acc_t>(own_row[q]) : acc_t(0));
      own_p[u] = sig.p;
      own_dp[u] = sig.dp;
      summed[u] = acc_t(0);
    }
    for (int64_t m = first; m < last; ++m) {
      const int64_t k = members[m];
      dl::GradCoefficients<acc_t> coef;
      coef.coef_p = static_cast<acc_t>(coef_in[2 * k]);
      coef.coef_t = static_cast<acc_t>(coef_in[2 * k + 1]);
      const scalar_t* partner_row = partner + (partner_base + partner_channel[k]) * p;
      const target_t* target_row = target + k * p;
#pragma unroll
      for (int u = 0; u < kPixels; ++u) {
        const int64_t q = base + u * kThreads;
        if (q < p) {
          const acc_t partner_p = dl::probability(static_cast<acc_t>(partner_row[q]), true);
          const acc_t t = static_cast<acc_t>(target_row[q]);
          // own * partner rounds as py * px whichever branch is own.
          summed[u] += ddl::row_term(ddl::product(own_p[u], partner_p), partner_p, t, coef);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kPixels; ++u) {
      const int64_t q = base + u * kThreads;
      if (q < p) grad_row[q] = static_cast<scalar_t>(ddl::row_gradient(summed[u], own_dp[u]));
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& pos_image,
                  const at::Tensor& pos_row, const at::Tensor& pos_col, const at::Tensor& target,
                  bool check_index, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x_logits must be a CUDA tensor, got one on ", x.device());
  check_decoupled_inputs(x, y, pos_image, pos_row, pos_col, target, check_index, op);
  TORCH_CHECK(pos_image.size(0) <= INT_MAX, op, ": at most ", INT_MAX, " positives, got ",
              pos_image.size(0));
}

// The positives of each own row r = image * S + channel: members[start[r] .. start[r + 1]), in
// ascending k (stable sort), so the backward adds them in the C++ kernel's order.
std::pair<at::Tensor, at::Tensor> group_by_row(const at::Tensor& pos_image,
                                               const at::Tensor& channel, int64_t grids,
                                               int64_t rows) {
  const at::Tensor keys = pos_image.mul(grids).add(channel);  // (K,)
  auto [sorted_keys, members] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor boundaries = at::arange(rows + 1, keys.options());  // (R + 1,)
  return {at::searchsorted(sorted_keys, boundaries).contiguous(), members.contiguous()};
}

// Calls launch(target pointer): bool and uint8 masks are both read as bytes (bool storage is 0/1).
template <typename scalar_t, typename Launch>
void with_target(const at::Tensor& target, const Launch& launch) {
  if (target.scalar_type() == at::kByte || target.scalar_type() == at::kBool) {
    launch(static_cast<const uint8_t*>(target.const_data_ptr()));
  } else {
    launch(target.const_data_ptr<scalar_t>());
  }
}

std::tuple<at::Tensor, at::Tensor> decoupled_dice_loss_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& pos_image_in,
    const at::Tensor& pos_row_in, const at::Tensor& pos_col_in, const at::Tensor& target_in,
    double eps, bool check_index) {
  constexpr const char* kOp = "decoupled_dice_loss_forward";
  check_inputs(x_in, y_in, pos_image_in, pos_row_in, pos_col_in, target_in, check_index, kOp);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();  // (N, S, P)
  const at::Tensor y = y_in.contiguous();  // (N, S, P)
  const int64_t s = x.size(1);
  const int64_t p = x.size(2);
  const int64_t positives = pos_image_in.size(0);
  const auto sums_options = x.options().dtype(at::kDouble);
  if (positives == 0 || p == 0) {
    const double empty_loss = dl::loss_from_sums(0.0, 0.0, 0.0, eps);
    return {at::full({positives}, empty_loss, x.options()),
            at::zeros({positives, 3}, sums_options)};
  }
  const at::Tensor target = target_in.contiguous();  // (K, P)
  const at::Tensor pos_image = pos_image_in.contiguous();
  const at::Tensor pos_row = pos_row_in.contiguous();
  const at::Tensor pos_col = pos_col_in.contiguous();

  // Enough blocks to fill the GPU several times over, but never chunks under kMinChunk pixels.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t chunks = std::min(ceil_div(4 * sms, positives), ceil_div(p, kMinChunk));
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, kMaxGridY));
  // Whole multiples of the block size keep every chunk start aligned the same way as its row.
  const int64_t chunk_size = ceil_div(ceil_div(p, chunks), kThreads) * kThreads;
  chunks = ceil_div(p, chunk_size);

  at::Tensor loss = at::empty({positives}, x.options());
  at::Tensor sums = at::empty({positives, 3}, sums_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "decoupled_dice_loss_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partials = at::empty(  // (K, chunks, 3)
        {positives, chunks, 3}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    const dim3 grid(static_cast<unsigned>(positives), static_cast<unsigned>(chunks));
    with_target<scalar_t>(target, [&](auto target_ptr) {
      decoupled_partials_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
          pos_image.const_data_ptr<int64_t>(), pos_row.const_data_ptr<int64_t>(),
          pos_col.const_data_ptr<int64_t>(), target_ptr, s, p, chunk_size,
          partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const unsigned finalize_blocks = static_cast<unsigned>(ceil_div(positives, kWarps));
    cuda_dice::finalize_kernel<scalar_t, acc_t><<<finalize_blocks, kThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), positives, chunks, eps,
        sums.mutable_data_ptr<double>(), loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, sums};
}

std::tuple<at::Tensor, at::Tensor> decoupled_dice_loss_backward_cuda(
    const at::Tensor& grad_loss_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const at::Tensor& pos_image_in, const at::Tensor& pos_row_in, const at::Tensor& pos_col_in,
    const at::Tensor& target_in, const at::Tensor& sums_in, double eps, bool check_index) {
  constexpr const char* kOp = "decoupled_dice_loss_backward";
  check_inputs(x_in, y_in, pos_image_in, pos_row_in, pos_col_in, target_in, check_index, kOp);
  const int64_t positives = pos_image_in.size(0);
  check_grad_and_sums(grad_loss_in, sums_in, positives, x_in, kOp,
                      "decoupled_dice_loss_forward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();  // (N, S, P)
  const at::Tensor y = y_in.contiguous();  // (N, S, P)
  const int64_t s = x.size(1);
  const int64_t p = x.size(2);
  const int64_t rows = x.size(0) * s;
  if (positives == 0) return {at::zeros_like(x), at::zeros_like(y)};
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_y = at::empty_like(y);
  if (p == 0) return {grad_x, grad_y};
  const at::Tensor target = target_in.contiguous();  // (K, P)
  const at::Tensor pos_image = pos_image_in.contiguous();
  const at::Tensor pos_row = pos_row_in.contiguous();
  const at::Tensor pos_col = pos_col_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor sums = sums_in.to(at::kDouble).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor coef = at::empty({positives, 2}, sums.options());  // (K, 2)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_loss.scalar_type(),
                                  "decoupled_dice_loss_backward_cuda", [&] {
    const unsigned blocks = static_cast<unsigned>(ceil_div(positives, kThreads));
    cuda_dice::coefficients_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<scalar_t>(), sums.const_data_ptr<double>(), positives, eps,
        coef.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // X rows are grouped by column and take their partner from Y's rows; Y the other way round.
  const std::pair<at::Tensor, at::Tensor> x_groups = group_by_row(pos_image, pos_col, s, rows);
  const std::pair<at::Tensor, at::Tensor> y_groups = group_by_row(pos_image, pos_row, s, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "decoupled_dice_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t tile = static_cast<int64_t>(kThreads) * backward_pixels<acc_t>();
    const dim3 grid(static_cast<unsigned>(ceil_div(p, tile)),
                    static_cast<unsigned>(std::min(rows, kMaxGridY)));
    with_target<scalar_t>(target, [&](auto target_ptr) {
      decoupled_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
          pos_row.const_data_ptr<int64_t>(), x_groups.first.const_data_ptr<int64_t>(),
          x_groups.second.const_data_ptr<int64_t>(), target_ptr,
          coef.const_data_ptr<double>(), rows, s, p, grad_x.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      decoupled_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          pos_col.const_data_ptr<int64_t>(), y_groups.first.const_data_ptr<int64_t>(),
          y_groups.second.const_data_ptr<int64_t>(), target_ptr,
          coef.const_data_ptr<double>(), rows, s, p, grad_y.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CUDA, m) {
  m.impl("decoupled_dice_loss_forward", &solo_fast::decoupled_dice_loss_forward_cuda);
  m.impl("decoupled_dice_loss_backward", &solo_fast::decoupled_dice_loss_backward_cuda);
}
