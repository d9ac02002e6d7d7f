// Code shared by the CUDA kernels that score candidate masks by area and soft sum
// (decoupled_mask_scores.cu, solo_mask_scores.cu, dynamic_mask_scores.cu): the two-pass
// reduction: each block reduces its pixels to one partial (count, sum) per candidate and chunk,
// and a second kernel adds a candidate's partials in a fixed order. No atomics: the results are
// bitwise reproducible on a given GPU, as in dice_reduce.cuh.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dice_reduce.cuh"

namespace solo_fast {
namespace cuda_scores {

using cuda_dice::kThreads;
using cuda_dice::kWarps;
using cuda_dice::warp_sum;

// Adds every thread's (inside, sum) over the block (kThreads threads) in a fixed order (warp
// butterflies, then warp 0 over the warp totals) and stores the totals at partial_*[slot].
__device__ __forceinline__ void store_block_partial(long long inside, double sum, int64_t slot,
                                                    int64_t* __restrict__ partial_area,
                                                    double* __restrict__ partial_soft) {
  __shared__ long long shared_inside[kWarps];
  __shared__ double shared_sum[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  inside = warp_sum(inside);
  sum = warp_sum(sum);
  if (lane == 0) {
    shared_inside[warp] = inside;
    shared_sum[warp] = sum;
  }
  __syncthreads();
  if (warp == 0) {
    inside = warp_sum(lane < kWarps ? shared_inside[lane] : 0LL);
    sum = warp_sum(lane < kWarps ? shared_sum[lane] : 0.0);
    if (lane == 0) {
      partial_area[slot] = static_cast<int64_t>(inside);
      partial_soft[slot] = sum;
    }
  }
}

// One warp per row of partials: lane l adds chunks l, l + 32, ..., then a butterfly; the order
// depends only on the chunk count. Row r's totals go to candidate order[r] (r if order is null).
template <typename count_t>
__global__ void __launch_bounds__(kThreads) scores_finalize_kernel(
    const count_t* __restrict__ partial_area, const double* __restrict__ partial_soft,
    const int64_t* __restrict__ order, int64_t candidates, int64_t chunks,
    int64_t* __restrict__ area, double* __restrict__ soft_sum) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= candidates) return;  // uniform per warp, so the full-mask shuffles stay valid
  const int lane = threadIdx.x % 32;
  long long inside = 0;
  double sum = 0.0;
  for (int64_t j = lane; j < chunks; j += 32) {
    inside += partial_area[row * chunks + j];
    sum += partial_soft[row * chunks + j];
  }
  inside = warp_sum(inside);
  sum = warp_sum(sum);
  if (lane == 0) {
    const int64_t k = order == nullptr ? row : order[row];
    area[k] = static_cast<int64_t>(inside);
    soft_sum[k] = sum;
  }
}

// area, soft_sum (K,) from the partials (K, chunks) of count_t counts and double sums, on stream.
template <typename count_t>
void finalize_scores(const at::Tensor& partial_area, const at::Tensor& partial_soft,
                     const int64_t* order, at::Tensor& area, at::Tensor& soft_sum,
                     cudaStream_t stream) {
  const int64_t candidates = partial_area.size(0);
  const unsigned blocks = static_cast<unsigned>(cuda_dice::ceil_div(candidates, kWarps));
  scores_finalize_kernel<count_t><<<blocks, kThreads, 0, stream>>>(
      partial_area.const_data_ptr<count_t>(), partial_soft.const_data_ptr<double>(), order,
      candidates, partial_area.size(1), area.mutable_data_ptr<int64_t>(),
      soft_sum.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_scores
}  // namespace solo_fast
