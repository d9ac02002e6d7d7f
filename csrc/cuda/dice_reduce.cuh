// Device code shared by the CUDA kernels whose loss is a dice loss (dice_loss.cu,
// decoupled_dice_loss.cu): the block reduction of the three partial sums, the fixed-order
// finalisation of the sums into losses, and the per-item gradient coefficients.
//
// Every reduction is two-pass (block partials, then a fixed-order sum in double) rather than
// atomic, so results are bitwise reproducible on a given GPU.
#pragma once

#include <cstdint>

#include "dice_loss.h"

namespace solo_fast {
namespace cuda_dice {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums each thread's v[0..2] over the block (kThreads threads) and writes the three totals to
// out[0..2]: warp shuffles, then the warp totals through shared memory.
template <typename acc_t>
__device__ __forceinline__ void store_block_sums(acc_t (&v)[3], acc_t* __restrict__ out) {
  __shared__ acc_t shared[3][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    v[j] = warp_sum(v[j]);
    if (lane == 0) shared[j][warp] = v[j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      v[j] = warp_sum(lane < kWarps ? shared[j][lane] : acc_t(0));
      if (lane == 0) out[j] = v[j];
    }
  }
}

// One warp per item (mask or positive): lane l sums chunks l, l + 32, ... in double, then a
// butterfly across lanes; the order depends only on the chunk count, so the result is
// deterministic. Writes the raw sums (float64) and the loss.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(
    const acc_t* __restrict__ partials, int64_t items, int64_t chunks, double eps,
    double* __restrict__ sums, scalar_t* __restrict__ loss) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= items) return;  // uniform per warp, so the full-mask shuffles below stay valid
  const int lane = threadIdx.x % 32;
  const acc_t* row = partials + item * chunks * 3;
  double v[3] = {0.0, 0.0, 0.0};
  for (int64_t j = lane; j < chunks; j += 32) {
#pragma unroll
    for (int k = 0; k < 3; ++k) v[k] += static_cast<double>(row[3 * j + k]);
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) sums[3 * item + k] = v[k];
  }
  if (lane == 0) {
    const double value = dice_loss::loss_from_sums(v[0], v[1], v[2], eps);
    loss[item] = static_cast<scalar_t>(static_cast<acc_t>(value));
  }
}

// Per-item gradient coefficients, in double and apart from the elementwise kernels: the exact
// double division calls a slow-path subroutine that would make those kernels spill around it.
template <typename grad_t>
__global__ void __launch_bounds__(kThreads) coefficients_kernel(
    const grad_t* __restrict__ grad_loss, const double* __restrict__ sums, int64_t items,
    double eps, double* __restrict__ coef) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= items) return;
  const dice_loss::GradCoefficients<double> c = dice_loss::grad_coefficients(
      static_cast<double>(grad_loss[item]), sums[3 * item], sums[3 * item + 1],
      sums[3 * item + 2], eps);
  coef[2 * item] = c.coef_p;
  coef[2 * item + 1] = c.coef_t;
}

}  // namespace cuda_dice
}  // namespace solo_fast
