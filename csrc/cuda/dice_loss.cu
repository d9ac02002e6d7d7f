// CUDA kernels of solo_fast::dice_loss_forward / dice_loss_backward (contract: csrc/solo_fast.cpp,
// solo_fast/ops/dice_loss.py). The per-element math comes from dice_loss.h so that CPU and CUDA
// run the same operations. Reductions are two-pass (block partials, then a fixed-order sum in
// double) rather than atomics, so results are bitwise reproducible on a given GPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

#include "cuda/dice_reduce.cuh"
#include "dice_loss.h"
#include "op_checks.h"

namespace solo_fast {
namespace {

namespace dl = ::solo_fast::dice_loss;

using cuda_dice::ceil_div;
using cuda_dice::kThreads;
using cuda_dice::kWarps;
// Below a few thousand pixels per block the partial write and block reduction start to dominate.
constexpr int64_t kMinChunk = 4096;

// Block (mask, chunk) reduces pixels [chunk * chunk_size, min(p, (chunk + 1) * chunk_size)) of one
// mask into partials[mask][chunk][0..2].
template <typename scalar_t, typename acc_t, typename target_t>
__global__ void __launch_bounds__(kThreads) dice_partials_kernel(
    const scalar_t* __restrict__ pred, const target_t* __restrict__ target, int64_t p,
    int64_t chunk_size, bool logits, acc_t* __restrict__ partials) {
  const int64_t mask = blockIdx.x;
  const int64_t begin = blockIdx.y * chunk_size;
  const int64_t end = begin + chunk_size < p ? begin + chunk_size : p;
  const scalar_t* pred_row = pred + mask * p;
  const target_t* target_row = target + mask * p;
  acc_t v[3] = {acc_t(0), acc_t(0), acc_t(0)};  // a, b, c
#pragma unroll 4
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const acc_t value = static_cast<acc_t>(pred_row[i]);
    const acc_t t = static_cast<acc_t>(target_row[i]);
    dl::accumulate(dl::probability(value, logits), t, v[0], v[1], v[2]);
  }

  cuda_dice::store_block_sums(v, partials + (mask * gridDim.y + blockIdx.y) * 3);
}

// 2-D grid: x strides over the pixels of a mask, y over masks (gridDim.y is capped at 65535).
template <typename scalar_t, typename acc_t, typename target_t>
__global__ void __launch_bounds__(kThreads) dice_backward_kernel(
    const double* __restrict__ coef_in, const scalar_t* __restrict__ pred,
    const target_t* __restrict__ target, int64_t n, int64_t p, bool logits,
    scalar_t* __restrict__ grad) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t mask = blockIdx.y; mask < n; mask += gridDim.y) {
    dl::GradCoefficients<acc_t> coef;
    coef.coef_p = static_cast<acc_t>(coef_in[2 * mask]);
    coef.coef_t = static_cast<acc_t>(coef_in[2 * mask + 1]);
    const scalar_t* pred_row = pred + mask * p;
    const target_t* target_row = target + mask * p;
    scalar_t* grad_row = grad + mask * p;
#pragma unroll 4
    for (int64_t i = first; i < p; i += stride) {
      const acc_t value = static_cast<acc_t>(pred_row[i]);
      const acc_t t = static_cast<acc_t>(target_row[i]);
      grad_row[i] = static_cast<scalar_t>(dl::grad_element(value, t, coef, logits));
    }
  }
}

void check_pred_target(const at::Tensor& pred, const at::Tensor& target, const char* op) {
  TORCH_CHECK(pred.is_cuda(), op, ": pred must be a CUDA tensor, got one on ", pred.device());
  check_dice_inputs(pred, target, op);
  TORCH_CHECK(pred.size(0) <= INT_MAX, op, ": at most ", INT_MAX, " masks, got ", pred.size(0));
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

std::tuple<at::Tensor, at::Tensor> dice_loss_forward_cuda(
    const at::Tensor& pred_in, const at::Tensor& target_in, bool logits, double eps) {
  check_pred_target(pred_in, target_in, "dice_loss_forward");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t n = pred.size(0);
  const int64_t p = pred.size(1);
  const auto sums_options = pred.options().dtype(at::kDouble);
  if (n == 0 || p == 0) {
    const double empty_loss = dl::loss_from_sums(0.0, 0.0, 0.0, eps);
    return {at::full({n}, empty_loss, pred.options()), at::zeros({n, 3}, sums_options)};
  }

  // Enough blocks to fill the GPU several times over, but never chunks under kMinChunk pixels.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t chunks = std::min(ceil_div(4 * sms, n), ceil_div(p, kMinChunk));
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, 65535));
  // Whole multiples of the block size keep every chunk start aligned the same way as its row.
  const int64_t chunk_size = ceil_div(ceil_div(p, chunks), kThreads) * kThreads;
  chunks = ceil_div(p, chunk_size);

  at::Tensor loss = at::empty({n}, pred.options());
  at::Tensor sums = at::empty({n, 3}, sums_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "dice_loss_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partials =
        at::empty({n, chunks, 3}, pred.options().dtype(at::toOpMathType(pred.scalar_type())));
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(chunks));
    with_target<scalar_t>(target, [&](auto target_ptr) {
      dice_partials_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          pred.const_data_ptr<scalar_t>(), target_ptr, p, chunk_size, logits,
          partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const unsigned finalize_blocks = static_cast<unsigned>(ceil_div(n, kWarps));
    cuda_dice::finalize_kernel<scalar_t, acc_t><<<finalize_blocks, kThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), n, chunks, eps, sums.mutable_data_ptr<double>(),
        loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, sums};
}

at::Tensor dice_loss_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& pred_in,
                                   const at::Tensor& target_in, const at::Tensor& sums_in,
                                   bool logits, double eps) {
  check_pred_target(pred_in, target_in, "dice_loss_backward");
  const int64_t n = pred_in.size(0);
  const int64_t p = pred_in.size(1);
  check_grad_and_sums(grad_loss_in, sums_in, n, pred_in, "dice_loss_backward",
                      "dice_loss_forward");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  at::Tensor grad = at::empty({n, p}, pred.options());
  if (n == 0 || p == 0) return grad;
  const at::Tensor target = target_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor sums = sums_in.to(at::kDouble).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor coef = at::empty({n, 2}, sums.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_loss.scalar_type(),
                                  "dice_loss_backward_cuda", [&] {
    const unsigned blocks = static_cast<unsigned>(ceil_div(n, kThreads));
    cuda_dice::coefficients_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<scalar_t>(), sums.const_data_ptr<double>(), n, eps,
        coef.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // About 16 blocks per SM in total; each block strides over its share of a row.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid_y = std::min<int64_t>(n, 65535);
  const int64_t grid_x =
      std::max<int64_t>(1, std::min(ceil_div(16 * sms, grid_y), ceil_div(p, kThreads)));
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "dice_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_target<scalar_t>(target, [&](auto target_ptr) {
      dice_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          coef.const_data_ptr<double>(), pred.const_data_ptr<scalar_t>(), target_ptr, n, p,
          logits, grad.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CUDA, m) {
  m.impl("dice_loss_forward", &solo_fast::dice_loss_forward_cuda);
  m.impl("dice_loss_backward", &solo_fast::dice_loss_backward_cuda);
}
